"""The shared snapshot store: where a node puts a snapshot so that another node can start a session from it.

A store is a directory every node mounts at the same path (NFS, a shared volume; a plain directory in tests) or
an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``file:///...``; ``pip install fsspec`` plus the
filesystem's own package, e.g. ``s3fs``). A snapshot is a directory of files named by its id; its
``manifest.json`` is written last, so a snapshot whose manifest is there is complete.

Node backends keep snapshots in a local directory of their own; :func:`local_snapshot_dir` knows where for the
backends that have one (``bwrap``). Integrity is the node backend's business (``bwrap`` checks the archive's
sha256 against the manifest before restoring).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ...errors import BackendUnavailable, InvalidRequest, LifecycleError
from ...models import validate_session_id

__all__ = ["SnapshotStore", "local_snapshot_dir"]

MANIFEST = "manifest.json"


def local_snapshot_dir(backend: Any, snapshot_id: str) -> Path | None:
    """Where ``backend`` keeps snapshot ``snapshot_id`` on this node, or None if it has no such directory."""
    store = getattr(backend, "store", None)
    locate = getattr(store, "snapshot_dir", None)
    if locate is None:
        return None
    path = locate(snapshot_id)
    return path if isinstance(path, Path) else Path(path)


class SnapshotStore:
    """A directory path or an fsspec URL shared by every node."""

    def __init__(self, location: str) -> None:
        if not isinstance(location, str) or not location.strip():
            raise InvalidRequest("must be a directory path or an fsspec URL", field="snapshot_store")
        self.location = location.rstrip("/") or "/"
        self._fs: Any = None
        self._root = self.location
        if "://" in location:
            try:
                import fsspec  # type: ignore[import-untyped]
            except ImportError as exc:
                raise BackendUnavailable(
                    "ray", f"snapshot store {location!r} needs fsspec: pip install 'stockade[ray]'"
                ) from exc
            try:
                self._fs, self._root = fsspec.core.url_to_fs(location)
            except (ImportError, ValueError) as exc:
                raise BackendUnavailable("ray", f"cannot open snapshot store {location!r}: {exc}") from exc
        elif not location.startswith("/"):
            raise InvalidRequest(f"must be an absolute path or a URL (got {location!r})", field="snapshot_store")

    def __repr__(self) -> str:
        return f"SnapshotStore({self.location!r})"

    def _path(self, snapshot_id: str, name: str | None = None) -> str:
        validate_session_id(snapshot_id, "snapshot_id")
        base = f"{self._root.rstrip('/')}/{snapshot_id}"
        return f"{base}/{name}" if name else base

    def exists(self, snapshot_id: str) -> bool:
        """True when the snapshot is completely in the store."""
        path = self._path(snapshot_id, MANIFEST)
        if self._fs is None:
            return os.path.isfile(path)
        return bool(self._fs.exists(path))

    def put(self, snapshot_id: str, source: Path) -> None:
        """Copy the local snapshot directory ``source`` into the store (manifest last)."""
        files = sorted(p for p in source.iterdir() if p.is_file())
        if not any(p.name == MANIFEST for p in files):
            raise LifecycleError(f"snapshot {snapshot_id!r} at {source} has no {MANIFEST}")
        ordered = [p for p in files if p.name != MANIFEST] + [source / MANIFEST]
        if self._fs is None:
            target = Path(self._path(snapshot_id))
            target.mkdir(parents=True, exist_ok=True, mode=0o700)
            for item in ordered:
                tmp = target / f".{item.name}.part"
                shutil.copyfile(item, tmp)
                os.replace(tmp, target / item.name)
            return
        self._fs.makedirs(self._path(snapshot_id), exist_ok=True)
        for item in ordered:
            self._fs.put_file(str(item), self._path(snapshot_id, item.name))

    def fetch(self, snapshot_id: str, target: Path) -> bool:
        """Copy the snapshot into the local directory ``target`` (created whole or not at all).

        Returns False when the store does not hold the snapshot.
        """
        if not self.exists(snapshot_id):
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{snapshot_id[:20]}-", dir=target.parent))
        try:
            if self._fs is None:
                for item in Path(self._path(snapshot_id)).iterdir():
                    if item.is_file() and not item.name.startswith("."):
                        shutil.copyfile(item, staging / item.name)
            else:
                for remote in self._fs.ls(self._path(snapshot_id), detail=False):
                    name = str(remote).rstrip("/").rsplit("/", 1)[-1]
                    if not name.startswith("."):
                        self._fs.get_file(remote, str(staging / name))
            os.rename(staging, target)
        except FileExistsError:  # another call fetched it first; the same content
            shutil.rmtree(staging, ignore_errors=True)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.errno in (39, 17) and target.exists():  # ENOTEMPTY / EEXIST: a concurrent fetch won
                return True
            raise
        return True

    def delete(self, snapshot_id: str) -> None:
        if self._fs is None:
            shutil.rmtree(self._path(snapshot_id), ignore_errors=True)
        elif self._fs.exists(self._path(snapshot_id)):
            self._fs.rm(self._path(snapshot_id), recursive=True)
