"""Base images built from local files, so that no registry is ever needed.

Two bases:

- ``busybox``: the host's static busybox (Debian ``busybox-static``) with one symlink per applet, an
  ``/etc/passwd`` that names the guest uid, and optionally (``python=True``) the host's Debian ``python3``:
  its interpreter, standard library, and the shared libraries both link (found with ``ldd``). A few MB, or
  ~60 MB with Python; built in seconds.
- ``debian``: ``debootstrap --variant=minbase`` from the Debian archive (with ``python3``), ~200 MB, ~1 min.

The root filesystem is written to a temporary directory, packed as a tar with root ownership and imported
(``POST /images/create?fromSrc=-``, i.e. ``docker import``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from ...errors import BackendUnavailable, InvalidRequest, LifecycleError
from ._engine import Engine

__all__ = ["Base", "build_image", "build_rootfs", "debootstrap_argv", "is_static_elf"]

Base = Literal["busybox", "debian"]
Progress = Callable[[str], None]

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000:stockade guest:/tmp:/bin/sh\n"  # noqa: S105
_GROUP = "root:x:0:\nsandbox:x:1000:\n"
_SKIP_STDLIB = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "site-packages",
                "dist-packages"}
_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")


def _quiet(_line: str) -> None:
    pass


def is_static_elf(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is an ELF executable without a program interpreter (statically linked)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only: the platforms stockade runs on
            return False
        endian = "<" if head[5] == 1 else ">"
        (phoff,) = struct.unpack(endian + "Q", head[32:40])
        phentsize, phnum = struct.unpack(endian + "HH", head[54:58])
        for index in range(phnum):
            f.seek(phoff + index * phentsize)
            (p_type,) = struct.unpack(endian + "I", f.read(4))
            if p_type == 3:  # PT_INTERP: needs the dynamic loader
                return False
    return True


def _host_busybox() -> str:
    path = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(path):
        raise BackendUnavailable("image", "busybox is not installed: apt-get install busybox-static")
    if not is_static_elf(path):
        raise BackendUnavailable("image", f"{path} is dynamically linked: apt-get install busybox-static")
    return path


def _copy_file(src: str, root: Path) -> None:
    dest = root / src.lstrip("/")
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(src), dest)  # the real file under the name the loader asks for


def _ldd(path: str) -> list[str]:
    result = subprocess.run(["ldd", path], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return []  # "not a dynamic executable"
    return [m.group(1) for m in map(_LDD_LINE.search, result.stdout.splitlines()) if m]


def _add_python(root: Path, progress: Progress) -> None:
    python = "/usr/bin/python3"
    if not os.path.exists(python):
        raise BackendUnavailable("image", "the host has no /usr/bin/python3 to copy: apt-get install python3")
    probe = subprocess.run(
        [python, "-c", "import sys, sysconfig; print(sys.version_info[0], sys.version_info[1]); "
                       "print(sysconfig.get_paths()['stdlib'])"],
        capture_output=True, text=True, check=True,
    )
    major_minor, stdlib = probe.stdout.split("\n")[:2]
    version = major_minor.replace(" ", ".")
    interpreter = os.path.realpath(python)
    progress(f"adding python {version} from {interpreter} and {stdlib}")
    _copy_file(interpreter, root)
    for name in ("python3", f"python{version}"):
        link = root / "usr/bin" / name
        if not link.exists():
            link.symlink_to(os.path.basename(interpreter))
    libs = set(_ldd(interpreter))

    def ignore(directory: str, names: list[str]) -> set[str]:
        # Only at the top of the stdlib: tests, GUIs and bundled installers no sandbox needs.
        return {n for n in names if n in _SKIP_STDLIB} if directory == stdlib else set()

    shutil.copytree(stdlib, root / stdlib.lstrip("/"), symlinks=True, ignore=ignore, dirs_exist_ok=True)
    for so in Path(stdlib, "lib-dynload").glob("*.so"):
        libs.update(_ldd(str(so)))
    for lib in sorted(libs):
        _copy_file(lib, root)


def build_rootfs(root: Path, base: Base = "busybox", *, python: bool = False, suite: str = "bookworm",
                 mirror: str | None = None, progress: Progress = _quiet) -> None:
    """Write a root filesystem for ``base`` into the empty directory ``root``."""
    if base == "busybox":
        busybox = _host_busybox()
        for name in ("bin", "etc", "tmp", "mnt", "proc", "sys", "dev", "root", "usr/bin", "var/tmp"):
            (root / name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, root / "bin/busybox")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
        progress(f"busybox with {len(applets)} applets")
        for applet in applets:
            link = root / "bin" / applet
            if not link.exists():
                link.symlink_to("busybox")
        (root / "etc/passwd").write_text(_PASSWD)
        (root / "etc/group").write_text(_GROUP)
        if python:
            _add_python(root, progress)
    elif base == "debian":
        argv = debootstrap_argv(root, suite=suite, mirror=mirror, python=python)
        progress("running: " + " ".join(argv))
        _stream(argv, progress)
        with open(root / "etc/passwd", "a") as f:
            f.write(_PASSWD.splitlines()[1] + "\n")
        with open(root / "etc/group", "a") as f:
            f.write(_GROUP.splitlines()[1] + "\n")
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (root / cache).glob("*.deb" if "archives" in cache else "*_*"):
                entry.unlink()
    else:
        raise InvalidRequest(f"must be 'busybox' or 'debian', not {base!r}", field="base")
    (root / "tmp").chmod(0o1777)


def debootstrap_argv(root: Path, *, suite: str = "bookworm", mirror: str | None = None,
                     python: bool = True) -> list[str]:
    """The debootstrap command line for a minimal Debian root (with python3 unless ``python`` is false)."""
    if shutil.which("debootstrap") is None:
        raise BackendUnavailable("image", "debootstrap is not installed: apt-get install debootstrap")
    argv = ["debootstrap", "--variant=minbase"]
    if python:
        argv.append("--include=python3")
    return [*argv, suite, str(root), mirror or _apt_mirror()]


def _apt_mirror() -> str:
    """The first Debian archive URL this host's apt uses (so the build goes where apt already goes)."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                match = re.match(r"\s*(?:deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(\S+)", line)
                if match and "security" not in match.group(1):
                    return match.group(1)
    return "http://deb.debian.org/debian"


def _stream(argv: list[str], progress: Progress) -> None:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        progress(line.rstrip())
        tail = [*tail[-19:], line.rstrip()]
    if proc.wait() != 0:
        raise LifecycleError(f"{argv[0]} failed (exit {proc.returncode}): " + " | ".join(tail[-5:]))


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def build_image(
    engine: Engine,
    tag: str,
    base: Base = "busybox",
    *,
    python: bool = False,
    suite: str = "bookworm",
    mirror: str | None = None,
    progress: Progress = _quiet,
) -> str:
    """Build the rootfs of ``base``, import it into ``engine`` as ``tag``; returns the image id."""
    repository, _, version = tag.rpartition(":") if ":" in tag.split("/")[-1] else (tag, "", "latest")
    with tempfile.TemporaryDirectory(prefix="stockade-image-") as tmp:
        root = Path(tmp) / "rootfs"
        root.mkdir()
        build_rootfs(root, base, python=python, suite=suite, mirror=mirror, progress=progress)
        archive = Path(tmp) / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            for entry in sorted(root.iterdir()):
                tar.add(str(entry), arcname=entry.name, filter=_root_owned)
        progress(f"importing {archive.stat().st_size >> 20} MB as {repository}:{version}")
        api = engine.api
        reply = engine.call("import image", api.import_image, src=str(archive), repository=repository,
                            tag=version, changes=["WORKDIR /tmp", "ENV PATH=/usr/local/bin:/usr/bin:/bin"])
    # Podman's compatible API ignores the tag of an import: name the image explicitly by the id it reported.
    found = re.search(r"(?:sha256:)?([0-9a-f]{64})", str(reply))
    if found is None:
        raise LifecycleError(f"the engine reported no image id for the import: {str(reply)[:300]}")
    engine.call("tag image", api.tag, found.group(1), repository, version)
    image: dict[str, object] = engine.call("inspect image", api.inspect_image, f"{repository}:{version}")
    progress(f"built {repository}:{version} ({image['Id']})")
    return str(image["Id"])
