"""The PKCS#11 KEK backend against a real SoftHSM2 token (made in a temp dir by scripts/softhsm-init.sh)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.keys.envelope import is_sealed
from tests.conftest import REPO, Gateway, Signing, direct, free_port, policies_copy, start_crm, start_gateway

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
pytestmark = pytest.mark.skipif(shutil.which("softhsm2-util") is None or not Path(MODULE).exists(),
                                reason="SoftHSM2 is not installed (make test installs it: scripts/setup-debian.sh)")


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("hsm")
    out = subprocess.run([str(REPO / "scripts" / "softhsm-init.sh"), str(d)], capture_output=True, text=True,
                         check=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


@pytest.fixture(scope="module")
def setup(hsm: dict[str, str], signing: Signing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("pkcs11")
    crm, url = start_crm(d / "crm")
    keys = d / "keys"
    keys.mkdir(mode=0o700)
    extra = f'kek = "pkcs11"\npkcs11_module = "{MODULE}"\npkcs11_token = "fieldguard"'
    env = {**os.environ, **hsm}
    # `keys init` makes the KEK inside the token; the config is the gateway's own
    cfg = d / "init.toml"
    cfg.write_text(f'[keys]\ndir = "{keys}"\n{extra}\n[audit]\nlog = "{d / "init-audit.jsonl"}"\n')
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "keys", "init", "--config", str(cfg)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    gw = start_gateway(d / "gw", url, signing, keys, policies=policies_copy(d / "gw"), keys_extra=extra, env=hsm)
    yield {"gw": gw, "url": url, "env": env, "keys": keys, "cfg": cfg}
    gw.service.stop()
    crm.stop()


def test_token_key_wraps_and_never_leaves_the_token(setup: dict[str, Any], hsm: dict[str, str]) -> None:
    gw: Gateway = setup["gw"]
    alice = gw.as_user("alice", "counsellor")
    r = gw.request("POST", "/clients/1/session-notes", alice, json={"body": "sealed by a key from the HSM"})
    assert r.status_code == 201, r.text
    stored = direct(setup["url"], f"/session-notes/{r.json()['id']}")
    assert is_sealed(stored["body"])
    assert gw.get(f"/session-notes/{r.json()['id']}", alice).json()["body"] == "sealed by a key from the HSM"
    code = ("import os, pkcs11; t = pkcs11.lib(" + repr(MODULE) + ").get_token(token_label='fieldguard');"
            "s = t.open(user_pin=os.environ['FIELDGUARD_PKCS11_PIN']);"
            "ks = list(s.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY}));"
            "print([(k[pkcs11.Attribute.LABEL], k[pkcs11.Attribute.EXTRACTABLE], k[pkcs11.Attribute.SENSITIVE])"
            " for k in ks])")
    out = subprocess.run([sys.executable, "-c", code], env=setup["env"], capture_output=True, text=True, check=True)
    assert "'fieldguard-kek-" in out.stdout and "True, True" not in out.stdout and "False, True" in out.stdout


def test_rotate_kek_in_the_token(setup: dict[str, Any]) -> None:
    gw: Gateway = setup["gw"]
    cfg = gw.config
    status = subprocess.run([sys.executable, "-m", "proxy.cli", "keys", "status", "--config", str(cfg)],
                            env=setup["env"], capture_output=True, text=True, check=True)
    before = json.loads(status.stdout)
    assert before["backend"] == "pkcs11" and before["current_kek"].startswith("fieldguard-kek-")
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "keys", "rotate-kek", "--config", str(cfg)],
                         env=setup["env"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    after = json.loads(subprocess.run([sys.executable, "-m", "proxy.cli", "keys", "status", "--config", str(cfg)],
                                      env=setup["env"], capture_output=True, text=True, check=True).stdout)
    assert after["current_kek"] != before["current_kek"] and list(after["wrapped_by_kek"]) == [after["current_kek"]]
    # a gateway started now (cold cache) opens the keys through the new token key
    fresh = start_gateway(Path(setup["keys"]).parent / "gw2", setup["url"], gw.signing, setup["keys"],
                          policies=policies_copy(Path(setup["keys"]).parent / "gw2"),
                          keys_extra=f'kek = "pkcs11"\npkcs11_module = "{MODULE}"\npkcs11_token = "fieldguard"',
                          env={k: setup["env"][k] for k in ("SOFTHSM2_CONF", "FIELDGUARD_PKCS11_PIN")})
    try:
        notes = fresh.get("/clients/1/session-notes", fresh.as_user("alice", "counsellor")).json()["items"]
        assert "sealed by a key from the HSM" in {n.get("body") for n in notes}
    finally:
        fresh.service.stop()


def test_wrong_pin_refuses_to_start(setup: dict[str, Any], tmp_path: Path) -> None:
    # on a port of its own: the running gateway holds the config's port, and a busy port is refused first
    env = {**setup["env"], "FIELDGUARD_PKCS11_PIN": "0000", "FIELDGUARD_SERVER_PORT": str(free_port())}
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(setup["gw"].config)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "configuration error" in out.stderr and "0000" not in out.stderr
