"""Run-time secret files under keys/: created 0600, refused when others can read them."""

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


def write_private(path: Path, data: bytes) -> None:
    """Write atomically with mode 0600 from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)

