"""Folders on the host that a sandbox's own (unprivileged) uid must reach.

``Path.mkdir(mode=...)`` is filtered by the umask: as root under ``umask 077`` a sandbox's
home, its ``fs/*`` folders and its control folder would come out ``0700``, owned by root, and
the sandbox could not enter them. These helpers set the mode explicitly instead.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path


def make_dirs(path: Path, mode: int = 0o755, *, exist_ok: bool = False) -> None:
    """``mkdir -p path``, every folder it creates with exactly ``mode``, whatever the umask."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    if not missing and not exist_ok:
        raise FileExistsError(f"{path} exists")
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # made by someone else meanwhile: theirs to set up
            if folder == path and not exist_ok:
                raise
            continue
        os.chmod(folder, mode)


def host_tar_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """Extracting a sandbox's tar onto the host: the ``data`` filter (no links out of ``dest``,
    no setuid bits), skipping device nodes and FIFOs instead of failing on them."""
    if member.isdev():
        return None
    return tarfile.data_filter(member, dest)
