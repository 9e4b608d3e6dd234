"""keys/ is 0700, as the README promises: whatever makes it (the first proof of a policy, `keys init`, the
gateway's start) makes it so whatever the umask, and `keys init` and `fieldguard serve` warn, naming the mode
and the chmod, when an existing one is open to group or others. (The demo tightens its own: tests/test_demo.py.)"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import KEK_PASSPHRASE, REPO, Signing, fieldguard, proofs_dir


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o002)  # what many desktops run with: new directories 0775
    yield
    os.umask(old)


def config(directory: Path, keys: Path, identity: str = "") -> Path:
    path = directory / "fieldguard.toml"
    path.write_text(f'[policy]\ndir = "{REPO / "policies"}"\n[keys]\ndir = "{keys}"\n'
                    f'[audit]\nstore = "{directory / "audit.sqlite3"}"\nlog = "{directory / "audit.jsonl"}"\n'
                    f'[identity]\n{identity}\n')
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_serve_makes_keys_0700_before_it_needs_a_kek(tmp_path: Path, loose_umask: None, signing: Signing) -> None:
    """The gateway's first start proves the policy and remembers it under keys/proofs: the keys/ it makes on the
    way is 0700 (it was 0775 under this umask), before it stops for want of a KEK."""
    keys = tmp_path / "deploy" / "keys"
    out = fieldguard(config(tmp_path, keys, f'public_key_file = "{signing.public_file}"'), "serve")
    assert out.returncode == 1 and f"{keys / 'kek.json'} does not exist: run `fieldguard keys init`" in out.stderr
    assert mode(keys) == 0o700 and mode(keys / "proofs") == 0o700


def test_keys_init_makes_keys_0700_and_warns_of_an_open_one(tmp_path: Path, loose_umask: None) -> None:
    keys = tmp_path / "new" / "keys"
    out = fieldguard(config(tmp_path, keys), "keys", "init")
    assert out.returncode == 0, out.stderr
    assert mode(keys) == 0o700 and mode(keys / "kek.json") == 0o600 and "warning" not in out.stderr

    opened = tmp_path / "opened"
    opened.mkdir()
    opened.chmod(0o755)  # as git makes the repository's keys/
    out = fieldguard(config(tmp_path, opened), "keys", "init", env={"FIELDGUARD_KEK_PASSPHRASE": KEK_PASSPHRASE})
    assert out.returncode == 0, out.stderr
    assert (f"warning: {opened} is mode 755: group or others can list and open the key files' directory; "
            f"chmod 700 {opened}") in out.stderr


def test_serve_warns_of_an_open_keys_directory(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    keys.chmod(0o750)
    (keys / "proofs").symlink_to(proofs_dir(), target_is_directory=True)  # this run's proofs: no second proof
    # a configuration it then refuses (no identity key), so that `serve` returns once it has warned
    out = fieldguard(config(tmp_path, keys, 'public_key_file = "/nonexistent/idp.pub.pem"'), "serve")
    assert out.returncode == 1
    warnings = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert {"event": "keys directory open to others", "level": "warning",
            "detail": f"{keys} is mode 750: group or others can list and open the key files' directory; "
                      f"chmod 700 {keys}"}.items() <= warnings[0].items()
