"""The escape suite: attack a backend the way real sandboxes have been broken, judged by host canaries.

Opt-in (it attacks, and takes longer than the contract suite): ``ConformanceOptions(suites=("escape",))``,
``stockade doctor --suite escapes``, or ``make_escape_tests(factory)`` in a backend's test module. Case ids
are ``escape.<area>.<attack>``:

- ``escape.fs.*``: outside reads and writes, ``..``, ``/proc/<pid>/root``, leaked descriptors, read-only
  mounts, symlinks and hard links, device nodes, ``/dev``, setuid, ``/proc/sys`` and ``/sys``, mount
  syscalls, other sessions' files, live mounts racing a symlink swap;
- ``escape.proc.*``: host processes (visibility, signals, ptrace), the supervisor, capabilities, seccomp and
  no_new_privs on every thread, blocked system calls told apart from allowed ones by bad pointers, TIOCSTI,
  ``/proc/self/exe``, nested user namespaces;
- ``escape.net.*``: TCP, UDP, ICMP, raw and packet sockets, DNS, pathname and abstract unix sockets of host
  daemons, IPv4 and IPv6;
- ``escape.res.*``: fork bomb, memory bomb, filling /tmp and every other writable place, descriptors, a CPU
  spin past its timeout, daemons left after terminate, zombies, an output flood, unread stdin;
- ``escape.leak.*``: host environment, hostname, host paths in /proc, kernel logs and symbols, another
  session's /tmp, /dev/shm and abstract sockets;
- ``escape.life.*`` and ``escape.input.*``: racing terminate, concurrent execs, snapshots during writes,
  policy after resume and restore, terminate during provision, session ids, invalid input at every entry
  point.

A case the backend cannot run (it honestly lacks the capability) ends ``not_applicable`` after the refusal is
measured, or ``not_measured`` when this host cannot stage the attack; never ``conforms``. Resource attacks
are bounded by the limits they run under and by their own size, so a backend that fails them cannot take the
host down. docs/escape-suite.md lists every case, where it comes from, and the verdicts per backend.
"""

from ..context import opt_in_suite

SUITE = "escape"

opt_in_suite(
    SUITE,
    "attacks modelled on real sandbox escapes (bubblewrap, runc, gVisor, Firecracker's jailer, sandbox-runtime, "
    "Codex's Linux sandbox); judged by host canaries",
    aliases=("escapes",),
)

# Registers the cases, in run order.
from . import fs_paths, fs_kernel, fs_live, proc, net, res, leak, life, input  # noqa: E402, F401, I001

__all__ = ["SUITE"]
