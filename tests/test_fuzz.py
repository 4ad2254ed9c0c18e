"""Bad input harms no one else: generated garbage over many sockets while a conversation runs.

Against the real server on loopback. Every fuzzing socket must get an error message
for each message the protocol refuses (transports/websocket.py documents it) and
still answer a ping, or be closed cleanly; the conversation in another session
completes; nothing is left behind and nothing logs a traceback.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import logging
import os
import threading
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import QUESTION, CapturedLogs, silence
from tests.live_server import serve_app, session_tasks
from tests.test_server import TIMEOUT, normalize, session
from transports.websocket import SUPPORTED_INPUT_RATES

MAX_BYTES = 64_000  # server.max_message_bytes in the test config
# The server's WebSocket drops a frame past this (bot/server.py: ws_max_size) with 1009.
WS_MAX_SIZE = 2 * MAX_BYTES
# Closes a fuzzing socket may get: normal, policy, too big for the socket (past ws_max_size).
CLEAN_CLOSES = {1000, 1008, 1009}

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
_typed = st.fixed_dictionaries(
    {"type": st.sampled_from(["start", "ping", "auth", "stop", "audio", ""]) | _json},
    optional={
        "sample_rate": st.sampled_from(SUPPORTED_INPUT_RATES) | st.integers(-(10**12), 10**12) | _json,
        "token": _json,
    },
).map(json.dumps)
_text = st.one_of(
    st.text(max_size=300),
    _json.map(json.dumps),
    _typed,
    st.tuples(_typed, st.integers(0, 40)).map(lambda t: t[0][: t[1]]),  # truncated JSON
    st.integers(MAX_BYTES - 10, MAX_BYTES + 10).map(lambda n: json.dumps({"type": "ping", "pad": "x" * n})),
)
_binary = st.one_of(
    st.binary(max_size=4000),
    st.integers(1, 3).map(bytes),  # a byte or three: not whole samples
    st.sampled_from([MAX_BYTES - 2, MAX_BYTES + 2, 3 * MAX_BYTES]).map(os.urandom),  # at, past, far past the limit
)
MESSAGES = st.lists(st.one_of(_text, _binary), min_size=1, max_size=25)


def refusals(messages: list[str | bytes]) -> int:
    """How many of ``messages`` the protocol answers with an error message."""
    count = 0
    for data in messages:
        if len(data) > MAX_BYTES:
            count += 1
        elif isinstance(data, bytes):
            count += len(data) % 2
        else:
            try:
                message = json.loads(data)
                kind = message["type"]
            except (ValueError, TypeError, KeyError):
                count += 1
                continue
            if kind == "start":
                count += message.get("sample_rate") not in SUPPORTED_INPUT_RATES
            elif kind not in ("auth", "ping"):
                count += 1
    return count


async def fuzz_one(host: str, messages: list[str | bytes]) -> str | None:
    """Send ``messages``, then a ping; what went wrong, or None."""
    async with connect(f"ws://{host}/ws", max_size=None) as ws:
        errors = pongs = 0
        said = ""  # the server's last error message: why it closed, where it did
        try:
            for data in messages:
                await ws.send(data)
            await ws.send(json.dumps({"type": "ping", "n": "last"}))
            async with asyncio.timeout(TIMEOUT):
                while pongs < sum(1 for m in messages if _is_ping(m)) + 1:
                    message = await ws.recv()
                    if isinstance(message, str):
                        event = json.loads(message)
                        kind = event["type"]
                        errors += kind == "error"
                        said = event.get("message", said)
                        pongs += kind == "pong"
        except ConnectionClosed:
            if ws.close_code in CLEAN_CLOSES or (ws.close_code == 1006 and _reset_after_1009(messages)):
                return None
            return f"closed with {ws.close_code} {ws.close_reason!r} after {said!r}"
    expected = refusals(messages)
    return None if errors == expected else f"{errors} error messages for {expected} refused messages"


def _reset_after_1009(messages: list[str | bytes]) -> bool:
    """Whether a 1006 (no close frame) is TCP's doing, not the server's.

    A frame past ``ws_max_size`` is answered with a 1009 close and the connection
    ends; messages the client sent after it are unread there, so the server's kernel
    resets the connection, and the client's kernel drops the 1009 it had not yet read
    (seen in CI: ``closed with 1006 '' after ''``; against a bare uvicorn app with the same
    ``ws_max_size``, a 192 kB frame then 20 small ones closed 57 of 60 sockets with 1006).
    """
    return any(len(data) > WS_MAX_SIZE for data in messages)  # the closing ping always follows one


def _is_ping(data: str | bytes) -> bool:
    if isinstance(data, bytes) or len(data) > MAX_BYTES:
        return False
    try:
        return json.loads(data)["type"] == "ping"
    except (ValueError, TypeError, KeyError):
        return False


async def _stalled_and_deaf_clients(host: str, seconds: float):
    """A client that never reads, one that stops mid-frame, and one that floods 1-byte frames."""
    async with connect(f"ws://{host}/ws") as deaf, connect(f"ws://{host}/ws") as stalled, connect(
        f"ws://{host}/ws"
    ) as flood:
        await deaf.send(json.dumps({"type": "start", "sample_rate": 16000}))
        stalled.transport.write(b"\x82\xfe\x10\x00")  # a 4096-byte binary frame whose mask and payload never come
        for _ in range(3000):
            await flood.send(b"\x01")
        await flood.send(json.dumps({"type": "ping"}))
        async with asyncio.timeout(TIMEOUT):
            errors = 0
            while (message := await flood.recv()) != json.dumps({"type": "pong"}):
                errors += isinstance(message, str) and json.loads(message)["type"] == "error"
        assert errors == 3000
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await deaf.send(silence(0.02).tobytes())  # talks, never listens
            await asyncio.sleep(0.02)
        stalled.transport.abort()


def _conversation(host: str, results: dict):
    async def talk():
        async with session(host) as client:
            await client.stream(results["question"])
            await client.until(lambda: client.of_type("bot_text"), "the answer")
            results["transcript"] = client.of_type("transcript")[0]["text"]
            results["answer"] = " ".join(e["text"] for e in client.of_type("bot_text"))

    try:
        asyncio.run(talk())
    except BaseException as e:  # reported by the test
        results["error"] = repr(e)


class _StdlibErrors(logging.Handler):
    """uvicorn logs an application's exception through the standard library."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord):
        self.records.append(self.format(record))


def test_garbage_on_many_sockets_harms_no_other_session(base_config, models, question):
    # The fuzzing sockets come one after another, but a session closed while its pipeline is
    # still starting ends only once it has started: on a busy 2-core CPU (the conversation's
    # reply and two spinning processes beside it) up to 7 of them were still ending when the
    # next came, and the eighth was refused as a full house (1013), which is right for a
    # server, beside the point here: every fuzzing socket must reach a session.
    config = base_config.model_copy(deep=True)
    config.server.max_sessions = 64
    stdlib = _StdlibErrors()
    logging.getLogger("uvicorn").addHandler(stdlib)
    try:
        with serve_app(config, models=models) as (host, state), CapturedLogs() as logs:
            # A first round makes what every later session reuses: pools, caches, the memory
            # allocator's arenas (measured: RSS grows over the first ~100 sessions, then is flat).
            warm = {"question": question}
            _conversation(host, warm)
            assert "error" not in warm, warm
            _fuzz(host, examples=60)
            _until(lambda: state.active_sessions == 0)
            tasks, rss = len(session_tasks(state)), _rss()

            talk = {"question": question}
            talker = threading.Thread(target=_conversation, args=(host, talk))
            talker.start()
            _until(lambda: state.active_sessions == 1)
            _fuzz(host, examples=150)
            asyncio.run(_stalled_and_deaf_clients(host, seconds=2.0))
            talker.join(TIMEOUT)

            assert "error" not in talk, talk
            assert normalize(talk["transcript"]) == normalize(QUESTION) and talk["answer"].strip(), talk
            _until(lambda: state.active_sessions == 0 and len(session_tasks(state)) <= tasks)
            assert len(session_tasks(state)) <= tasks, session_tasks(state)
            grown = _rss() / rss - 1
            assert grown < 0.05, f"RSS grew {grown:.1%}"
    finally:
        logging.getLogger("uvicorn").removeHandler(stdlib)
    assert "Traceback" not in logs.text
    assert not stdlib.records, stdlib.records


def _fuzz(host: str, *, examples: int) -> None:
    """Generated message sequences, a socket each; fails on the first socket mistreated."""

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(MESSAGES)
    def fuzz(messages):
        problem = asyncio.run(fuzz_one(host, messages))
        assert problem is None, problem

    fuzz()


def _rss() -> int:
    """The memory this process still uses, in bytes.

    Resident memory, once the memory allocator has given back what was freed: glibc
    keeps freed memory for reuse (measured here: 17 % more resident memory after the
    fuzzing without the trim, 0.9 % with it), which is no leak.
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _until(check, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
