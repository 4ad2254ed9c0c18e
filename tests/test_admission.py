"""Admission by measured load: a newcomer is refused while the open sessions are served late."""

from __future__ import annotations

import asyncio
import json
import time

from websockets.asyncio.client import connect

from bot.admission import Admission
from bot.tracing import TurnTrace
from tests.live_server import serve_app
from tests.test_server import session


def _turn(v2v_ms: float | None) -> TurnTrace:
    return TurnTrace(session_id="s", turn=0, voice_to_voice_ms=v2v_ms)


def test_late_replies_refuse_a_newcomer_but_never_the_first_session():
    gate = Admission(max_voice_to_voice_ms=2000, max_loop_lag_ms=250)
    gate.record(_turn(2500))
    assert gate.refusal(active=1) is None  # one turn is no measure yet
    gate.record(_turn(3100))
    gate.record(_turn(None))  # a turn with no reply says nothing of latency
    reason = gate.refusal(active=1)
    assert reason is not None and "server is busy" in reason and "3.1 s" in reason, reason
    assert gate.refusal(active=0) is None


def test_prompt_replies_admit():
    gate = Admission(max_voice_to_voice_ms=2000, max_loop_lag_ms=250)
    for ms in (900, 1200, 1500):
        gate.record(_turn(ms))
    assert gate.refusal(active=3) is None
    assert Admission(max_voice_to_voice_ms=None, max_loop_lag_ms=250).refusal(active=5) is None


async def test_an_event_loop_that_runs_late_refuses_a_newcomer():
    gate = Admission(max_voice_to_voice_ms=None, max_loop_lag_ms=100)
    watcher = asyncio.create_task(gate.watch_loop())
    await asyncio.sleep(0.15)
    time.sleep(0.3)  # the loop blocked, as a model call on it would block it
    await asyncio.sleep(0.15)
    watcher.cancel()
    reason = gate.refusal(active=1)
    assert reason is not None and "event loop ran" in reason, reason


async def test_the_live_server_refuses_while_its_session_is_answered_late_then_admits(base_config, models, question):
    config = base_config.model_copy(deep=True)
    config.server.admit_max_voice_to_voice_ms = 1.0  # any real reply is late by this measure
    config.server.admit_max_loop_lag_ms = 250
    with serve_app(config, models=models) as (host, state):
        async with session(host) as client:
            for asked in range(1, 3):
                await client.ask(question) if asked == 1 else await client.stream(question)
                async with asyncio.timeout(120):
                    while len(state.recent_turns) < asked:
                        await asyncio.sleep(0.1)
            async with connect(f"ws://{host}/ws") as refused:
                message = json.loads(await refused.recv())
                await refused.wait_closed()
            assert message["type"] == "error" and message["message"].startswith("server is busy"), message
            assert refused.close_code == 1013
        async with asyncio.timeout(60):
            while state.active_sessions:
                await asyncio.sleep(0.1)
        async with session(host) as again:  # nobody to serve late: admitted
            assert again.of_type("ready")
