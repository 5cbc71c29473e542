"""The per-session supervisor of a ``landlock`` session: one unconfined process that owns everything the
session runs.

Started detached by ``provision`` (``python -I -S -B _supervisor.py``, stdlib only, so it starts fast and
does not depend on how stockade is installed). It receives its configuration as JSON on stdin and, as
inherited fds, the listening control socket, the Landlock ruleset and the seccomp programs.

Process tree::

    supervisor   unconfined, child subreaper, not dumpable; accepts requests on the control socket
    └── zygote   forked once per session domain, then confined for good: (root: per-session uid and gid,)
        │        rlimits, no_new_privs, Landlock restrict_self, seccomp. Every exec is forked from it, so all
        │        execs share one Landlock domain (on ABI >= 6 they can signal each other and nothing else)
        └── runner   one per exec, a child subreaper, forked from the zygote *before* the request arrives (a
            │        spare waits on the request socket; the zygote forks the next one while this exec runs):
            │        sets cwd and the per-exec rlimits, posix_spawns the command, reports how it ended.
            │        Orphans of the exec are re-parented to it, so on timeout the supervisor stops it and
            │        kills its whole subtree, double forks and setsid daemons included
            └── command

When a command exits, its runner exits and whatever it left in the background is re-parented to the
supervisor, which reaps it and kills it at ``terminate`` (with every other descendant). Confinement is
applied once, in the zygote, so a runner or command can never be less confined than the session.

Protocol, one request per connection: a 4-byte big-endian length and a JSON object carrying the session's
token (the socket file is reachable by the guest's uid when it is the host user's, so the token, which the
guest cannot read, is what authenticates); answers are frames ``kind (1 byte) | length (4 bytes) | payload``:
``o``/``e`` output bytes, then exactly one ``r`` (result JSON) or ``x`` (error JSON).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import hmac
import json
import os
import resource
import select
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any

PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
SYS_LANDLOCK_RESTRICT_SELF = 446
READ_SIZE = 65536
MAX_REQUEST = 64 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _prctl(option: int, value: int) -> None:
    ulong = ctypes.c_ulong
    if _libc.prctl(ctypes.c_int(option), ulong(value), ulong(0), ulong(0), ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _load_seccomp(program: bytes) -> None:
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    ulong = ctypes.c_ulong
    if _libc.prctl(PR_SET_SECCOMP, ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), ulong(0), ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {os.strerror(err)}")


def _restrict_self(ruleset_fd: int) -> None:
    if _libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset_fd), ctypes.c_uint32(0)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")


def _close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, across its threads (``/proc/<pid>/task/<tid>/children``)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def descendants(root: int) -> list[int]:
    """Every descendant of ``root``, parents before their children. Walks only the subtree, so it stays cheap
    however many processes the host runs."""
    found: list[int] = []
    seen = {root}
    frontier = [root]
    while frontier:
        nxt = []
        for pid in frontier:
            for child in _children(pid):
                if child not in seen:
                    seen.add(child)
                    nxt.append(child)
        found += nxt
        frontier = nxt
    return found


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return "X"
    return data[data.rfind(b")") + 2 :].split()[0].decode()


def _reap_any() -> list[int]:
    reaped: list[int] = []
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append(pid)


def kill_descendants(root: int, *, reap: bool, rounds: int = 5000) -> None:
    """SIGKILL every descendant of ``root`` (a child subreaper, so orphans of the killed stay in its subtree),
    repeating until none is left alive: a killed process can no longer fork. ``reap``: ``root`` is the
    caller, which also collects the dead."""
    for _ in range(rounds):
        live = [pid for pid in descendants(root) if _state(pid) not in ("Z", "X")]
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if reap:
            _reap_any()
        if not live:
            if not reap or not descendants(root):
                return
            time.sleep(0.001)  # zombies whose parents are still dying: let the kernel re-parent them


def kill_exec_tree(runner: int) -> None:
    """Kill an exec's whole tree from outside: stop its runner (a subreaper, so nothing leaves its subtree
    while it lives), kill everything below it, then the runner itself."""
    try:
        os.kill(runner, signal.SIGSTOP)
    except ProcessLookupError:
        return
    kill_descendants(runner, reap=False)
    with contextlib.suppress(ProcessLookupError):
        os.kill(runner, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------- runner


def _which(name: str, path: str) -> str:
    if "/" in name:
        return name
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(errno.ENOENT, "command not found", name)


def _run_runner(req: dict[str, Any], stdin_r: int, stdout_w: int, stderr_w: int, status_w: int) -> None:
    """In the runner (already a child subreaper, so the exec's orphans stay in its subtree; the fds arrive
    close-on-exec, so only 0, 1, 2 go on): start the command, report how it ended on ``status_w``, then exit.
    Timeouts are enforced from outside (:func:`kill_exec_tree`)."""
    # First, so that a timeout can kill the runner even if it hangs before the command starts (a cwd on a
    # stuck mount).
    os.write(status_w, b"R %d\n" % os.getpid())
    stage = "cwd"
    try:
        os.chdir(req["cwd"])
        stage = "exec"
        env = req["env"]
        argv = req["argv"]
        path = _which(argv[0], env.get("PATH", ""))
        # The per-exec limits go on the runner itself and are inherited: posix_spawn (vfork) cannot set them.
        for name, value in req.get("rlimits", {}).items():
            limit = int(value)
            resource.setrlimit(getattr(resource, name), (limit, limit))
        pid = os.posix_spawn(
            path,
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, stdin_r, 0),
                (os.POSIX_SPAWN_DUP2, stdout_w, 1),
                (os.POSIX_SPAWN_DUP2, stderr_w, 2),
            ],
            setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGCHLD, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM,
                       signal.SIGUSR1),
        )
    except OSError as exc:
        os.write(status_w, f"F {stage} {exc.errno or errno.EIO}\n".encode())
        os._exit(0)
    for fd in (stdin_r, stdout_w, stderr_w):
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        os.write(status_w, b"S %d\n" % os.WTERMSIG(status))
    else:
        os.write(status_w, b"X %d\n" % os.WEXITSTATUS(status))
    os._exit(0)


# ------------------------------------------------------------------------------------------------- zygote


def _confine(config: dict[str, Any], ruleset_fd: int, programs: list[bytes]) -> None:
    """Apply the session's confinement to this process for good (the zygote, before it serves)."""
    for name, value in config.get("rlimits", {}).items():
        limit = int(value)
        resource.setrlimit(getattr(resource, name), (limit, limit))
    uid, gid = config.get("uid"), config.get("gid")
    if os.geteuid() == 0:
        # Empty the bounding and ambient sets while we may: nothing exec'd later can ever regain a capability.
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
        for cap in range(last + 1):
            _prctl(PR_CAPBSET_DROP, cap)
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    if gid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
    if uid is not None:
        os.setresuid(uid, uid, uid)  # from root to another uid: every capability goes with it
    os.umask(0o022)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _restrict_self(ruleset_fd)
    os.close(ruleset_fd)
    for program in programs:
        _load_seccomp(program)
    # Commands run as descendants of the same uid and domain: keep /proc/<zygote> (memory, fds) closed.
    _prctl(PR_SET_DUMPABLE, 0)


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One request (JSON) and the fds that came with it, close-on-exec; an empty request means the supervisor
    is gone."""
    fds = array.array("i")
    msg, ancdata, _flags, _addr = sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * fds.itemsize),
                                               socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return msg, list(fds)


def _spare_runner(sock: socket.socket, taken_w: int) -> None:
    """A runner forked ahead of need: waits on the shared request socket, tells the zygote it was taken (so a
    new spare is forked while this exec runs), then runs the exec. Never returns."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # Work that does not depend on the request is done while waiting for one.
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    # Touch now what serving a request touches, so that the copy-on-write faults of a fresh fork are paid
    # while waiting, not after the request arrived.
    json.loads(json.dumps({"argv": ["true"], "cwd": "/", "env": {"PATH": "/usr/bin"}, "rlimits": {}}))
    with contextlib.suppress(OSError):
        _which("true", "/usr/bin:/bin")
    received: list[int] = []
    try:
        msg, received = _receive(sock)
        if not msg:
            os._exit(0)
        os.write(taken_w, b"t")
        os.close(taken_w)
        sock.close()
        req = json.loads(msg)
        if len(received) != 4:
            raise ValueError(f"expected 4 fds, got {len(received)}")
        _run_runner(req, *received)
    except (OSError, ValueError) as exc:
        if len(received) == 4:
            with contextlib.suppress(OSError):
                os.write(received[3], f"F setup {getattr(exc, 'errno', 0) or errno.EIO}\n".encode())
    finally:
        os._exit(127)


def _zygote_main(sock: socket.socket) -> None:
    """Keep one spare runner waiting on the request socket; fork the next one as soon as it is taken.

    The fork (the slow part of starting an exec from Python) thus happens while the previous exec runs, not
    when a request arrives. Exits when the supervisor closes its end of the socket.
    """
    taken_r, taken_w = os.pipe2(os.O_CLOEXEC)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the poll below (through wake_r) to reap
    poller = select.poll()
    poller.register(taken_r, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    poller.register(sock, select.POLLRDHUP)  # hang-up only: pending requests are the spare's to read
    sock.send(b"ready")
    spare = 0
    busy = 0  # the runner that took the last spare
    busy_since = 0.0
    while True:
        # The next spare is forked once the busy runner is done, or after a short while: forking beside a
        # short exec would slow it down on a small machine, and a long exec must not hold up the next one.
        if not spare and (not busy or time.monotonic() - busy_since >= 0.02):
            busy = 0
            spare = os.fork()
            if spare == 0:
                os.close(taken_r)
                _spare_runner(sock, taken_w)
        timeout = None if spare else max(0.0, 20 - (time.monotonic() - busy_since) * 1000)
        for fd, _event in poller.poll(timeout):
            if fd == sock.fileno():
                os._exit(0)
            with contextlib.suppress(BlockingIOError):
                data = os.read(fd, 512)
                if fd == taken_r and data:
                    busy, busy_since, spare = spare, time.monotonic(), 0
        while True:  # reap finished runners; a spare that died untaken (killed) is replaced
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == spare:
                spare = 0
            if pid == busy:
                busy = 0


# ---------------------------------------------------------------------------------------------- supervisor


class Exec:
    """One running command as the supervisor sees it."""

    def __init__(self, sup: Supervisor, conn: Conn, req: dict[str, Any]) -> None:
        self.sup = sup
        self.conn = conn
        self.limit = int(req.get("max_output", 16 << 20))
        self.sent = {"o": 0, "e": 0}
        self.truncated = False
        self.status: str | None = None
        self.status_buf = b""
        self.runner = 0
        self.done = False
        self.timed_out = False
        self.started = time.monotonic()
        timeout = req.get("timeout")
        self.deadline: float | None = None if timeout is None else self.started + float(timeout)
        self.stdin_data = (req.get("stdin") or "").encode()
        payload = {"argv": req["argv"], "cwd": req["cwd"], "env": req["env"], "rlimits": sup.exec_rlimits}
        stdin_r, self.stdin_w = os.pipe2(os.O_CLOEXEC)
        self.stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
        self.stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
        self.status_r, status_w = os.pipe2(os.O_CLOEXEC)
        try:
            sup.send_to_zygote(json.dumps(payload).encode(), [stdin_r, stdout_w, stderr_w, status_w])
        except BaseException:
            for fd in (self.stdin_w, self.stdout_r, self.stderr_r, self.status_r):
                os.close(fd)
            raise
        finally:
            for fd in (stdin_r, stdout_w, stderr_w, status_w):
                os.close(fd)
        for fd in (self.stdout_r, self.stderr_r, self.status_r, self.stdin_w):
            os.set_blocking(fd, False)
        sel = sup.sel
        sel.register(self.stdout_r, selectors.EVENT_READ, ("out", self, "o"))
        sel.register(self.stderr_r, selectors.EVENT_READ, ("out", self, "e"))
        sel.register(self.status_r, selectors.EVENT_READ, ("status", self, None))
        if self.stdin_data:
            sel.register(self.stdin_w, selectors.EVENT_WRITE, ("stdin", self, None))
        else:
            self._close_fd("stdin_w")

    def fds(self) -> list[int]:
        return [fd for fd in (self.stdout_r, self.stderr_r, self.status_r, self.stdin_w) if fd >= 0]

    def on_stdin(self) -> None:
        if self.stdin_w < 0:
            return
        try:
            n = os.write(self.stdin_w, self.stdin_data[:READ_SIZE])
        except BlockingIOError:
            return
        except OSError:  # the command closed its stdin: the rest is not wanted
            n = len(self.stdin_data)
        self.stdin_data = self.stdin_data[n:]
        if not self.stdin_data:
            self._close_fd("stdin_w")

    def on_output(self, fd: int, kind: str) -> None:
        # One select() batch can hold events for fds an earlier event of the batch closed (and the number may
        # already belong to a new exec): act only on fds this exec still owns.
        if fd < 0 or fd != (self.stdout_r if kind == "o" else self.stderr_r):
            return
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            if not data:
                self._close_fd("stdout_r" if kind == "o" else "stderr_r")
                return
            room = self.limit - self.sent[kind]
            if room <= 0:
                self.truncated = True  # keep reading so the command never blocks on a full pipe
                continue
            if len(data) > room:
                data = data[:room]
                self.truncated = True
            self.sent[kind] += len(data)
            self.conn.frame(kind.encode(), data)

    def on_status(self) -> None:
        if self.status_r < 0:
            return
        while True:
            try:
                data = os.read(self.status_r, 512)
            except BlockingIOError:
                return
            if not data:
                break
            self.status_buf += data
            while b"\n" in self.status_buf:
                line, _, self.status_buf = self.status_buf.partition(b"\n")
                text = line.decode(errors="replace")
                if text.startswith("R "):
                    self.runner = int(text[2:])
                    if self.timed_out:  # the deadline passed before the runner said who it is
                        self._signal_runner()
                else:
                    self.status = text
            if self.status is not None:
                # The runner has reaped the command and reported: finish now rather than at end-of-file,
                # which comes only once the runner (a forked Python process) has torn itself down.
                break
        # The runner reported how the command ended, or it is gone (killed).
        self._close_fd("status_r")
        # The command is gone; whatever it wrote is in the pipes. Drain without waiting for end-of-file,
        # which a background process holding the pipe could delay forever.
        for fd, kind in ((self.stdout_r, "o"), (self.stderr_r, "e")):
            if fd >= 0:
                self.on_output(fd, kind)
        self.finish()

    def on_deadline(self) -> None:
        self.timed_out = True
        self.deadline = None
        self._signal_runner()

    def _signal_runner(self) -> None:
        if self.runner:
            kill_exec_tree(self.runner)  # SIGKILL also ends processes a suspended session has stopped

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        for name in ("stdout_r", "stderr_r", "stdin_w", "status_r"):
            self._close_fd(name)
        status = self.status or "T"
        result: dict[str, Any] = {
            "timed_out": self.timed_out,
            "truncated": self.truncated,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
        }
        if status.startswith("F ") and not self.timed_out:
            parts = status[2:].split(" ", 2)
            code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self.conn.finish(b"x", {"error": "start_failed", "stage": parts[0], "errno": code,
                                    "message": os.strerror(code) if code else " ".join(parts[2:])})
        else:
            if self.timed_out or not (status.startswith("X ") or status.startswith("S ")):
                result["exit_code"] = 128 + signal.SIGKILL
                result["signal"] = int(signal.SIGKILL)
            elif status.startswith("X "):
                result["exit_code"] = int(status[2:])
            else:
                result["exit_code"] = 128 + int(status[2:])
                result["signal"] = int(status[2:])
            self.conn.finish(b"r", result)
        self.sup.execs.discard(self)
        self.sup.last_activity = time.monotonic()

    def _close_fd(self, name: str) -> None:
        fd: int = getattr(self, name)
        if fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.sup.sel.unregister(fd)
            os.close(fd)
            setattr(self, name, -1)


class Conn:
    """One client connection: a request in, frames out."""

    def __init__(self, sup: Supervisor, sock: socket.socket) -> None:
        self.sup = sup
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closing = False
        self.closed = False
        self.exec: Exec | None = None
        self.request_seen = False
        sock.setblocking(False)
        sup.sel.register(sock, selectors.EVENT_READ, ("conn", self, None))

    def on_readable(self) -> None:
        if self.closed:
            return
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # The client went away (cancelled or timed out on its side): an exec nobody waits for is killed.
            if self.exec is not None and not self.exec.done:
                self.exec.on_deadline()
            self.close()
            return
        if self.request_seen:
            return
        self.inbuf += data
        if len(self.inbuf) >= 4:
            (size,) = struct.unpack(">I", self.inbuf[:4])
            if size > MAX_REQUEST:
                self.request_seen = True
                self.finish(b"x", {"error": "bad_request", "message": "request too large"})
                return
            if len(self.inbuf) >= 4 + size:
                self.request_seen = True
                body = bytes(self.inbuf[4 : 4 + size])
                self.inbuf = bytearray()
                self.sup.handle(self, body)

    def frame(self, kind: bytes, payload: bytes) -> None:
        if self.closed:
            return
        self.outbuf += kind + struct.pack(">I", len(payload)) + payload
        self.flush()

    def finish(self, kind: bytes, obj: dict[str, Any]) -> None:
        self.frame(kind, json.dumps(obj).encode())
        self.closing = True
        self.flush()

    def flush(self) -> None:
        if self.closed:
            return
        while self.outbuf:
            try:
                n = self.sock.send(self.outbuf)
            except BlockingIOError:
                break
            except OSError:
                self.outbuf.clear()
                break
            del self.outbuf[:n]
        if not self.outbuf and self.closing:
            self.close()
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0)
        self.sup.sel.modify(self.sock, events, ("conn", self, None))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self.sup.sel.unregister(self.sock)
        self.sup.conns.discard(self)
        self.sock.close()


class Supervisor:
    def __init__(self, config: dict[str, Any], listen_fd: int, ruleset_fd: int, programs: list[bytes]) -> None:
        self.config = config
        self.token = str(config["token"]).encode()
        self.exec_rlimits: dict[str, int] = dict(config.get("exec_rlimits", {}))
        self.ruleset_fd = ruleset_fd
        self.programs = programs
        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(fileno=listen_fd)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, ("accept", None, None))
        self.execs: set[Exec] = set()
        self.conns: set[Conn] = set()
        self.last_activity = time.monotonic()
        self.zygote_pid = 0
        self.zygote_sock: socket.socket | None = None
        self.suspended = False
        self.stopping = False
        self.wake_fds: tuple[int, ...] = ()
        idle = config.get("idle_timeout")
        self.idle_timeout: float | None = None if idle is None else float(idle)

    # -------------------------------------------------------------------------------------------- zygote

    def start_zygote(self) -> None:
        """Fork and confine a new zygote; raises OSError when it could not confine itself."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                parent.close()
                signal.set_wakeup_fd(-1)
                _close_all_but({0, 1, 2, child.fileno(), self.ruleset_fd})
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                os.close(devnull)
                os.chdir(self.config["home"])
                _confine(self.config, self.ruleset_fd, self.programs)
                code = 0
                _zygote_main(child)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    child.send(f"error {exc!r}".encode()[:1000])
            finally:
                os._exit(code or 1)
        child.close()
        parent.settimeout(30)
        try:
            answer = parent.recv(1024)
        except OSError as exc:
            answer = f"error no answer ({exc})".encode()
        if answer != b"ready":
            parent.close()
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            raise OSError(errno.EPERM, "the session's confinement could not be applied: "
                          + (answer.decode(errors="replace").removeprefix("error ") or "zygote died"))
        parent.settimeout(None)
        self.zygote_pid = pid
        self.zygote_sock = parent

    def send_to_zygote(self, payload: bytes, fds: list[int]) -> None:
        for attempt in range(2):
            if self.zygote_sock is None:
                self.start_zygote()
            assert self.zygote_sock is not None
            try:
                self.zygote_sock.sendmsg(
                    [payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                )
                return
            except OSError:
                # The zygote died (a command in the session can kill it): start a new one, once.
                self.drop_zygote()
                if attempt:
                    raise

    def drop_zygote(self) -> None:
        if self.zygote_sock is not None:
            self.zygote_sock.close()
            self.zygote_sock = None
        if self.zygote_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.zygote_pid, signal.SIGKILL)
            self.zygote_pid = 0

    # ----------------------------------------------------------------------------------------- requests

    def owned_fds(self) -> list[int]:
        fds = [self.listener.fileno(), self.ruleset_fd, *self.wake_fds]
        if self.zygote_sock is not None:
            fds.append(self.zygote_sock.fileno())
        fds += [conn.sock.fileno() for conn in self.conns]
        for ex in self.execs:
            fds += ex.fds()
        return [fd for fd in fds if fd >= 0]

    def handle(self, conn: Conn, body: bytes) -> None:
        try:
            req = json.loads(body)
            if not hmac.compare_digest(str(req.get("token", "")).encode(), self.token):
                conn.finish(b"x", {"error": "unauthorized", "message": "bad session token"})
                return
            op = req.get("op")
            if op == "ping":
                conn.finish(b"r", self.status())
            elif op == "exec":
                self.last_activity = time.monotonic()
                if self.suspended:
                    self.resume()
                conn.exec = Exec(self, conn, req)
                self.execs.add(conn.exec)
            elif op == "suspend":
                self.suspend()
                conn.finish(b"r", self.status())
            elif op == "resume":
                self.resume()
                conn.finish(b"r", self.status())
            elif op == "terminate":
                self.stopping = True
                kill_descendants(os.getpid(), reap=True)
                conn.finish(b"r", {"terminated": True})
            else:
                conn.finish(b"x", {"error": "bad_request", "message": f"unknown op {op!r}"})
        except (ValueError, KeyError, TypeError) as exc:
            conn.finish(b"x", {"error": "bad_request", "message": str(exc)})
        except OSError as exc:
            conn.finish(b"x", {"error": "supervisor_failed", "errno": exc.errno or 0, "message": str(exc)})

    def status(self) -> dict[str, Any]:
        idle = 0.0 if self.execs else time.monotonic() - self.last_activity
        return {"pid": os.getpid(), "execs": len(self.execs), "idle_seconds": round(idle, 3),
                "suspended": self.suspended, "zygote": self.zygote_pid}

    def suspend(self) -> None:
        """SIGSTOP every descendant, repeating until all are stopped (a process being stopped cannot fork)."""
        me = os.getpid()
        for _ in range(1000):
            pending = [p for p in descendants(me) if _state(p) not in ("T", "t", "Z", "X")]
            if not pending:
                break
            for pid in pending:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            time.sleep(0.001)
        self.suspended = True

    def resume(self) -> None:
        for pid in descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.suspended = False
        self.last_activity = time.monotonic()

    def reap(self) -> None:
        for pid in _reap_any():
            if pid == self.zygote_pid:
                self.zygote_pid = 0
                if self.zygote_sock is not None:
                    self.zygote_sock.close()
                    self.zygote_sock = None

    # -------------------------------------------------------------------------------------------- loop

    def run(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: None)
        self.sel.register(wake_r, selectors.EVENT_READ, ("wake", None, None))
        self.wake_fds = (wake_r, wake_w)
        term = False
        while not (self.stopping and not self.conns):
            now = time.monotonic()
            deadlines = [ex.deadline for ex in self.execs if ex.deadline is not None]
            if self.idle_timeout is not None and not self.suspended and not self.execs:
                deadlines.append(self.last_activity + self.idle_timeout)
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            for key, mask in self.sel.select(timeout):
                what, obj, extra = key.data
                if what == "accept":
                    while True:
                        try:
                            sock, _ = self.listener.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        self.conns.add(Conn(self, sock))
                elif what == "conn":
                    if mask & selectors.EVENT_READ:
                        obj.on_readable()
                    if mask & selectors.EVENT_WRITE and obj in self.conns:
                        obj.flush()
                elif what == "out":
                    obj.on_output(key.fd, extra)
                elif what == "status":
                    obj.on_status()
                elif what == "stdin":
                    obj.on_stdin()
                elif what == "wake":
                    try:
                        while True:
                            chunk = os.read(key.fd, 512)
                            if not chunk:
                                break
                            term = term or signal.SIGTERM in chunk
                    except BlockingIOError:
                        pass
            self.reap()
            if term and not self.stopping:
                # Someone asked the supervisor to go (host shutdown): take the whole session with it.
                self.stopping = True
                kill_descendants(os.getpid(), reap=True)
                for conn in list(self.conns):
                    conn.close()
            now = time.monotonic()
            for ex in list(self.execs):
                if ex.deadline is not None and now >= ex.deadline:
                    ex.on_deadline()
            idle_since = self.last_activity + (self.idle_timeout or 0)
            if self.idle_timeout is not None and not self.suspended and not self.execs and now >= idle_since:
                self.suspend()


def main() -> int:
    # argv: listen_fd ruleset_fd ready_fd seccomp_fd...; the JSON configuration arrives on stdin.
    listen_fd, ruleset_fd, ready_fd = (int(x) for x in sys.argv[1:4])
    seccomp_fds = [int(x) for x in sys.argv[4:]]
    config = json.loads(sys.stdin.buffer.read())
    programs = []
    for fd in seccomp_fds:
        with os.fdopen(fd, "rb") as f:
            programs.append(f.read())
    _prctl(PR_SET_DUMPABLE, 0)  # the token and the fds stay out of reach of same-uid processes
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sup = Supervisor(config, listen_fd, ruleset_fd, programs)
    try:
        sup.start_zygote()
    except OSError as exc:
        os.write(ready_fd, f"error {exc.strerror or exc}\n".encode())
        return 1
    os.write(ready_fd, b"ready %d\n" % os.getpid())
    os.close(ready_fd)
    sup.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
