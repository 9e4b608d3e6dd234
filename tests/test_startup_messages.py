"""What the gateway says at start is true: with the CRM down it logs that it listens and is not ready (and
why), as /readyz answers 503, never "gateway ready"; with the CRM up, that it listens and is ready.
`policy check --config` with the CRM down says so in a sentence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import HTTP, Signing, fieldguard, free_port, start_gateway, wait_until


def log_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{") and '"level"' in line]


def listening(gw: Any) -> dict[str, Any]:
    return wait_until(lambda: next((r for r in log_lines(gw.service.output())
                                    if r["event"].startswith("gateway listening")), None),
                      "the gateway logs whether it is ready once it listens", timeout=20)


def test_with_the_crm_down_the_start_says_not_ready(tmp_path: Path, signing: Signing, shared_keys: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    gw = start_gateway(tmp_path, down, signing, shared_keys, process=True)
    try:
        line = listening(gw)
        assert line["level"] == "warning"
        assert line["event"].startswith("gateway listening; not ready: upstream unreachable, relations not read")
        assert {"upstream", "relations"} <= set(line["not_ready"]) and line["url"] == gw.url
        assert line["readyz"] == f"{gw.url}/readyz"
        ready = HTTP.get(gw.url + "/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["checks"]["upstream"] == {"ok": False}
        events = [r["event"] for r in log_lines(gw.service.output())]
        assert "gateway ready" not in events and "gateway listening; ready" not in events
        assert "gateway started" in events
    finally:
        gw.service.stop()


def test_with_the_crm_up_the_start_says_ready(tmp_path: Path, crm: str, signing: Signing, shared_keys: Path) -> None:
    gw = start_gateway(tmp_path, crm, signing, shared_keys, process=True)
    try:
        line = listening(gw)
        assert line["event"] == "gateway listening; ready" and line["level"] == "info" and line["url"] == gw.url
        assert HTTP.get(gw.url + "/readyz", timeout=10).status_code == 200
    finally:
        gw.service.stop()


def test_policy_check_with_the_crm_down_says_so(tmp_path: Path, signing: Signing, shared_keys: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    gw = start_gateway(tmp_path, down, signing, shared_keys, start=False)
    out = fieldguard(gw.config, "policy", "check")
    assert out.returncode == 1 and out.stdout.startswith("ok: ")
    assert out.stderr == f"Error: the relations could not be read from the CRM at {down}: upstream unreachable\n"
