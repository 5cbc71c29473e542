"""Restoring snapshot archives on the host, shared by the backends that keep files in a tar (bwrap, docker).

A snapshot holds whatever the guest left in its writable places, so its archive is untrusted input: member
names and hard links must stay inside the destination and nothing may be written through a link on the host.
Symlinks are the exception: their targets are guest paths and are kept as they were.
"""

from __future__ import annotations

import tarfile

__all__ = ["restore_filter"]


def restore_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's ``data`` filter, except that a symlink may point anywhere.

    A symlink's target is a guest path (``/tmp/x``, ``../../etc``, as the guest sees it): it is recreated as
    it was and never followed on the host (callers move the extracted trees into place, and copy them, if at
    all, without following links). Member names and hard links still may not leave the destination, and nothing is
    written through a link (the filter resolves each member's path on the host first).
    """
    if member.issym():
        checked = tarfile.data_filter(member.replace(linkname=".", deep=False), dest)
        return checked.replace(linkname=member.linkname, deep=False)
    return tarfile.data_filter(member, dest)
