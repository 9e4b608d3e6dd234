"""Run-time secret files under keys/: created 0600 in a directory created 0700, refused when others can read
them; a keys directory others can open is warned of."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


class InsecureKeyFile(RuntimeError):
    pass


def check_private(path: Path) -> None:
    """Refuse a key file that group or others can read or write."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecureKeyFile(f"{path} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")


def private_dir(path: Path) -> None:
    """Make `path` a directory, creating it, and every missing directory above it, with mode 0700 whatever the
    umask (a directory that exists is left as it is: `open_dir_warning` says whether others can open it)."""
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile by another process
            continue
        directory.chmod(0o700)


def open_dir_warning(path: Path) -> str | None:
    """One sentence when group or others can open the secrets directory `path` (None when it is 0700 or less,
    or does not exist)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    if not mode & (stat.S_IRWXG | stat.S_IRWXO):
        return None
    return (f"{path} is mode {mode:o}: group or others can list and open the key files' directory; "
            f"chmod 700 {path}")


def write_private(path: Path, data: bytes) -> None:
    """Write atomically with mode 0600 from the first byte, in a directory made 0700 if it is missing."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)

