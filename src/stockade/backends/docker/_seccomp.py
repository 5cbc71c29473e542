"""The project's seccomp filter as a Docker/OCI JSON profile.

Docker takes a JSON profile (``--security-opt seccomp=<json>``), not a BPF program, so the rules of
:mod:`stockade.linux.seccomp` are replayed into JSON instead of being compiled: the same rule function
(``_add_rules``) runs against a recorder with the interface of its per-ABI rule builder. One list of rules thus
feeds both bwrap (BPF) and the engines (JSON), and a rule added there reaches the containers too.

Where the JSON form differs: Docker applies every rule to all listed architectures (libseccomp translates the
names), so the i386-only ``socketcall`` special case of the BPF filter is not needed here and the socket rules
reach i386 through libseccomp's own ``socketcall`` translation, which is stricter for 32-bit programs (their
socket creation is refused outright when argument rules exist), never weaker.
"""

from __future__ import annotations

import functools
import json
import platform
from typing import Any, cast

from ...linux import seccomp

__all__ = ["profile_json"]

_OPS = {"eq": "SCMP_CMP_EQ", "lt": "SCMP_CMP_LT", "gt": "SCMP_CMP_GT", "masked_eq": "SCMP_CMP_MASKED_EQ"}

_ARCHES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
}


class _Recorder:
    """Stands in for ``seccomp._ArchRules``: records each refusal as a JSON syscall entry."""

    is_x86 = False  # one native rule set; see the module docstring

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def has(self, name: str) -> bool:
        # runc skips names libseccomp does not know, so every name may be listed.
        return True

    def arg(self, index: int, op: str, a: int, b: int | None = None) -> dict[str, Any]:
        # OCI semantics match libseccomp's: for MASKED_EQ, value is the mask and valueTwo the datum.
        return {"index": index, "value": a, "valueTwo": b or 0, "op": _OPS[op]}

    def deny(self, err: int, name: str, *args: dict[str, Any]) -> None:
        self.entries.append(
            {"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": err, "args": list(args)}
        )


def profile_dict(network: seccomp.NetworkFamilies = "inet") -> dict[str, Any]:
    """The profile as a dict (see :func:`profile_json`)."""
    profile = seccomp.default_profile(network)
    recorder = _Recorder()
    # _add_rules only calls has/arg/deny and reads is_x86: the recorder provides exactly those.
    seccomp._add_rules(cast(Any, recorder), profile)
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": _ARCHES.get(platform.machine(), []),
        "syscalls": recorder.entries,
    }


@functools.lru_cache(maxsize=4)
def profile_json(network: seccomp.NetworkFamilies = "inet") -> str:
    """The default seccomp profile of stockade sandboxes, as the JSON text Docker's ``seccomp=`` option takes."""
    return json.dumps(profile_dict(network), separators=(",", ":"))
