"""The new mount API (``open_tree``, ``mount_setattr``, ``move_mount``, ``openat2``) through raw system calls, and
a helper that attaches a host directory or file to the mount namespace of a running sandbox.

Why a helper process: joining a user namespace (``setns(CLONE_NEWUSER)``) is refused to a multi-threaded
process and cannot be undone, so the work runs in a short-lived, single-threaded child
(:func:`run_attach_helper`), which executes this file as a script with ``python -I -S``. The module therefore
imports nothing but the standard library.

How an attach works (:func:`attach_into_namespace`), for root and unprivileged callers alike:

1. join the user namespace that *owns* the sandbox's mount namespace (the caller owns it: it created the
   sandbox), which gives every capability over that namespace and none over the host;
2. unshare a private mount namespace there (a throw-away copy of the host's, every mount in it locked), and
   clone the source into a detached tree with ``open_tree(OPEN_TREE_CLONE)``; the source path is resolved with
   ``RESOLVE_NO_SYMLINKS``, so a symlink anywhere in it is refused rather than followed;
3. set ``nosuid``, ``nodev`` (and ``ro``) on the whole detached tree with ``mount_setattr`` and make it private;
4. enter the sandbox's mount namespace and resolve the target one component at a time from the guest's root,
   again with ``RESOLVE_NO_SYMLINKS``: a guest-planted symlink cannot redirect the mount. Missing components are
   created as directories (or, for a file source, an empty file at the end); on the sandbox's own read-only
   root tmpfs they are created through a private writable clone of that mount, so the guest never sees its
   root writable;
5. ``move_mount`` the detached tree onto the exact directory entry that was opened.

A read-only directory is not attached as a bind but *sealed* (:func:`sealed_overlay`): a read-only overlayfs
whose lower layers are the detached clone and an empty tmpfs, both handed over as file descriptors. Two things a
bind cannot do follow from that. ``connect()`` on a unix socket ignores ``MS_RDONLY``, so through a bind a host
daemon whose socket sits in the directory (the ``docker.sock`` class of breaks) would answer the guest; through
the overlay the socket file is the overlay's own inode, which no listener is bound to, so the guest gets
``ECONNREFUSED``, and a fifo there is a fresh pipe, not the host's. And layers given as descriptors show as
``lowerdir+=/`` in ``/proc/self/mountinfo``, where a bind shows its source's path on the host. What is lost:
mounts below the source directory on the host are not part of the overlay (their mount points show empty), and
inode numbers differ from the host's. Where the kernel refuses the overlay (no ``lowerdir+`` by descriptor
before Linux 6.8, a source filesystem overlayfs cannot stack on), the clone is attached as a plain read-only
bind and the result says it is not sealed.

A read-write directory the sandbox owns (its outputs, say) can be presented as the upper layer of an overlay
instead (:func:`private_upper`, a request with a ``workdir``): the guest writes into the directory itself, and
mountinfo shows the layers relative to the state directory, not their host paths.

Nothing is mounted on the host at any point: the copies live in namespaces that disappear with the helper and
with the sandbox. The mount lands in a namespace owned by the sandbox's outer user namespace, while the guest
runs in a nested one, so even a guest process holding every capability of its own user namespace cannot
remount it: the ``ro`` flag is locked for everything the guest can reach.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import marshal
import os
import stat
import sys

TYPE_CHECKING = False  # not typing's: importing typing (and re with it) is most of the helper's start-up
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "AT_EMPTY_PATH",
    "AT_RECURSIVE",
    "MOUNT_ATTR_NODEV",
    "MOUNT_ATTR_NOSUID",
    "MOUNT_ATTR_RDONLY",
    "MOVE_MOUNT_F_EMPTY_PATH",
    "MOVE_MOUNT_T_EMPTY_PATH",
    "OPEN_TREE_CLOEXEC",
    "OPEN_TREE_CLONE",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "AttachFailed",
    "AttachResult",
    "MountRequest",
    "attach_all_into_namespace",
    "attach_into_namespace",
    "detach",
    "mount_setattr",
    "move_mount",
    "new_mount_api_available",
    "ns_owner",
    "open_tree",
    "openat2",
    "run_attach_all_helper",
    "run_attach_helper",
    "seal_at",
    "sealed_overlay",
    "setns",
    "unshare",
]

# System call numbers of the calls added after 5.0: one table for every architecture but alpha.
_NR_OPEN_TREE = 428
_NR_MOVE_MOUNT = 429
_NR_FSOPEN = 430
_NR_FSCONFIG = 431
_NR_FSMOUNT = 432
_NR_OPENAT2 = 437
_NR_MOUNT_SETATTR = 442

FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6

OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_AT_FDCWD = -100
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
NS_GET_USERNS = 0xB701

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def _check(result: int, what: str, path: str | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result


def _path(path: str) -> bytes:
    return os.fsencode(path)


def open_tree(dfd: int, path: str, flags: int) -> int:
    """``open_tree(2)``: an fd on a mount, or with ``OPEN_TREE_CLONE`` on a detached copy of it."""
    return _check(_libc.syscall(_NR_OPEN_TREE, dfd, _path(path), ctypes.c_uint(flags)), "open_tree", path)


def move_mount(from_dfd: int, from_path: str, to_dfd: int, to_path: str, flags: int) -> None:
    """``move_mount(2)``: attach (or move) a mount onto a directory entry."""
    _check(
        _libc.syscall(_NR_MOVE_MOUNT, from_dfd, _path(from_path), to_dfd, _path(to_path), ctypes.c_uint(flags)),
        "move_mount",
        to_path,
    )


def mount_setattr(
    dfd: int, path: str, flags: int, attr_set: int = 0, attr_clr: int = 0, propagation: int = 0
) -> None:
    """``mount_setattr(2)``: change the flags (and propagation) of a mount or, with ``AT_RECURSIVE``, a tree."""
    attr = _MountAttr(attr_set, attr_clr, propagation, 0)
    _check(
        _libc.syscall(_NR_MOUNT_SETATTR, dfd, _path(path), ctypes.c_uint(flags), ctypes.byref(attr),
                      ctypes.c_size_t(ctypes.sizeof(attr))),
        "mount_setattr",
        path,
    )


def fsopen(fstype: str) -> int:
    """``fsopen(2)``: a filesystem context for a new superblock of ``fstype``."""
    return _check(_libc.syscall(_NR_FSOPEN, fstype.encode(), ctypes.c_uint(FSOPEN_CLOEXEC)), "fsopen", fstype)


def fsconfig(fs_fd: int, cmd: int, key: str | None = None, value: bytes | None = None, aux: int = 0) -> None:
    """``fsconfig(2)``: set one parameter of a filesystem context, or (``FSCONFIG_CMD_CREATE``) create it."""
    _check(
        _libc.syscall(_NR_FSCONFIG, fs_fd, ctypes.c_uint(cmd), key.encode() if key is not None else None, value,
                      ctypes.c_int(aux)),
        "fsconfig",
        key,
    )


def fsmount(fs_fd: int, attr_flags: int) -> int:
    """``fsmount(2)``: a detached mount of a created filesystem context."""
    return _check(_libc.syscall(_NR_FSMOUNT, fs_fd, ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(attr_flags)),
                  "fsmount")


def sealed_overlay(tree_fd: int) -> int:
    """A detached read-only overlayfs showing the directory tree ``tree_fd`` (a detached clone) and nothing else.

    See the module docstring for why a read-only mount is presented this way. The second lower layer (overlayfs
    needs two without an upper one) is an empty tmpfs of a few pages.
    """
    empty = _empty_layer()
    try:
        ctx = fsopen("overlay")
        try:
            fsconfig(ctx, FSCONFIG_SET_FD, "lowerdir+", None, tree_fd)
            fsconfig(ctx, FSCONFIG_SET_FD, "lowerdir+", None, empty)
            fsconfig(ctx, FSCONFIG_SET_FLAG, "ro")
            fsconfig(ctx, FSCONFIG_CMD_CREATE)
            return fsmount(ctx, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        finally:
            os.close(ctx)
    finally:
        os.close(empty)


def _empty_layer() -> int:
    """A detached, read-only, empty tmpfs of a few pages: the lower layer that an overlay needs."""
    ctx = fsopen("tmpfs")
    try:
        fsconfig(ctx, FSCONFIG_SET_STRING, "size", b"4k")
        fsconfig(ctx, FSCONFIG_CMD_CREATE)
        return fsmount(ctx, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    finally:
        os.close(ctx)


def private_upper(source: str, workdir: str) -> int:
    """A detached read-write overlayfs whose upper layer is the host directory ``source`` (and whose lower layer
    is empty): what the guest writes lands in ``source`` itself, as through a bind.

    Both layers are given by descriptor from a detached clone of the common parent of ``source`` and
    ``workdir`` (overlayfs wants them on one mount), so ``/proc/self/mountinfo`` shows ``upperdir=/<name>``
    relative to that parent, where a bind shows the full host path. The cost of the overlay: a file the host
    creates in ``source`` while the session runs may stay invisible to a guest that looked the name up before
    (overlayfs caches the miss), and directories the guest creates carry an ``user.overlay.opaque`` attribute.
    """
    base = os.path.commonpath([source, workdir])
    if base in (source, workdir):
        raise OSError(errno.EINVAL, "the work directory must sit beside the source, not in it", workdir)
    base_fd = _open_source(base)
    try:
        tree = open_tree(base_fd, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH)
    finally:
        os.close(base_fd)
    layers: list[int] = []
    try:
        mount_setattr(tree, "", AT_EMPTY_PATH, attr_set=MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, propagation=MS_PRIVATE)
        for path in (source, workdir):
            layers.append(openat2(tree, os.path.relpath(path, base), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                                  _RESOLVE))
        layers.append(_empty_layer())
        upper, work, empty = layers
        last: OSError | None = None
        # In a user namespace other than the host's the trusted.* attributes overlayfs keeps are out of reach:
        # it needs ``userxattr`` there (the helper always runs in one; the second try is for other callers).
        for userxattr in (True, False):
            ctx = fsopen("overlay")
            try:
                fsconfig(ctx, FSCONFIG_SET_FD, "lowerdir+", None, empty)
                fsconfig(ctx, FSCONFIG_SET_FD, "upperdir", None, upper)
                fsconfig(ctx, FSCONFIG_SET_FD, "workdir", None, work)
                if userxattr:
                    fsconfig(ctx, FSCONFIG_SET_FLAG, "userxattr")
                fsconfig(ctx, FSCONFIG_CMD_CREATE)
                return fsmount(ctx, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
            except OSError as exc:
                last = exc
            finally:
                os.close(ctx)
        assert last is not None
        raise last
    finally:
        for fd in (*layers, tree):
            os.close(fd)


def openat2(dfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """``openat2(2)`` with ``RESOLVE_*`` restrictions on how ``path`` may be walked."""
    how = _OpenHow(flags, mode, resolve)
    return _check(
        _libc.syscall(_NR_OPENAT2, dfd, _path(path), ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))),
        "openat2",
        path,
    )


def setns(fd: int, nstype: int) -> None:
    """``setns(2)``: move the calling process (which must be single-threaded for a user namespace)."""
    _check(_libc.setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    """``unshare(2)``."""
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def ns_owner(ns_fd: int) -> int:
    """An fd on the user namespace that owns the namespace ``ns_fd`` refers to (``NS_GET_USERNS``)."""
    return fcntl.ioctl(ns_fd, NS_GET_USERNS)


@functools.cache
def new_mount_api_available() -> bool:
    """True when the kernel has ``open_tree``, ``move_mount``, ``mount_setattr`` and ``openat2`` (Linux 5.12+)."""
    for nr in (_NR_OPEN_TREE, _NR_MOVE_MOUNT, _NR_MOUNT_SETATTR, _NR_OPENAT2):
        # Invalid arguments: a kernel that knows the call answers EBADF/EINVAL/EFAULT, never ENOSYS.
        if _libc.syscall(nr, -1, None, 0, None, 0) < 0 and ctypes.get_errno() == errno.ENOSYS:
            return False
    return True


# ------------------------------------------------------------------------------------------------- attach


class AttachResult:
    """What the helper reports after a successful attach (a plain class: the helper imports as little as it can,
    since its start-up is part of every provision with a read-only directory)."""

    __slots__ = ("created", "sealed", "target")

    def __init__(self, target: str, created: tuple[str, ...], sealed: bool = False) -> None:
        self.target = target
        self.created = created  # guest paths of the mount points it had to create (outermost first)
        self.sealed = sealed  # a read-only directory presented through sealed_overlay() (False: a plain bind)

    def __repr__(self) -> str:
        return f"AttachResult(target={self.target!r}, created={self.created!r}, sealed={self.sealed!r})"


class AttachFailed(Exception):
    """The helper could not attach the mount; ``stage`` says where (``source``, ``namespace``, ``target``,
    ``mount``), ``errno`` why (``ELOOP``: a symlink was met)."""

    def __init__(self, stage: str, err: int, message: str, target: str | None = None) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.errno = err
        self.message = message
        self.target = target  # the guest target of the mount that failed, when several were asked for


_RESOLVE = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_BENEATH


def _open_source(source: str) -> int:
    # From "/" with RESOLVE_BENEATH: the path is absolute and every component must be a real directory entry.
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return openat2(root, source.lstrip("/") or ".", os.O_PATH | os.O_CLOEXEC, _RESOLVE)
    finally:
        os.close(root)


def _make_entry(parent: int, name: str, directory: bool) -> None:
    if directory:
        os.mkdir(name, 0o755, dir_fd=parent)
    else:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=parent))


def _create(parent: int, name: str, directory: bool, root_dev: int) -> None:
    try:
        _make_entry(parent, name, directory)
        return
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
    # Read-only here. Only the sandbox's own root tmpfs (same superblock as "/", an in-memory filesystem with an
    # anonymous device) may be written through a private writable clone: a clone of a bind of a host directory
    # would write onto the host.
    st = os.fstat(parent)
    if st.st_dev != root_dev or os.major(st.st_dev) != 0:
        raise OSError(errno.EROFS, "the parent directory is read-only in the guest", name)
    clone = open_tree(parent, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH)
    try:
        mount_setattr(clone, "", AT_EMPTY_PATH, attr_clr=MOUNT_ATTR_RDONLY)
        _make_entry(clone, name, directory)
    finally:
        os.close(clone)


def _open_target(target: str, directory: bool) -> tuple[int, list[str]]:
    """An O_PATH fd on the guest path ``target`` (created if missing), never reached through a symlink."""
    parts = [p for p in target.split("/") if p]
    if not parts:
        raise OSError(errno.EBUSY, "cannot mount over the guest's root", target)
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    root_dev = os.fstat(fd).st_dev
    created: list[str] = []
    walked = ""
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            walked += "/" + name
            want_dir = directory or not last
            flags = os.O_PATH | os.O_CLOEXEC | (os.O_DIRECTORY if want_dir else 0)
            try:
                nfd = openat2(fd, name, flags, _RESOLVE)
            except FileNotFoundError:
                _create(fd, name, want_dir, root_dev)
                created.append(walked)
                nfd = openat2(fd, name, flags, _RESOLVE)
            parent_dev = os.fstat(fd).st_dev
            os.close(fd)
            fd = nfd
            if last:
                st = os.fstat(fd)
                if st.st_dev != parent_dev:
                    raise OSError(errno.EBUSY, "something is already mounted there", walked)
                if not directory and not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EISDIR, "a file source needs a file (or nothing) at the target", walked)
        return fd, created
    except BaseException:
        os.close(fd)
        raise


class MountRequest:
    """One mount for :func:`attach_all_into_namespace`: a host ``source`` at the guest ``target``.

    ``workdir`` (read-write directories only): an empty directory beside ``source`` on the same filesystem. The
    directory is then presented as the upper layer of an overlay (:func:`private_upper`), so that the guest's
    mountinfo shows paths relative to their common parent instead of the host path.
    """

    __slots__ = ("readonly", "source", "target", "workdir")

    def __init__(self, source: str, target: str, readonly: bool, workdir: str | None = None) -> None:
        self.source = source
        self.target = target
        self.readonly = readonly
        self.workdir = workdir


def _detached(request: MountRequest) -> tuple[int, bool, bool]:
    """(mount fd, is a directory, sealed) for ``request.source``, in the helper's own copy of the host's mounts."""
    if request.workdir is not None and not request.readonly:
        try:
            return private_upper(request.source, request.workdir), True, True
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR):
                raise  # a bad source is refused, never bound plainly instead
        # the overlay was refused (the filesystem or kernel cannot): a plain bind, reported as not sealed
    src = _open_source(request.source)
    try:
        mode = os.fstat(src).st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise OSError(errno.EINVAL, "the source is neither a directory nor a regular file", request.source)
        directory = stat.S_ISDIR(mode)
        tree = open_tree(src, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH | AT_RECURSIVE)
    finally:
        os.close(src)
    flags = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if request.readonly else 0)
    try:
        mount_setattr(tree, "", AT_EMPTY_PATH | AT_RECURSIVE, attr_set=flags, propagation=MS_PRIVATE)
        if not (request.readonly and directory):
            return tree, directory, False
        try:
            sealed = sealed_overlay(tree)
        except OSError:
            return tree, directory, False  # the plain read-only bind; the caller learns it is not sealed
    except BaseException:
        os.close(tree)
        raise
    os.close(tree)
    return sealed, directory, True


def seal_at(source: str, target: str) -> bool:
    """Mount a sealed read-only view of the host directory ``source`` (see :func:`sealed_overlay`) on the empty
    directory ``target``, in this process's own mount namespace, for a container engine to bind from there.

    Returns False, with nothing mounted, when ``source`` is not a directory or the kernel refuses the overlay;
    raises OSError for a source that cannot be opened (a symlink in its path among them). The caller owns the
    mount: :func:`detach` it when done.
    """
    tree, directory, sealed = _detached(MountRequest(source, target, True))
    try:
        if not (directory and sealed):
            return False
        move_mount(tree, "", _AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)
        return True
    finally:
        os.close(tree)


def detach(path: str) -> bool:
    """Lazily unmount the mount at ``path`` (``MNT_DETACH``); False when nothing is mounted there."""
    if _libc.umount2(_path(path), _MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):  # not a mount point, or gone
        return False
    raise OSError(err, f"umount2: {os.strerror(err)}", path)


def attach_all_into_namespace(userns_fd: int, mntns_fd: int, requests: list[MountRequest]) -> list[AttachResult]:
    """Attach each request (host ``source`` at guest ``target``) in the mount namespace ``mntns_fd``, in order.

    Changes the namespaces of the calling process for good: call it only in a helper process (see the module
    docstring for the steps and why they are safe). On failure, mounts attached before the failing one stay.
    """
    stage = "namespace"
    current = requests[0].target if requests else "/"
    try:
        setns(userns_fd, CLONE_NEWUSER)
        unshare(CLONE_NEWNS)
        prepared: list[tuple[int, bool, bool]] = []
        for request in requests:
            current = request.target
            stage = "source"
            prepared.append(_detached(request))
        stage = "namespace"
        setns(mntns_fd, CLONE_NEWNS)
        results: list[AttachResult] = []
        for request, (tree, directory, sealed) in zip(requests, prepared, strict=True):
            current = request.target
            stage = "target"
            dest, created = _open_target(request.target, directory)
            stage = "mount"
            move_mount(tree, "", dest, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)
            os.close(dest)
            results.append(AttachResult(target=request.target, created=tuple(created), sealed=sealed))
    except OSError as exc:
        raise AttachFailed(stage, exc.errno or 0, f"{exc.strerror or exc} ({exc.filename or current})",
                           target=current) from exc
    return results


def attach_into_namespace(userns_fd: int, mntns_fd: int, source: str, target: str, readonly: bool) -> AttachResult:
    """Bind ``source`` (host path) at ``target`` (guest path) in the mount namespace ``mntns_fd`` (see above)."""
    return attach_all_into_namespace(userns_fd, mntns_fd, [MountRequest(source, target, readonly)])[0]


def run_attach_helper(
    userns_fd: int, mntns_fd: int, source: str, target: str, readonly: bool, timeout: float = 30.0,
    workdir: str | None = None,
) -> AttachResult:
    """Run :func:`attach_into_namespace` in a fresh single-threaded interpreter; raises :class:`AttachFailed`."""
    return run_attach_all_helper(userns_fd, mntns_fd, [MountRequest(source, target, readonly, workdir)], timeout)[0]


def run_attach_all_helper(
    userns_fd: int, mntns_fd: int, requests: list[MountRequest], timeout: float = 30.0
) -> list[AttachResult]:
    """Run :func:`attach_all_into_namespace` in a fresh single-threaded interpreter; raises :class:`AttachFailed`."""
    import subprocess  # here, not at the top: the helper itself must start fast

    request = marshal.dumps({"mounts": [{"source": r.source, "target": r.target, "readonly": r.readonly,
                                         "workdir": r.workdir} for r in requests],
                             "userns_fd": userns_fd, "mntns_fd": mntns_fd})
    try:
        proc = subprocess.run(  # our own interpreter running this very file
            [sys.executable, "-I", "-S", os.path.abspath(__file__)],
            input=request,
            capture_output=True,
            pass_fds=(userns_fd, mntns_fd),
            close_fds=True,
            timeout=timeout,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            check=False,
        )
    except subprocess.TimeoutExpired:  # run() has killed it
        raise AttachFailed("helper", errno.ETIMEDOUT, f"the mount helper did not finish within {timeout:g} s"
                           ) from None
    try:
        reply: dict[str, Any] = marshal.loads(proc.stdout)  # noqa: S302 - our own child's reply
    except (ValueError, EOFError, TypeError):
        detail = proc.stderr.decode(errors="replace").strip()[-500:] or f"exit status {proc.returncode}"
        raise AttachFailed("helper", errno.EIO, f"the mount helper failed: {detail}") from None
    if "error" in reply:
        raise AttachFailed(reply["stage"], int(reply["errno"]), reply["error"], target=reply.get("target"))
    return [AttachResult(target=r["target"], created=tuple(r["created"]), sealed=bool(r["sealed"]))
            for r in reply["results"]]


def _main() -> int:
    request = marshal.loads(sys.stdin.buffer.read())  # noqa: S302 - from our own parent
    mounts = [MountRequest(m["source"], m["target"], bool(m["readonly"]), m["workdir"]) for m in request["mounts"]]
    try:
        results = attach_all_into_namespace(request["userns_fd"], request["mntns_fd"], mounts)
    except AttachFailed as exc:
        sys.stdout.buffer.write(marshal.dumps({"stage": exc.stage, "errno": exc.errno, "error": exc.message,
                                               "target": exc.target}))
        return 1
    sys.stdout.buffer.write(marshal.dumps({"results": [
        {"target": r.target, "created": list(r.created), "sealed": r.sealed} for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
