"""Verdicts for properties a backend declares it does not have.

A backend that cannot give a guest something (its own pid namespace, its own loopback) says so in its
capabilities and documents it; a case about exactly that property then ends ``not_applicable`` with what it
measured, instead of ``escaped``. The attack still runs as far as it is safe, and whatever goes beyond the
declared gap (a signal that lands on a host process, a host file that is written) is still an escape.
"""

from __future__ import annotations

from ..context import CaseContext, Finding, not_applicable

__all__ = ["declared_absent"]


def declared_absent(ctx: CaseContext, flag: str, measured: str) -> Finding | None:
    """``not_applicable`` when ``ctx.caps.<flag>`` is false (the backend declares the gap), else None."""
    if getattr(ctx.caps, flag):
        return None
    return not_applicable(f"unsupported: the backend declares {flag}=false; measured: {measured}")
