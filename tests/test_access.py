"""The access token for /ws and /status, over real sockets on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bot.access import MAX_FAILURES, UNAUTHORIZED, ExposedWithoutTokenError, check_exposure
from tests.conftest import CapturedLogs
from tests.live_server import serve

TOKEN = "s3cret-token-for-tests"
RATE = 16000


@pytest.fixture
def guarded(base_config, models):
    """A server that asks for TOKEN (a fresh one per test: bad tries are counted per address)."""
    config = base_config.model_copy(deep=True)
    config.server.auth_token = SecretStr(TOKEN)
    with serve(config, models=models) as host:
        yield host


async def _open(host: str, *, first: dict | None = None, headers: dict | None = None) -> tuple[list[dict], int | None, str]:
    """Connect, send ``first`` then a start message; what came back and how the socket closed."""
    events: list[dict] = []
    async with connect(f"ws://{host}/ws", additional_headers=headers) as ws:
        try:
            if first is not None:
                await ws.send(json.dumps(first))
            await ws.send(json.dumps({"type": "start", "sample_rate": RATE}))
        except ConnectionClosed:
            pass  # refused before it was read: what the server sent is still to be read
        try:
            async for message in ws:
                if isinstance(message, str):
                    events.append(json.loads(message))
                    if events[-1]["type"] == "ready":
                        return events, None, ""
        except ConnectionClosed:
            pass
        return events, ws.close_code, ws.close_reason or ""


def _failures(metrics: str) -> dict[str, float]:
    [family] = [f for f in text_string_to_metric_families(metrics) if f.name == "voxbot_auth_failures"]
    return {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}


def test_a_server_beyond_loopback_asks_for_a_token_or_an_explicit_yes():
    with pytest.raises(ExposedWithoutTokenError, match="server.auth_token"):
        check_exposure(host="0.0.0.0", token=None, allow_anonymous=False)
    check_exposure(host="0.0.0.0", token=SecretStr(TOKEN), allow_anonymous=False)
    check_exposure(host="0.0.0.0", token=None, allow_anonymous=True)
    check_exposure(host="127.0.0.1", token=None, allow_anonymous=False)


def test_voxbot_serve_refuses_in_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBOT_SERVER__")}
    voxbot = Path(sys.executable).with_name("voxbot")
    result = subprocess.run([voxbot, "serve", "--host", "0.0.0.0"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "server.allow_anonymous" in result.stderr and "Traceback" not in result.stderr


async def test_without_the_token_no_session_begins(guarded):
    with CapturedLogs() as logs:
        missing = await _open(guarded)
        wrong = await _open(guarded, first={"type": "auth", "token": "guess"})
        header = await _open(guarded, headers={"Authorization": "Bearer guess"})
    for events, code, reason in (missing, wrong, header):
        assert code == UNAUTHORIZED and reason.startswith("unauthorized"), (events, code, reason)
        assert [e["type"] for e in events] == ["error"]
    assert "guess" not in logs.text and TOKEN not in logs.text
    async with httpx.AsyncClient(base_url=f"http://{guarded}") as http:
        counts = _failures((await http.get("/metrics")).text)
    assert counts["missing"] == 1 and counts["wrong"] == 2


async def test_the_token_opens_a_session_in_the_first_message_or_a_header(guarded):
    events, code, _ = await _open(guarded, first={"type": "auth", "token": TOKEN})
    assert code is None and events[-1]["type"] == "ready", events
    events, code, _ = await _open(guarded, headers={"Authorization": f"Bearer {TOKEN}"})
    assert code is None and events[-1]["type"] == "ready", events


async def test_a_burst_of_bad_tokens_is_refused_even_the_right_one_then(guarded):
    for _ in range(MAX_FAILURES):
        await _open(guarded, first={"type": "auth", "token": "guess"})
    events, code, reason = await _open(guarded, first={"type": "auth", "token": TOKEN})
    assert code == UNAUTHORIZED and reason.startswith("too many"), (events, code, reason)
    async with httpx.AsyncClient(base_url=f"http://{guarded}") as http:
        counts = _failures((await http.get("/metrics")).text)
    assert counts["wrong"] == MAX_FAILURES and counts["rate_limited"] == 1


async def test_status_shows_what_users_said_only_to_the_token(guarded):
    async with httpx.AsyncClient(base_url=f"http://{guarded}") as http:
        anonymous = (await http.get("/status")).json()
        authorized = (await http.get("/status", headers={"Authorization": f"Bearer {TOKEN}"})).json()
    assert anonymous["recent_turns"] is None and authorized["recent_turns"] == []
    assert anonymous["active_sessions"] == authorized["active_sessions"]
