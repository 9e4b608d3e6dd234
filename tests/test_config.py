"""Settings: the documented example is complete, environment variables override, typos are refused."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from proxy.config import ConfigError, Settings, build_settings, load_settings
from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "fieldguard.toml"


def test_example_documents_every_key() -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    for section in fields(Settings):
        if section.name == "base_dir":
            continue
        documented = set(raw.get(section.name, {}))
        declared = {f.name for f in fields(getattr(Settings(), section.name))}
        assert documented == declared, section.name
    assert load_settings(EXAMPLE, env={}) .upstream.url == "http://127.0.0.1:8100"


def test_environment_overrides(tmp_path: Path) -> None:
    env = {"FIELDGUARD_UPSTREAM_URL": "http://crm:9000", "FIELDGUARD_SERVER_PORT": "9001",
           "FIELDGUARD_POLICY_WATCH": "false", "FIELDGUARD_UPSTREAM_HEADERS": "authorization=Bearer x"}
    s = build_settings({}, env, tmp_path)
    assert s.upstream.url == "http://crm:9000" and s.server.port == 9001 and s.policy.watch is False
    assert s.upstream.headers == {"authorization": "Bearer x"}
    assert s.path("policies") == tmp_path / "policies"
    with pytest.raises(ConfigError):
        build_settings({}, {"FIELDGUARD_SERVER_PORT": "eighty"}, tmp_path)


def test_unknown_keys_and_wrong_types_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        build_settings({"server": {"prot": 1}}, {}, tmp_path)
    with pytest.raises(ConfigError, match="unknown section"):
        build_settings({"sever": {}}, {}, tmp_path)
    with pytest.raises(ConfigError, match="should be"):
        build_settings({"server": {"port": "80"}}, {}, tmp_path)
