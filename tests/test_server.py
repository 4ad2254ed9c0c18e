"""The server over real sockets: HTTP endpoints, a spoken conversation on /ws, and bad clients."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
from pipecat.pipeline.worker import PipelineWorker
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bot.server import SHUTTING_DOWN, BotState
from tests.conftest import QUESTION, RATE, SLOW_FACTOR, silence
from tests.live_server import serve, serve_app, serve_server, session_tasks

FRAME_SECS = 0.02
# Generous: two shared CPU cores may be busy with other work.
TIMEOUT = 90


def normalize(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def loud(audio: bytes) -> bool:
    """Whether 16-bit PCM holds more than silence (about -30 dBFS peaks)."""
    return len(audio) > 0 and int(np.abs(np.frombuffer(audio, dtype=np.int16).astype(np.int32)).max()) > 1000


class Client:
    """A scripted browser tab: streams PCM in real time and keeps what the bot sends."""

    def __init__(self, ws: ClientConnection):
        self.ws = ws
        self.events: list[dict] = []
        self.audio = bytearray()
        self._reader = asyncio.create_task(self._read())

    async def _read(self):
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self.audio += message
                else:
                    self.events.append(json.loads(message))
        except ConnectionClosed:
            pass  # closed without a handshake: what was received is kept

    def telling_a_reply(self) -> bool:
        """Whether the bot's words are being played since the user's last turn began."""
        kinds = [e["type"] for e in self.events]
        last_turn = max((i for i, k in enumerate(kinds) if k == "interrupt"), default=-1)
        return "bot_text" in kinds[last_turn + 1 :]

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    async def until(self, check: Callable[[], object], what: str, *, timeout: float = TIMEOUT):
        try:
            async with asyncio.timeout(timeout):
                while not check():
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pytest.fail(f"no {what} within {timeout} s; events: {self.events}")

    async def stream(self, audio: np.ndarray, *, rate: int = RATE):
        """Send int16 audio in 20 ms messages at real-time pace, as a microphone would."""
        loop = asyncio.get_running_loop()
        step = int(rate * FRAME_SECS)
        start = loop.time()
        for i in range(0, len(audio), step):
            await self.ws.send(audio[i : i + step].tobytes())
            await asyncio.sleep(max(0.0, start + (i + step) / rate - loop.time()))

    async def ask(self, question: np.ndarray):
        """Speak; return once the bot has heard the question and is answering aloud."""
        await self.stream(question)
        await self.until(
            lambda: self.of_type("transcript") and self.of_type("bot_text") and loud(self.audio),
            "transcript, bot text and bot audio",
        )
        assert normalize(self.of_type("transcript")[0]["text"]) == normalize(QUESTION)


@asynccontextmanager
async def session(host: str, **connect_args) -> AsyncIterator[Client]:
    """A client that has declared its rate and got the server's ready message."""
    async with connect(f"ws://{host}/ws", **connect_args) as ws:
        client = Client(ws)
        await ws.send(json.dumps({"type": "start", "sample_rate": RATE}))
        await client.until(lambda: client.of_type("ready"), "ready message")
        yield client


async def wait_for_status(host: str, check: Callable[[dict], object], what: str) -> dict:
    """Poll /status until ``check`` passes: sessions end and turns land asynchronously."""
    async with httpx.AsyncClient(base_url=f"http://{host}") as http:
        async with asyncio.timeout(TIMEOUT):
            while True:
                status = (await http.get("/status")).json()
                if check(status):
                    return status
                await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def server(base_config, models):
    with serve(base_config, models=models) as host:
        yield host


@pytest.fixture(scope="module")
def slow_server(base_config, slow_models):
    """The server on a CPU that synthesizes SLOW_FACTOR times slower."""
    with serve(base_config, models=slow_models) as host:
        yield host


async def test_health_ready_and_page(server):
    async with httpx.AsyncClient(base_url=f"http://{server}") as http:
        assert (await http.get("/health")).status_code == 200
        ready = await http.get("/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        page = await http.get("/")
        assert page.status_code == 200 and "static/app.js" in page.text
        for asset in ("app.js", "mic-worklet.js", "style.css"):
            assert (await http.get(f"/static/{asset}")).status_code == 200, asset


async def test_ready_is_503_with_the_error_when_models_fail_to_load(base_config, tmp_path):
    config = base_config.model_copy(deep=True)
    config.stt.whisper.model_path = tmp_path / "no-such-whisper"
    with serve(config, models=None) as host:
        async with httpx.AsyncClient(base_url=f"http://{host}") as http:
            async with asyncio.timeout(TIMEOUT):
                while (ready := await http.get("/ready")).json()["error"] is None:
                    assert ready.status_code == 503
                    await asyncio.sleep(0.1)
        assert ready.status_code == 503
        assert "no-such-whisper" in ready.json()["error"]
        async with connect(f"ws://{host}/ws") as ws:
            refusal = json.loads(await ws.recv())
        assert refusal["type"] == "error" and "no-such-whisper" in refusal["message"]


async def test_spoken_question_gets_a_spoken_answer_and_a_trace(server, question):
    async with session(server) as client:
        await client.ask(question)
        session_id = client.of_type("ready")[0]["session_id"]

    # The turn closes when the session does; then /status and /metrics show it.
    status = await wait_for_status(
        server, lambda s: any(t["session_id"] == session_id for t in s["recent_turns"]), "the turn"
    )
    turn = next(t for t in status["recent_turns"] if t["session_id"] == session_id)
    assert normalize(turn["user_text"]) == normalize(QUESTION)
    assert turn["voice_to_voice_ms"] > 0
    async with httpx.AsyncClient(base_url=f"http://{server}") as http:
        metrics = (await http.get("/metrics")).text
    turns = next(f for f in text_string_to_metric_families(metrics) if f.name == "voxbot_turns")
    assert sum(s.value for s in turns.samples if s.name == "voxbot_turns_total") >= 1


async def test_bad_input_gets_an_error_and_the_session_goes_on(server, question, base_config):
    limit = base_config.server.max_message_bytes
    bad = [
        ("{not json", "JSON"),
        (json.dumps({"type": "dance"}), "dance"),
        (json.dumps({"type": "start", "sample_rate": 12345}), "12345"),
        (bytes(limit + 2), "limit"),
        (bytes(641), "whole 16-bit samples"),
    ]
    async with session(server) as client:
        for message, complaint in bad:
            errors = len(client.of_type("error"))
            await client.ws.send(message)
            await client.until(lambda: len(client.of_type("error")) > errors, f"error about {complaint!r}")
            assert complaint in client.of_type("error")[-1]["message"]

        async with session(server) as other:
            await other.ws.send(json.dumps({"type": "ping"}))
            await other.until(lambda: other.of_type("pong"), "pong for another client")

        await client.ask(question)


async def test_a_client_that_vanishes_mid_answer_does_not_hurt_the_server(server, question):
    async with session(server) as client:
        await client.stream(question)
        await client.until(lambda: loud(client.audio), "bot audio")
        # No close handshake: the tab crashed or the network went away.
        client.ws.transport.abort()

    await wait_for_status(server, lambda s: s["active_sessions"] == 0, "the session to end")
    async with session(server) as client:
        await client.ws.send(json.dumps({"type": "ping"}))
        await client.until(lambda: client.of_type("pong"), "pong")


async def test_refusals_full_server_and_foreign_origin(base_config, models):
    config = base_config.model_copy(deep=True)
    config.server.max_sessions = 1
    config.server.allowed_origins = ["http://voxbot.test"]
    with serve(config, models=models) as host:
        async with connect(f"ws://{host}/ws", origin="http://elsewhere.test") as ws:
            refusal = json.loads(await ws.recv())
            await ws.wait_closed()
        assert refusal["type"] == "error" and "origin" in refusal["message"]
        assert ws.close_code == 1008

        async with session(host, origin="http://voxbot.test"):
            async with connect(f"ws://{host}/ws", origin="http://voxbot.test") as ws:
                refusal = json.loads(await ws.recv())
                await ws.wait_closed()
            assert refusal["type"] == "error" and "full" in refusal["message"]
            assert ws.close_code == 1013

        # The place frees up when its holder leaves.
        await wait_for_status(host, lambda s: s["active_sessions"] == 0, "the session to end")
        async with session(host, origin="http://voxbot.test"):
            pass


STORY = "Tell me a long story about a brave little dragon."


@pytest.mark.parametrize("host", ["server", "slow_server"], ids=["this-cpu", f"synthesis-{SLOW_FACTOR}x-slower"])
@pytest.mark.parametrize(
    ("over_the_bot", "then"),
    [("Wait, stop. What is two plus two?", "interrupt"), ("Okay.", "resume")],
    ids=["barge-in", "backchannel"],
)
async def test_talking_over_the_bot_pauses_the_page_then_flushes_or_resumes_it(host, request, speaker, over_the_bot, then):
    """The page is told to hold its playback at once; words then flush it or let it play on."""
    story = np.concatenate([silence(0.3, sample_rate=RATE), speaker(STORY, sample_rate=RATE), silence(1.0, sample_rate=RATE)])
    async with session(request.getfixturevalue(host)) as client:
        await client.stream(story)
        # The user may be heard in two turns (Kokoro pauses after "story"): wait for the story itself.
        await client.until(lambda: client.telling_a_reply(), "the bot telling its story")
        # What the page is told from here on, while the user talks over the bot's story.
        since = len(client.events)
        await client.stream(np.concatenate([speaker(over_the_bot, sample_rate=RATE), silence(1.5, sample_rate=RATE)]))
        await client.until(lambda: any(e["type"] == then for e in client.events[since:]), f"{then!r} after the pause")

    # Every user turn flushes the page (an "interrupt"), even while the bot is silent.
    kinds = [e["type"] for e in client.events[since:] if e["type"] in ("pause", "resume", "interrupt")]
    assert "pause" in kinds, kinds
    after_pause = kinds[kinds.index("pause") + 1 :]
    assert after_pause and after_pause[0] == then, kinds
    if then == "resume":
        assert "interrupt" not in after_pause, kinds


def _resources(state) -> tuple[int, int, int, int]:
    """Threads, open file descriptors, the server loop's session tasks, and the pipelines
    Python still tracks (reachable or garbage not yet collected, with all they hold), now."""
    pipelines = sum(1 for o in gc.get_objects() if issubclass(type(o), PipelineWorker))
    return threading.active_count(), len(os.listdir("/proc/self/fd")), len(session_tasks(state)), pipelines


async def test_fifty_sessions_opened_and_closed_leave_no_task_thread_file_or_memory_behind(base_config, models):
    async def one():
        async with session(host) as client:
            await client.stream(silence(0.1, sample_rate=RATE))

    with serve_app(base_config, models=models) as (host, state):
        await one()  # the first session makes the pools and caches every later one shares
        await wait_for_status(host, lambda s: s["active_sessions"] == 0, "the warm-up session's end")
        baseline = _resources(state)
        for _ in range(50):
            await one()
        await wait_for_status(host, lambda s: s["active_sessions"] == 0, "every session's end")
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while any(now > before for now, before in zip(_resources(state), baseline)):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)  # a closed session's last tasks finish on their own
        threads, fds, tasks, pipelines = _resources(state)
        assert all(now <= before for now, before in zip((threads, fds, tasks, pipelines), baseline)), (
            f"after 50 sessions: {threads} threads, {fds} fds, {tasks} session tasks, {pipelines} pipelines;"
            f" before: {baseline};"
            f" tasks left: {session_tasks(state)}"
        )


# Threads a process makes once and keeps, whatever its servers: the compute budget's
# background pool (processors/compute_budget.py) and tqdm's monitor.
_PROCESS_THREADS = ("voxbot-background", "tqdm_monitor")


def _fds() -> dict[str, str]:
    """The open file descriptors, and what each is."""
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed meanwhile
            pass
    return fds


def _threads() -> set[int]:
    return {t.ident for t in threading.enumerate() if not t.name.startswith(_PROCESS_THREADS)}


async def _shutdown_during_a_reply(
    config, models, question
) -> tuple[Client, BotState, int, tuple[set[int], dict[str, str]]]:
    """Ask, and signal SIGTERM as the answer starts to sound; return once the server has exited.

    Returns the client, the app's state, the reply audio bytes received before the signal,
    and the threads and file descriptors open before the server started.
    """
    before = _threads(), _fds()
    with serve_server(config, models=models) as (host, state, server, thread):
        async with session(host) as client:
            await client.ask(question)
            heard = len(client.audio)
            server.handle_exit(signal.SIGTERM, None)  # what uvicorn's own handler does
            await client.until(lambda: client.ws.close_code is not None, "the socket's close")
            # Nobody new gets in meanwhile.
            with pytest.raises(OSError):
                async with connect(f"ws://{host}/ws", open_timeout=5):
                    pass
        thread.join(timeout=TIMEOUT)
        assert not thread.is_alive(), "the server did not exit"
    return client, state, heard, before


async def test_sigterm_lets_the_reply_finish_then_closes_every_session_leaving_nothing(base_config, models, question):
    with serve_app(base_config, models=models):
        pass  # the process's first server makes what every later one shares
    client, state, heard, (threads, fds) = await _shutdown_during_a_reply(base_config, models, question)

    assert len(client.audio) > heard and state.cut_at_shutdown == 0  # the reply played on to its end
    assert client.events[-1] == {"type": "error", "message": SHUTTING_DOWN}, client.events[-3:]
    assert client.ws.close_code in (1000, 1001), client.ws.close_code
    assert state.live == {} and state.active_sessions == 0
    deadline = time.monotonic() + 10
    while (_threads() - threads or len(_fds()) > len(fds)) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not _threads() - threads, [t.name for t in threading.enumerate() if t.ident not in threads]
    assert len(_fds()) <= len(fds), set(_fds().values()) - set(fds.values())


async def test_a_reply_that_outlasts_the_drain_is_cut_when_it_ends(base_config, models, question):
    config = base_config.model_copy(deep=True)
    config.server.drain_s = 0.0
    client, state, _, _ = await _shutdown_during_a_reply(config, models, question)
    assert state.cut_at_shutdown == 1
    assert client.events[-1] == {"type": "error", "message": SHUTTING_DOWN}, client.events[-3:]
