"""Live mounts: ``attach_filesystem`` whose target the guest controls (runc CVE-2021-30465, the symlink
exchange race): a target that is, or is swapped for, a symlink to a host directory must never put the mount
on the host. Judged on the host: the victim directory's contents and the host's mount table.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import secrets
from pathlib import Path

import anyio

from ...errors import SandboxError, Unsupported
from ...models import FilesystemAccess, FilesystemMount
from ..context import CaseContext, Finding, Stop, case, conforms, escaped, not_applicable, overrefused, show
from ._support import RW_TARGET, canary_dir, gated, mount, need_python, require, run_py, scratch

__all__: list[str] = []

_MNT_DETACH = 2


def _host_mounts_under(path: Path) -> list[str]:
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4]
            if point == str(path) or point.startswith(f"{path}/"):
                found.append(point)
    return found


def _undo_host_mounts(path: Path) -> None:
    # Only reached when a backend put a mount on the host: take it away again before the directory goes.
    libc = ctypes.CDLL(None, use_errno=True)
    for point in reversed(_host_mounts_under(path)):
        libc.umount2(point.encode(), _MNT_DETACH)


async def _live_gate(ctx: CaseContext, session_id: str) -> None:
    """Without live_mounts, attach_filesystem must refuse (the case ends ``not_applicable``)."""
    if ctx.caps.live_mounts:
        return
    probe = FilesystemMount(source=str(ctx.host_dir()), target="/mnt/escape-live-probe")
    try:
        ctx.calls += 1
        await ctx.backend.attach_filesystem(session_id, probe)
    except Unsupported as exc:
        raise Stop(not_applicable(f"unsupported: no live_mounts, and attach_filesystem refuses ({exc})")) from exc
    raise Stop(escaped("capabilities lack live_mounts, yet attach_filesystem succeeded"))


async def _attach(ctx: CaseContext, session_id: str, m: FilesystemMount) -> str:
    """'attached', 'refused: ...', or 'unsupported: ...' (an overrefusal when live_mounts is claimed)."""
    ctx.calls += 1
    try:
        await ctx.backend.attach_filesystem(session_id, m)
    except Unsupported as exc:
        return f"unsupported: {exc}"
    except SandboxError as exc:
        return f"refused: {type(exc).__name__}: {exc}"
    return "attached"


def _claimed_but_refused(outcomes: dict[str, str]) -> Finding | None:
    refused = [o for o in outcomes.values() if o.startswith("unsupported")]
    if refused:
        return overrefused(f"live_mounts is claimed, but attach_filesystem refuses: {refused[0]}")
    return None


@case("escape.fs.attach_admitted")
async def attach_admitted(ctx: CaseContext) -> Finding:
    """Admitted sibling: a live read-only mount appears in the running session, readable and not writable."""
    directory, _f, content = canary_dir(ctx, writable=True)
    target = "/mnt/escape-live"
    async with ctx.session() as session:
        await _live_gate(ctx, session.id)
        outcome = await _attach(ctx, session.id, mount(directory, target))
        if outcome != "attached":
            return overrefused(f"a plain live mount was refused: {outcome}")
        result = await ctx.sh(session.id, f"cat {target}/canary.txt; echo x > {target}/new 2>/dev/null "
                                          "&& echo WROTE")
    if "WROTE" in result.stdout or (directory / "new").exists():
        return escaped(f"the read-only live mount was writable: {show(result)}")
    if content not in result.stdout:
        return overrefused(f"the live mount was not readable: {show(result)}")
    return conforms("the live mount appeared, readable and read-only")


_RACE = """
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
nr = {"x86_64": 316, "aarch64": 276}.get(os.uname().machine)
bases, victim, count, seconds = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
pairs = []
for base in bases:
    os.makedirs(base, exist_ok=True)
    for i in range(count):
        d, l = "%s/race%d" % (base, i), "%s/race%d-link" % (base, i)
        os.mkdir(d)
        os.symlink(victim, l)
        pairs.append((d, l))
    os.symlink(victim, base + "/plain-link")
print("stockade-race-ready", flush=True)
swaps, deadline = 0, time.monotonic() + seconds
while time.monotonic() < deadline and nr is not None:
    for d, l in pairs:
        if libc.syscall(ctypes.c_long(nr), -100, d.encode(), -100, l.encode(), 2) == 0:  # RENAME_EXCHANGE
            swaps += 1
emit({"swaps": swaps})
"""


@case("escape.fs.attach_race")
async def attach_race(ctx: CaseContext) -> Finding:
    """A live mount whose target the guest has made a symlink to a host directory, or keeps swapping between
    a directory and such a symlink while the host attaches (RENAME_EXCHANGE in a loop), never lands on the
    host: the victim directory keeps its contents and the host's mount table gains nothing there."""
    victim, _vf, victim_content = canary_dir(ctx, writable=True)
    ctx.on_cleanup(lambda: _undo_host_mounts(victim))
    source, _sf, _sc = canary_dir(ctx)
    rw = ctx.host_dir(0o777)
    m = mount(rw, RW_TARGET, writable=True)
    await gated(ctx, ctx.spec(mounts=(m,)), "a spec with mounts")
    count = 3
    outcomes: dict[str, str] = {}
    race: dict[str, object] = {}
    async with ctx.session(mounts=(m,)) as session:
        await _live_gate(ctx, session.id)
        await need_python(ctx, session.id)
        # A writable mount and the guest's own temporary directory: both are the guest's to swap.
        tmp = (await ctx.sh(session.id, 'printf %s "${TMPDIR:-/tmp}"')).stdout.strip() or "/tmp"
        bases = [RW_TARGET, tmp + scratch(ctx).removeprefix("%TMP%")]

        async def racer() -> None:
            with contextlib.suppress(Stop):  # a silent racer is reported below, not raised in the task group
                found, _r = await run_py(ctx, session.id, _RACE, json.dumps(bases), str(victim), str(count), "1.5",
                                         timeout=20)
                race.update(found)

        async with anyio.create_task_group() as tg:
            tg.start_soon(racer)
            await anyio.sleep(0.4)
            for base in bases:
                for i in range(count):
                    target = f"{base}/race{i}/sub-{secrets.token_hex(2)}" if i % 2 else f"{base}/race{i}"
                    attach = FilesystemMount(source=str(source), target=target, access=FilesystemAccess.READ_ONLY)
                    outcomes[target] = await _attach(ctx, session.id, attach)
                plain = FilesystemMount(source=str(source), target=f"{base}/plain-link")
                outcomes[f"{base}/plain-link"] = await _attach(ctx, session.id, plain)
    landed = _host_mounts_under(victim)
    seen = sorted(p.name for p in victim.iterdir())
    if landed or seen != ["canary.txt"] or (victim / "canary.txt").read_text() != victim_content:
        return escaped(f"a live mount landed on the host: mounts {landed}, victim now holds {seen}; attach "
                       f"outcomes {outcomes}")
    claimed = _claimed_but_refused(outcomes)
    if claimed is not None:
        return claimed
    require(bool(race.get("swaps")), "the guest's swapping loop never ran", None)
    return conforms(f"{race.get('swaps')} swaps raced {len(outcomes)} attaches ({outcomes}); the host is untouched")
