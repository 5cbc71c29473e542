"""The agent that runs inside a bwrap session (pid 1 of its pid namespace) and starts each exec.

It is started by bubblewrap with the listening unix socket as an inherited fd and never imports stockade: it
runs under the guest's own ``python3`` from a read-only bind, with the stdlib only (3.9+).

Why an agent inside rather than ``nsenter`` from outside: a process forked here inherits the sandbox's seccomp
filter, no_new_privs, dropped capabilities, namespaces and cgroup from its parent, so nothing has to be
re-applied per exec (machine-notes, "Things that bite" 4).

Protocol, one request per connection: the host sends a 4-byte big-endian length and a JSON object; the agent
answers with frames ``type (1 byte) | length (4 bytes) | payload``: ``o`` stdout bytes, ``e`` stderr bytes,
then exactly one final ``r`` (result JSON) or ``x`` (error JSON).

Each exec gets a *runner*: a forked child that marks itself a child subreaper and spawns the command. One
runner is forked ahead of time while the agent is idle and waits for its request, so an exec does not wait for
a fork. Every
descendant of the command that is orphaned is re-parented to the runner, so on timeout the runner can find and
kill the exec's whole tree, double-forked daemons included, by walking the process table of the namespace.
When the command exits normally the runner exits too, and background processes live on (reaped by the agent).

The agent is pid 1 (``bwrap --as-pid-1``): the kernel delivers no signal from inside the namespace to an init
that has no handler for it, so ``kill -9 -1`` in a command cannot take the session's agent down.
"""

import ctypes
import errno
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
READ_SIZE = 65536

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option, value):
    _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                ctypes.c_ulong(0))


def _children_of(root):
    """All descendants of ``root`` found by walking /proc (the pid namespace is private and small)."""
    parents = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: the fields start after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        parents[int(name)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        nxt = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in found}
        found |= nxt
        frontier = nxt
    return found


def _kill_tree_and_exit():
    me = os.getpid()
    for _ in range(1000):
        kids = _children_of(me)
        if not kids:
            break
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.001)
                break
    os._exit(0)


def _which(name, env):
    if "/" in name:
        return name
    for directory in env.get("PATH", "").split(":"):
        path = os.path.join(directory or ".", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(errno.ENOENT, "command not found", name)


def _run_runner(req, stdin_r, stdout_w, stderr_w, status_w):
    """In the runner child: start the command, report how it ended on ``status_w``, then exit."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGUSR1, lambda *_: _kill_tree_and_exit())
    env = req["env"]
    stage = "cwd"
    try:
        os.chdir(req["cwd"])
        stage = "exec"
        path = _which(req["argv"][0], env)
        # posix_spawn uses vfork: a second Python fork() costs about a millisecond on small VMs.
        pid = os.posix_spawn(
            path,
            req["argv"],
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, stdin_r, 0),
                (os.POSIX_SPAWN_DUP2, stdout_w, 1),
                (os.POSIX_SPAWN_DUP2, stderr_w, 2),
            ],
            setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGUSR1, signal.SIGCHLD, signal.SIGINT, signal.SIGQUIT),
        )
    except OSError as exc:
        os.write(status_w, ("F %s %d" % (stage, exc.errno or 0)).encode())
        os._exit(0)
    for fd in (stdin_r, stdout_w, stderr_w):
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        os.write(status_w, b"S %d" % os.WTERMSIG(status))
    else:
        os.write(status_w, b"X %d" % os.WEXITSTATUS(status))
    os._exit(0)


class Exec:
    """One running command as seen from the agent's loop."""

    def __init__(self, agent, conn, req):
        self.agent = agent
        self.conn = conn
        self.out_buf = bytearray()
        self.limit = int(req.get("max_output", 16 << 20))
        self.sent = {"o": 0, "e": 0}
        self.truncated = False
        self.status = None
        self.done = False
        self.timed_out = False
        self.started = time.monotonic()
        timeout = req.get("timeout")
        self.deadline = None if timeout is None else self.started + float(timeout)
        self.stdin_data = (req.get("stdin") or "").encode()
        self.open_streams = 2
        stdin_r, self.stdin_w = os.pipe2(os.O_CLOEXEC)
        self.stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
        self.stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
        self.status_r, status_w = os.pipe2(os.O_CLOEXEC)
        pid = agent.dispatch(req, (stdin_r, stdout_w, stderr_w, status_w))
        if pid is None:
            pid = os.fork()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                # The runner must hold nothing of the agent: no listening socket, no other connections.
                keep = {stdin_r, stdout_w, stderr_w, status_w}
                # This exec's own parent-side ends too: a runner holding stdin_w would keep the command
                # from ever seeing end-of-input.
                ours = [self.stdin_w, self.stdout_r, self.stderr_r, self.status_r]
                for fd in agent.owned_fds() + ours:
                    if fd not in keep:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                _run_runner(req, stdin_r, stdout_w, stderr_w, status_w)
            finally:
                os._exit(127)
        self.runner = pid
        self.runner_reaped = False
        for fd in (stdin_r, stdout_w, stderr_w, status_w):
            os.close(fd)
        for fd in (self.stdout_r, self.stderr_r, self.status_r, self.stdin_w):
            os.set_blocking(fd, False)
        sel = agent.sel
        sel.register(self.stdout_r, selectors.EVENT_READ, ("out", self, "o"))
        sel.register(self.stderr_r, selectors.EVENT_READ, ("out", self, "e"))
        sel.register(self.status_r, selectors.EVENT_READ, ("status", self, None))
        if self.stdin_data:
            sel.register(self.stdin_w, selectors.EVENT_WRITE, ("stdin", self, None))
        else:
            os.close(self.stdin_w)
            self.stdin_w = -1

    def fds(self):
        return [fd for fd in (self.stdout_r, self.stderr_r, self.status_r, self.stdin_w) if fd >= 0]

    def on_stdin(self):
        try:
            n = os.write(self.stdin_w, self.stdin_data[:READ_SIZE])
        except BlockingIOError:
            return
        except OSError:  # the command closed its stdin: the rest is not wanted
            n = len(self.stdin_data)
        self.stdin_data = self.stdin_data[n:]
        if not self.stdin_data:
            self._close_fd("stdin_w")

    def on_output(self, fd, kind):
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            if not data:
                self._close_fd("stdout_r" if kind == "o" else "stderr_r")
                self.open_streams -= 1
                self.maybe_finish()
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

    def on_status(self):
        try:
            data = os.read(self.status_r, 512)
        except BlockingIOError:
            return
        self._close_fd("status_r")
        if not self.runner_reaped:
            # Not waited for: the runner has reported and only its own exit is left (tearing down a forked
            # copy of the agent takes about a millisecond); the agent, pid 1, reaps it on SIGCHLD.
            try:
                os.waitpid(self.runner, os.WNOHANG)
            except ChildProcessError:
                pass
        self.status = data.decode() if data else "T"
        if self.timed_out:
            self.status = "T"
        # The command is gone; whatever it wrote is already in the pipes. Drain without waiting for EOF,
        # which a background process holding the pipe could delay forever.
        for fd, kind in ((self.stdout_r, "o"), (self.stderr_r, "e")):
            if fd >= 0:
                self.on_output(fd, kind)
        self.finish()

    def maybe_finish(self):
        if self.status is not None and self.open_streams == 0:
            self.finish()

    def on_deadline(self):
        self.timed_out = True
        self.deadline = None
        try:
            os.kill(self.runner, signal.SIGUSR1)
        except ProcessLookupError:
            pass

    def finish(self):
        if self.done:
            return
        self.done = True
        for name in ("stdout_r", "stderr_r", "stdin_w", "status_r"):
            self._close_fd(name)
        status = self.status or "T"
        result = {
            "timed_out": self.timed_out,
            "truncated": self.truncated,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
        }
        if status.startswith("F "):
            stage, _, num = status[2:].partition(" ")
            code = int(num or 0)
            self.conn.finish(b"x", {"error": "start_failed", "stage": stage, "errno": code,
                                    "message": os.strerror(code) if code else "could not start"})
        else:
            if status.startswith("X "):
                result["exit_code"] = int(status[2:])
            elif status.startswith("S "):
                result["exit_code"] = 128 + int(status[2:])
                result["signal"] = int(status[2:])
            else:
                result["exit_code"] = 128 + signal.SIGKILL
                result["signal"] = signal.SIGKILL
            self.conn.finish(b"r", result)
        self.agent.execs.discard(self)
        self.agent.last_activity = time.monotonic()

    def _close_fd(self, name):
        fd = getattr(self, name)
        if fd >= 0:
            try:
                self.agent.sel.unregister(fd)
            except (KeyError, ValueError):
                pass
            os.close(fd)
            setattr(self, name, -1)


class Conn:
    """One host connection: a request in, frames out."""

    def __init__(self, agent, sock):
        self.agent = agent
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closing = False
        self.closed = False
        self.exec = None
        self.request_seen = False
        sock.setblocking(False)
        agent.sel.register(sock, selectors.EVENT_READ, ("conn", self, None))

    def on_readable(self):
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # The host went away (cancelled or timed out on its side): an exec it no longer waits for is
            # killed rather than left running unobserved.
            if self.exec is not None and self.exec.status is None:
                self.exec.on_deadline()
            self.close()
            return
        if self.request_seen:
            return
        self.inbuf += data
        if len(self.inbuf) >= 4:
            (size,) = struct.unpack(">I", self.inbuf[:4])
            if size > (64 << 20):
                self.request_seen = True
                self.finish(b"x", {"error": "bad_request", "message": "request too large"})
                return
            if len(self.inbuf) >= 4 + size:
                self.request_seen = True
                body = bytes(self.inbuf[4:4 + size])
                self.inbuf = bytearray()
                self.agent.handle(self, body)

    def frame(self, kind, payload):
        if self.closed:
            return
        self.outbuf += kind + struct.pack(">I", len(payload)) + payload
        self.flush()

    def finish(self, kind, obj):
        self.frame(kind, json.dumps(obj).encode())
        self.closing = True
        self.flush()

    def flush(self):
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
        self.agent.sel.modify(self.sock, events, ("conn", self, None))

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            self.agent.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.agent.conns.discard(self)
        self.sock.close()


def _spare_main(chan):
    """In a spare runner: wait for one request and its four pipe ends, then become that exec's runner."""
    try:
        msg, fds, _flags, _addr = socket.recv_fds(chan, 1 << 20, 4)
    except OSError:
        os._exit(0)
    chan.close()
    if not msg or len(fds) != 4:
        os._exit(0)
    _run_runner(json.loads(msg), *fds)


class Agent:
    def __init__(self, listen_fd):
        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(fileno=listen_fd)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, ("accept", None, None))
        self.execs = set()
        self.conns = set()
        self.last_activity = time.monotonic()
        self.wake_fds = ()  # type: tuple[int, ...]
        # A runner forked ahead of time: an exec hands it the request instead of forking (a Python fork()
        # costs about a millisecond here). A new spare is forked when the agent is idle.
        self.spare = None  # (pid, channel socket) or None

    def owned_fds(self):
        fds = [self.listener.fileno(), self.sel.fileno() if hasattr(self.sel, "fileno") else -1]
        for conn in self.conns:
            fds.append(conn.sock.fileno())
        for ex in self.execs:
            fds.extend(ex.fds())
        fds.extend(self.wake_fds)
        if self.spare is not None:
            fds.append(self.spare[1].fileno())
        return [fd for fd in fds if fd >= 0]

    def make_spare(self):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd in [*self.owned_fds(), parent.fileno()]:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                _spare_main(child)
            finally:
                os._exit(127)
        child.close()
        self.spare = (pid, parent)

    def dispatch(self, req, fds):
        """Hand an exec to the spare runner; its pid, or None when there is none (the caller forks)."""
        if self.spare is None:
            return None
        pid, chan = self.spare
        self.spare = None
        runner_req = {"argv": req["argv"], "cwd": req["cwd"], "env": req["env"]}
        try:
            socket.send_fds(chan, [json.dumps(runner_req).encode()], list(fds))
        except OSError:  # the spare died (a guest can kill it: same uid), or the request is too large
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return None
        finally:
            chan.close()
        return pid

    def handle(self, conn, body):
        try:
            req = json.loads(body)
            op = req.get("op")
            if op == "ping":
                conn.finish(b"r", {"ok": True, "pid": os.getpid()})
            elif op == "status":
                idle = 0.0 if self.execs else time.monotonic() - self.last_activity
                conn.finish(b"r", {"execs": len(self.execs), "idle_seconds": round(idle, 3)})
            elif op == "exec":
                self.last_activity = time.monotonic()
                conn.exec = Exec(self, conn, req)
                self.execs.add(conn.exec)
            else:
                conn.finish(b"x", {"error": "bad_request", "message": "unknown op %r" % (op,)})
        except (ValueError, KeyError, TypeError) as exc:
            conn.finish(b"x", {"error": "bad_request", "message": str(exc)})
        except OSError as exc:
            conn.finish(b"x", {"error": "agent_failed", "errno": exc.errno or 0, "message": str(exc)})

    def _current(self, what, obj, fd):
        if what == "conn":
            return not obj.closed and obj.sock.fileno() == fd
        if what == "out":
            return fd in (obj.stdout_r, obj.stderr_r)
        if what == "status":
            return fd == obj.status_r
        if what == "stdin":
            return fd == obj.stdin_w
        return True

    def reap_orphans(self):
        # As pid 1 of the namespace the agent inherits every orphan; runners are waited for by their Exec.
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for ex in self.execs:
                if ex.runner == pid:
                    ex.runner_reaped = True
            if self.spare is not None and self.spare[0] == pid:
                self.spare[1].close()
                self.spare = None

    def run(self):
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(wake_r, selectors.EVENT_READ, ("wake", None, None))
        self.wake_fds = (wake_r, wake_w)
        while True:
            now = time.monotonic()
            deadlines = [ex.deadline for ex in self.execs if ex.deadline is not None]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            for key, mask in self.sel.select(timeout):
                what, obj, extra = key.data
                # One batch can hold events for fds that an earlier handler of the same batch closed (an exec
                # that finished closes its pipes; a connection that finished closes its socket), and the fd
                # number may already belong to something new: act only on registrations still current.
                if not self._current(what, obj, key.fd):
                    continue
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
                        while os.read(key.fd, 512):
                            pass
                    except BlockingIOError:
                        pass
            self.reap_orphans()
            now = time.monotonic()
            for ex in list(self.execs):
                if ex.deadline is not None and now >= ex.deadline:
                    ex.on_deadline()
            if self.spare is None and not self.execs:
                self.make_spare()


def main():
    # Commands run as this agent's descendants; keep /proc/<agent> closed to them.
    _prctl(PR_SET_DUMPABLE, 0)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    listen_fd = int(sys.argv[1])
    ready_fd = int(sys.argv[2]) if len(sys.argv) > 2 else -1
    agent = Agent(listen_fd)
    if ready_fd >= 0:
        os.write(ready_fd, b"ready %d\n" % os.getpid())
        os.close(ready_fd)
    try:
        agent.run()
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        sys.stderr.write("stockade agent failed: %r\n" % (exc,))
        raise
    return errno.EIO


if __name__ == "__main__":
    sys.exit(main())
