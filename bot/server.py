"""The HTTP/WebSocket server: one pipeline per connection around models loaded once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pipecat.pipeline.worker import PipelineWorker
from pipecat.workers.runner import WorkerRunner

from bot.access import AccessGuard, check_exposure, refuse
from bot.admission import Admission
from bot.backends import remote_backends, unreachable
from bot.config import Config
from bot.memory import collect_finished_session, freeze_loaded_models
from bot.models import Models, load_models
from bot.pipeline import build_pipeline, import_session_modules
from bot.tracing import LatencyTracer, TurnTrace, percentile
from transports.telephony import CARRIERS, mount_carriers
from transports.websocket import ClientEventsObserver, create_websocket_transport, end_with_the_socket

STATIC = Path(__file__).parent / "static"
SHUTTING_DOWN = "the server is shutting down; reconnect in a moment"


class Metrics:
    """Prometheus metrics of one app (its own registry, so tests can make many apps)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.sessions = Gauge("voxbot_sessions_active", "Open conversations", registry=self.registry)
        self.sessions_total = Counter("voxbot_sessions_total", "Conversations started", registry=self.registry)
        self.rejected = Counter("voxbot_sessions_rejected_total", "Connections refused (server full or busy)", registry=self.registry)
        self.auth_failures = Counter(
            "voxbot_auth_failures_total", "WebSocket sessions refused for their token", ["reason"], registry=self.registry
        )
        for reason in ("missing", "wrong", "rate_limited"):
            self.auth_failures.labels(reason=reason)
        self.turns = Counter("voxbot_turns_total", "Turns completed", ["interrupted"], registry=self.registry)
        self.v2v = Histogram(
            "voxbot_voice_to_voice_seconds",
            "Estimated voice-to-voice latency per turn",
            buckets=(0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0),
            registry=self.registry,
        )
        self.preemptive = Counter(
            "voxbot_preemptive_replies_total", "Replies started before the turn end was confirmed", ["outcome"],
            registry=self.registry,
        )
        self.preemptive_tokens = Counter(
            "voxbot_preemptive_wasted_tokens_total", "Tokens generated for preemptive replies then cancelled",
            registry=self.registry,
        )
        self.preemptive_synthesis = Counter(
            "voxbot_preemptive_wasted_synthesis_seconds_total", "Synthesis time spent on preemptive replies then cancelled",
            registry=self.registry,
        )
        for outcome in ("adopted", "cancelled"):
            self.preemptive.labels(outcome=outcome)
        self.calls = Gauge("voxbot_calls_active", "Open phone calls", ["carrier"], registry=self.registry)
        self.calls_total = Counter("voxbot_calls_total", "Phone calls started", ["carrier"], registry=self.registry)
        for carrier in CARRIERS:
            self.calls.labels(carrier=carrier)
            self.calls_total.labels(carrier=carrier)


@dataclass
class LiveSession:
    """A conversation in progress, as shutdown sees it: is a turn open, and how to end it."""

    tracer: LatencyTracer
    worker: PipelineWorker
    farewell: Callable[[], Awaitable[None]] | None = None  # tells the client why it is closed


class BotState:
    """What the server knows: config, models once loaded, sessions, recent turns."""

    def __init__(self, config: Config):
        self.config = config
        self.models: Models | None = None
        self.load_error: str | None = None
        self.started = time.monotonic()
        self.ready_after: float | None = None
        self.active_sessions = 0  # browser sessions
        self.active_calls: dict[str, int] = {carrier: 0 for carrier in CARRIERS}
        self.calls_total: dict[str, int] = {carrier: 0 for carrier in CARRIERS}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.live: dict[str, LiveSession] = {}
        self.draining = False  # shutting down: /ready says so, and no new session starts
        self.cut_at_shutdown = 0  # sessions still mid-turn when the drain's time was up
        self.recent_turns: list[TurnTrace] = []
        self.metrics = Metrics()
        self.access = AccessGuard(token=config.server.auth_token, failures=self.metrics.auth_failures)
        self.admission = Admission(
            max_voice_to_voice_ms=config.server.admit_max_voice_to_voice_ms,
            max_loop_lag_ms=config.server.admit_max_loop_lag_ms,
        )

    def has_room(self) -> bool:
        """Whether one more browser session or phone call would be served well (see ``refusal``)."""
        return self.refusal() is None

    def refusal(self) -> str | None:
        """Why a new session is refused now, or None: the sessions share the models, the cores
        and ``server.max_sessions``."""
        active = self.active_sessions + sum(self.active_calls.values())
        if active >= self.config.server.max_sessions:
            return "server is full; retry later"
        return self.admission.refusal(active=active)

    @contextmanager
    def session(self, session_id: str, session: LiveSession) -> Iterator[None]:
        """Known to shutdown while it runs."""
        self.live[session_id] = session
        try:
            yield
        finally:
            del self.live[session_id]

    async def drain(self, *, timeout_s: float, hurry: Callable[[], bool] = lambda: False) -> None:
        """Let the replies in progress finish (for at most ``timeout_s``, or until ``hurry()``),
        then end every session."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while True:
            busy = sum(s.tracer.open_turn is not None for s in self.live.values())
            if not busy or hurry() or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        self.cut_at_shutdown = busy
        if self.live:
            logger.info(f"Shutting down: ending {len(self.live)} session(s), {busy} of them cut mid-turn")
        for session in list(self.live.values()):
            if session.farewell is not None:
                try:
                    await session.farewell()
                except Exception:  # the client may be gone already
                    pass
            await session.worker.cancel(reason="server shutting down")
        ended = time.monotonic() + 5
        while self.live and time.monotonic() < ended:
            await asyncio.sleep(0.05)

    def call_started(self, carrier: str) -> None:
        self.active_calls[carrier] = self.active_calls.get(carrier, 0) + 1
        self.calls_total[carrier] = self.calls_total.get(carrier, 0) + 1
        self.metrics.calls.labels(carrier=carrier).inc()
        self.metrics.calls_total.labels(carrier=carrier).inc()

    def call_ended(self, carrier: str) -> None:
        self.active_calls[carrier] -= 1
        self.metrics.calls.labels(carrier=carrier).dec()

    def record_turn(self, turn: TurnTrace) -> None:
        self.recent_turns = (self.recent_turns + [turn])[-self.config.tracing.status_turns :]
        self.admission.record(turn)
        self.metrics.turns.labels(interrupted=str(turn.interrupted).lower()).inc()
        if turn.voice_to_voice_ms is not None:
            self.metrics.v2v.observe(turn.voice_to_voice_ms / 1000)
        adopted = int(turn.preemptive_adopted)
        self.metrics.preemptive.labels(outcome="adopted").inc(adopted)
        self.metrics.preemptive.labels(outcome="cancelled").inc(max(0, turn.preemptive_attempts - adopted))
        self.metrics.preemptive_tokens.inc(turn.preemptive_wasted_tokens)
        self.metrics.preemptive_synthesis.inc(turn.preemptive_wasted_synthesis_ms / 1000)


def create_app(config: Config, *, models: Models | None = None) -> FastAPI:
    """The FastAPI app. Models load in a worker thread at start-up unless given."""
    state = BotState(config)

    async def load():
        try:
            state.models = models or await asyncio.to_thread(load_models, config)
            await asyncio.to_thread(import_session_modules)
            freeze_loaded_models()
            state.ready_after = time.monotonic() - state.started
            logger.info(f"Ready in {state.ready_after:.1f} s")
        except Exception as e:
            state.load_error = f"{type(e).__name__}: {e}"
            logger.error(f"Model loading failed: {state.load_error}")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        loader = asyncio.create_task(load())
        watcher = asyncio.create_task(state.admission.watch_loop())
        yield
        loader.cancel()
        watcher.cancel()

    app = FastAPI(title="voxbot", lifespan=lifespan)
    app.state.bot = state
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # Phone calls: each carrier's webhook and media socket (transports/telephony/).
    mount_carriers(app, state, CARRIERS)

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.draining:
            return JSONResponse({"ready": False, "error": "shutting down"}, status_code=503)
        if state.models is None:
            body = {"ready": False, "error": state.load_error}
            return JSONResponse(body, status_code=503)
        if problems := await unreachable(remote_backends(config, stt_engine=state.models.stt_engine)):
            return JSONResponse({"ready": False, "error": "; ".join(problems)}, status_code=503)
        return {"ready": True, "seconds": round(state.ready_after or 0, 2)}

    @app.get("/status")
    async def status(request: Request):
        v2v = [t.voice_to_voice_ms for t in state.recent_turns if t.voice_to_voice_ms is not None]
        # The turns hold what users said: only for the token's holder, where there is a token.
        authorized = state.access.authorized(state.access.bearer(request.headers.get("authorization")))
        return {
            "ready": state.models is not None,
            "models": state.models.describe() if state.models else None,
            "active_sessions": state.active_sessions,
            "calls": {
                carrier: {"active": state.active_calls[carrier], "total": state.calls_total[carrier]}
                for carrier in state.active_calls
            },
            "turns": len(state.recent_turns),
            "voice_to_voice_ms": {"p50": percentile(v2v, 50), "p95": percentile(v2v, 95)},
            "recent_turns": [t.__dict__ for t in state.recent_turns[-10:]] if authorized else None,
        }

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        await websocket.accept()
        if not await state.access.admit(websocket):
            return
        if state.load_error:
            await refuse(websocket, code=1011, message=f"models failed to load: {state.load_error}")
            return
        if state.models is None:
            await refuse(websocket, code=1013, message="models are still loading; retry when /ready")
            return
        if state.draining:
            await refuse(websocket, code=1001, message=SHUTTING_DOWN)
            return
        if refusal := state.refusal():
            state.metrics.rejected.inc()
            await refuse(websocket, code=1013, message=refusal)
            return
        await run_session(websocket, state)

    return app


async def run_session(websocket: WebSocket, state: BotState) -> None:
    """Run one conversation until the client leaves."""
    config = state.config
    session_id = uuid.uuid4().hex[:12]
    try:
        transport = create_websocket_transport(
            websocket,
            in_sample_rate=config.audio.in_sample_rate,
            out_sample_rate=config.audio.out_sample_rate,
            session_timeout_s=config.server.session_timeout_s,
            max_message_bytes=config.server.max_message_bytes,
            allowed_origins=config.server.allowed_origins,
        )
    except ValueError as e:  # an origin not in server.allowed_origins
        await refuse(websocket, code=1008, message=str(e))
        return
    tracer = LatencyTracer(
        session_id=session_id,
        vad_stop_secs=config.vad.stop_secs,
        vad_start_secs=config.vad.start_secs,
        log_dir=config.tracing.dir,
        on_turn=state.record_turn,
    )
    session = build_pipeline(
        config=config,
        transport=transport,
        models=state.models,
        observers=[tracer, ClientEventsObserver(output=transport.output())],
    )

    @transport.event_handler("on_client_connected")
    async def on_connected(transport, client):
        ready = {
            "type": "ready",
            "session_id": session_id,
            "sample_rate_in": config.audio.in_sample_rate,
            "sample_rate_out": config.audio.out_sample_rate,
        }
        try:
            await websocket.send_json(ready)
        except (RuntimeError, OSError, WebSocketDisconnect):
            pass  # gone while its pipeline started: the disconnect ends the session

    end_with_the_socket(transport, session.worker, closed="client disconnected", timed_out="session timeout")

    async def farewell():
        await transport.output().say_last({"type": "error", "message": SHUTTING_DOWN})

    state.active_sessions += 1
    state.metrics.sessions.inc()
    state.metrics.sessions_total.inc()
    logger.info(f"[{session_id}] session started ({state.active_sessions} active)")
    try:
        with state.session(session_id, LiveSession(tracer=tracer, worker=session.worker, farewell=farewell)):
            runner = WorkerRunner(handle_sigint=False)
            await runner.add_workers(session.worker)
            await runner.run()
    except Exception:
        logger.exception(f"[{session_id}] session failed")
    finally:
        state.active_sessions -= 1
        state.metrics.sessions.dec()
        logger.info(f"[{session_id}] session ended ({state.active_sessions} active)")
        # Once this handler has returned, its pipeline is unreachable: collected then.
        asyncio.get_running_loop().call_soon(collect_finished_session, session_id)


def create_server(config: Config, *, host: str, port: int, models: Models | None = None) -> uvicorn.Server:
    """A uvicorn server for the app (port 0 picks a free one).

    WebSocket messages up to twice ``server.max_message_bytes`` reach the app, so an
    oversized one gets an error message rather than a dropped connection.

    Raises:
        ExposedWithoutTokenError: ``host`` is not loopback and nobody is asked for a token.
    """
    check_exposure(host=host, token=config.server.auth_token, allow_anonymous=config.server.allow_anonymous)
    app = create_app(config, models=models)
    return DrainingServer(
        uvicorn.Config(app, host=host, port=port, log_level="warning", ws_max_size=config.server.max_message_bytes * 2),
        state=app.state.bot,
    )


class DrainingServer(uvicorn.Server):
    """On SIGTERM (or Ctrl-C): stop accepting, let replies in progress finish, then close the sessions.

    uvicorn alone would close every WebSocket at once, cutting a reply mid-word.
    """

    def __init__(self, config: uvicorn.Config, *, state: BotState):
        super().__init__(config)
        self._state = state

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()
        # A second Ctrl-C (uvicorn's force_exit) cuts the wait short.
        await self._state.drain(timeout_s=self._state.config.server.drain_s, hurry=lambda: self.force_exit)
        await super().shutdown(sockets)
