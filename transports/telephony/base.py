"""What every carrier plug-in shares: stream tokens, the call's serializer behaviour, the call itself.

A carrier plug-in (one module: ``twilio.py``, ``telnyx.py``) brings pipecat's serializer
for its media-stream protocol, its webhook and WebSocket routes, and its signature check.
Everything after the media socket is open is the same for every carrier and lives here:
the transport (pipecat's ``FastAPIWebsocketTransport`` at 8 kHz in and out, the pipeline
rate for the STT and the VAD), the pipeline (``bot.pipeline.build_pipeline``, as for the
browser), and the end of the call (the farewell plays out, the carrier confirms it with a
``mark``, then the call is hung up through the carrier's REST API).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from fastapi import FastAPI, Request, WebSocket
from loguru import logger

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    OutputAudioRawFrame,
    OutputTransportMessageUrgentFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketOutputTransport,
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)
from pipecat.workers.runner import WorkerRunner

from processors.barge_in import words_of
from transports.playback_gate import PausableOutputMixin
from transports.websocket import end_with_the_socket

if TYPE_CHECKING:
    from bot.server import BotState

# The carriers' frame: 20 ms of 8 kHz G.711.
CARRIER_RATE = 8000
# Frames held back waiting for a missing sequence number before it is given up on (60 ms).
REORDER_DEPTH = 3
# How long the first messages (connected, start) may take once the media socket is open.
START_TIMEOUT_S = 10.0
# How long a word waits for its mark to come back before the carrier is taken not to echo them.
WORD_MARK_TIMEOUT_S = 5.0
# Marks remembered after the audio they follow was sent (20 ms each: 10 s).
MARKS_KEPT = 500


# --- one-time stream tokens ------------------------------------------------------------


@dataclass
class CallTicket:
    """What a webhook learned about a call, handed to its media socket by a one-time token."""

    carrier: str
    call_id: str
    expires: float
    data: dict[str, Any] = field(default_factory=dict)


class TokenStore:
    """Short-lived, single-use tokens: only the carrier told by the webhook opens the call's stream."""

    def __init__(self, *, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self._ttl = ttl_s
        self._clock = clock
        self._tickets: dict[str, CallTicket] = {}

    def issue(self, carrier: str, call_id: str, **data) -> str:
        self._expire()
        token = secrets.token_urlsafe(24)
        self._tickets[token] = CallTicket(carrier, call_id, self._clock() + self._ttl, dict(data))
        return token

    def consume(self, token: str, carrier: str) -> CallTicket | None:
        """The call the token was issued for, once; None if unknown, used, expired or another carrier's."""
        self._expire()
        ticket = self._tickets.pop(token, None)
        if ticket is None or ticket.carrier != carrier:
            return None
        return ticket

    def _expire(self) -> None:
        now = self._clock()
        for token in [t for t, ticket in self._tickets.items() if ticket.expires <= now]:
            del self._tickets[token]

    def __len__(self) -> int:
        self._expire()
        return len(self._tickets)


# --- URLs the carrier sees -----------------------------------------------------------------


def public_http_url(request: Request, public_base_url: str | None) -> str:
    """The full URL the carrier requested (and signed): the configured public base, else the Host."""
    path_query = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if public_base_url:
        return public_base_url.rstrip("/") + path_query
    return str(request.url)


def public_ws_url(request: Request, public_base_url: str | None, path: str) -> str:
    """wss:// (or ws:// for a plain-HTTP base) URL of ``path`` on the public host."""
    base = public_base_url.rstrip("/") if public_base_url else f"{request.url.scheme}://{request.url.netloc}"
    if base.startswith("https://"):
        base = "wss://" + base[len("https://") :]
    elif base.startswith("http://"):
        base = "ws://" + base[len("http://") :]
    return base + path


# --- the serializer behaviour every carrier needs -----------------------------------------------


@dataclass
class HangUpResult:
    status: int | None
    already_ended: bool = False
    error: str | None = None


async def rest_hang_up(
    url: str,
    *,
    carrier: str,
    call_id: str,
    gone_status: int,
    auth: aiohttp.BasicAuth | None = None,
    headers: dict[str, str] | None = None,
    data: dict[str, str] | None = None,
    json_body: dict | None = None,
) -> HangUpResult:
    """POST the carrier's hang-up request; ``gone_status`` means the caller already hung up.

    Credentials travel only in ``auth``/``headers``: nothing here logs them.
    """
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.post(url, auth=auth, headers=headers, data=data, json=json_body) as response:
                if 200 <= response.status < 300:
                    logger.info(f"{carrier} call {call_id} hung up")
                    return HangUpResult(response.status)
                if response.status == gone_status:
                    logger.info(f"{carrier} call {call_id} had already ended (HTTP {response.status})")
                    return HangUpResult(response.status, already_ended=True)
                text = (await response.text())[:200]
                logger.error(f"{carrier} call {call_id}: hang-up refused, HTTP {response.status}: {text}")
                return HangUpResult(response.status, error=text)
    except Exception as e:  # the network: the call still ends on the carrier's side eventually
        logger.error(f"{carrier} call {call_id}: hang-up failed: {type(e).__name__}: {e}")
        return HangUpResult(None, error=str(e))


class CallSerializerMixin:
    """Mixed in before a pipecat carrier serializer: ordering, marks, the carrier's stop, hang-up.

    - ``media`` is played in the order of its chunk number: a frame that arrives early
      waits (at most ``REORDER_DEPTH`` frames) for the missing one; one that arrives too
      late is dropped rather than played out of place.
    - ``mark`` echoes (the carrier has played everything sent before the mark) wake
      :meth:`wait_mark`, so the call knows what the caller really heard. Marks are
      numbered in the order sent and echoed in that order: one number, the highest
      echoed, says which were played.
    - ``stop`` (the caller hung up) sets :attr:`stopped`; no REST hang-up follows it.
    - On the bot's own ``EndFrame``/``CancelFrame`` the call is hung up through the carrier's
      REST API (the subclass's ``_hang_up_call``), once.
    """

    carrier = "carrier"

    def _init_call(self) -> None:
        self.stopped = asyncio.Event()
        self.marks_played_upto = 0  # the number of the last mark the carrier echoed
        self._mark_waiters: dict[int, asyncio.Event] = {}
        self._next_chunk: int | None = None
        self._early: dict[int, bytes] = {}
        self.late_frames = 0
        self.hang_up_result: HangUpResult | None = None
        self._mark_counter = 0

    # Subclasses: the carrier's mark message, and how to decode a batch of payloads.
    def mark_message(self, name: str) -> dict:
        raise NotImplementedError

    def _media_message(self, payload: bytes) -> str:
        return json.dumps({"event": "media", "media": {"payload": base64.b64encode(payload).decode()}})

    def _on_start(self, message: dict) -> None:
        """A ``start`` message inside the stream (the call set-up reads the first one)."""

    def new_mark(self, prefix: str = "m") -> str:
        self._mark_counter += 1
        return f"{prefix}{self._mark_counter}"

    @staticmethod
    def _mark_number(name: str) -> int | None:
        digits = re.search(r"(\d+)$", name)
        return int(digits.group(1)) if digits else None

    async def wait_mark(self, name: str, *, timeout: float) -> bool:
        """Whether the carrier echoed mark ``name`` (played all audio sent before it) in time."""
        number = self._mark_number(name)
        if number is None:
            raise ValueError(f"{name!r} is not a mark made by new_mark")
        if number <= self.marks_played_upto:
            return True
        event = self._mark_waiters.setdefault(number, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._mark_waiters.pop(number, None)

    def _mark_echoed(self, name: str) -> None:
        number = self._mark_number(name)
        if number is None or number <= self.marks_played_upto:
            return  # not one of ours, or news already had
        self.marks_played_upto = number
        for waiting in [n for n in self._mark_waiters if n <= number]:
            self._mark_waiters[waiting].set()

    def _reorder(self, message: dict) -> list[bytes]:
        media = message.get("media") or {}
        payload = media.get("payload")
        if not payload:
            return []
        try:
            data = base64.b64decode(payload)
        except (ValueError, TypeError):
            return []
        seq = media.get("chunk") or message.get("sequenceNumber") or message.get("sequence_number")
        try:
            seq = int(seq)
        except (TypeError, ValueError):
            return [data]  # unnumbered: as it comes
        if self._next_chunk is None:
            self._next_chunk = seq
        if seq < self._next_chunk or seq in self._early:
            self.late_frames += 1
            return []
        self._early[seq] = data
        out: list[bytes] = []
        while True:
            while self._next_chunk in self._early:
                out.append(self._early.pop(self._next_chunk))
                self._next_chunk += 1
            if len(self._early) <= REORDER_DEPTH:
                return out
            # The missing frame is given up on: play on from the next one held.
            self._next_chunk = min(self._early)

    async def deserialize(self, data: str | bytes) -> Frame | None:
        try:
            message = json.loads(data)
        except (ValueError, TypeError):
            logger.warning(f"{self.carrier}: a message that is not JSON was ignored")
            return None
        if not isinstance(message, dict):
            return None
        event = message.get("event")
        if event == "media":
            track = (message.get("media") or {}).get("track")
            if track not in (None, "inbound", "inbound_track"):
                return None
            payloads = self._reorder(message)
            if not payloads:
                return None
            return await super().deserialize(self._media_message(b"".join(payloads)))
        if event == "mark":
            name = (message.get("mark") or {}).get("name")
            if isinstance(name, str):
                self._mark_echoed(name)
            return None
        if event == "stop":
            self.stopped.set()
            return None
        if event == "start":
            self._on_start(message)
            return None
        if event == "connected":
            return None
        return await super().deserialize(data)

    async def serialize(self, frame: Frame) -> str | bytes | None:
        if isinstance(frame, (EndFrame, CancelFrame)) and self.stopped.is_set():
            self._hangup_attempted = True  # the caller hung up: nothing to hang up
            return None
        return await super().serialize(frame)


# --- the transport ------------------------------------------------------------------------


class TelephonyOutputTransport(PausableOutputMixin, FastAPIWebsocketOutputTransport):
    """pipecat's FastAPI output with the bot's pause gate, and the carrier's word for what was played.

    Audio is sent in real time, but the carrier and the phone network buffer some of it.
    Every 20 ms frame is followed by a ``mark``; a word leaves for the context only once the
    carrier echoes the first mark sent after its audio began (it played everything before
    it), so a barge-in keeps only the words the caller heard. A carrier that never echoes
    a mark is trusted on pacing alone.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._marks_echoed = True
        self._sent_marks: deque[tuple[int, str]] = deque(maxlen=MARKS_KEPT)  # (clock time, name)
        self._mark_sent = asyncio.Event()

    def _call_serializer(self) -> CallSerializerMixin | None:
        serializer = self._params.serializer
        return serializer if self._marks_echoed and isinstance(serializer, CallSerializerMixin) else None

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        if not await self.playback_gate.admit():
            return False
        if not await super().write_audio_frame(frame):
            return False
        if serializer := self._call_serializer():
            name = serializer.new_mark("a")
            await self._write_frame(OutputTransportMessageUrgentFrame(message=serializer.mark_message(name)))
            self._sent_marks.append((self.get_clock().get_time(), name))
            self._mark_sent.set()
        return True

    async def listener_heard(self, frame: TTSTextFrame) -> bool:
        serializer = self._call_serializer()
        if serializer is None:
            return True
        epoch = self.playback_gate.epoch
        # The mark that followed the word's first audio: found by time, so a word let
        # through late (the one before it waited for its echo) is no later for it.
        while self._sent_marks and self._sent_marks[0][0] < frame.pts:
            self._sent_marks.popleft()
        while not self._sent_marks:
            self._mark_sent.clear()
            try:
                await asyncio.wait_for(self._mark_sent.wait(), WORD_MARK_TIMEOUT_S)
            except TimeoutError:
                return True  # no audio came after it: nothing to wait for
        name = self._sent_marks[0][1]
        if not await serializer.wait_mark(name, timeout=WORD_MARK_TIMEOUT_S):
            logger.warning(f"{serializer.carrier}: no mark echoed within {WORD_MARK_TIMEOUT_S} s; words count as sent")
            self._marks_echoed = False
        # A barge-in meanwhile: the carrier's clear echoes the marks of audio it never played.
        return epoch == self.playback_gate.epoch


class TelephonyTransport(FastAPIWebsocketTransport):
    """A call's media socket as a pipecat transport."""

    def __init__(self, websocket: WebSocket, params: FastAPIWebsocketParams, **kwargs):
        super().__init__(websocket, params, **kwargs)
        self._output = TelephonyOutputTransport(self, self._client, self._params, name=self._output_name)


def create_telephony_transport(websocket: WebSocket, serializer, *, in_sample_rate: int, session_timeout_s: int):
    """8 kHz G.711 on the line; the serializer resamples to the pipeline rate with soxr."""
    return TelephonyTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_in_sample_rate=in_sample_rate,
            audio_out_enabled=True,
            audio_out_sample_rate=CARRIER_RATE,
            # 20 ms a message, as carriers send: the carrier's buffer stays one frame deep.
            audio_out_10ms_chunks=2,
            add_wav_header=False,
            serializer=serializer,
            session_timeout=session_timeout_s,
            allowed_origins=[],
        ),
    )


# --- the end of a call -----------------------------------------------------------------------


class CallController(BaseObserver):
    """Ends the call when the bot should: a goodbye from the caller, or nobody speaking for a while.

    The farewell (or the reply to the goodbye) plays out first; then a ``mark`` is sent and,
    once the carrier echoes it (everything before it was played to the caller) or after
    ``mark_timeout_s``, an ``EndFrame`` hangs the call up through the carrier's REST API.
    """

    def __init__(
        self,
        *,
        serializer: CallSerializerMixin,
        output,
        idle_hangup_secs: float | None,
        farewell: str,
        goodbye_words: list[str],
        mark_timeout_s: float,
    ):
        super().__init__()
        self._serializer = serializer
        self._output = output
        self._idle = idle_hangup_secs
        self._farewell = farewell
        self._goodbye = {w.lower() for w in goodbye_words}
        self._mark_timeout = mark_timeout_s
        self.worker = None
        self._last_activity = time.monotonic()
        self._bot_speaking = False
        self._user_speaking = False
        self._bye_after_reply = False
        self._reply_pending = False
        self._bot_stopped = asyncio.Event()
        self._ending: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self.ended_by: str | None = None

    def start(self, worker) -> None:
        self.worker = worker
        if self._idle:
            self._watch = asyncio.get_running_loop().create_task(self._watch_idle(), name="call-idle-watch")

    async def stop(self) -> None:
        for task in (self._watch, self._ending):
            if task and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass

    async def on_push_frame(self, data: FramePushed):
        frame = data.frame
        if isinstance(frame, BotStartedSpeakingFrame) and data.source is self._output:
            self._bot_speaking = True
            self._bot_stopped.clear()
        elif isinstance(frame, BotStoppedSpeakingFrame) and data.source is self._output:
            self._bot_speaking = False
            self._reply_pending = False
            self._last_activity = time.monotonic()
            self._bot_stopped.set()
            if self._bye_after_reply:
                self._bye_after_reply = False
                self.end(reason="goodbye")
        elif isinstance(frame, (UserStartedSpeakingFrame, VADUserStartedSpeakingFrame)):
            self._user_speaking = True
            self._last_activity = time.monotonic()
        elif isinstance(frame, (UserStoppedSpeakingFrame, VADUserStoppedSpeakingFrame)):
            self._user_speaking = False
            self._last_activity = time.monotonic()
        elif isinstance(frame, (LLMFullResponseStartFrame, LLMTextFrame, TTSAudioRawFrame)) and data.source is not self._output:
            # A reply on its way (generated, or synthesized and held until it can play without
            # a hole) is no silence on the line. Only its start marks it pending: a late text or
            # audio frame seen after the bot stopped once held a call for another minute.
            self._last_activity = time.monotonic()
            self._reply_pending |= isinstance(frame, LLMFullResponseStartFrame)
        elif isinstance(frame, InterruptionFrame):
            self._reply_pending = False
        elif (
            isinstance(frame, TranscriptionFrame)
            and data.direction == FrameDirection.DOWNSTREAM
            and data.first_push
            and self._goodbye & set(words_of(frame.text))
        ):
            self._bye_after_reply = True

    async def _watch_idle(self):
        while True:
            await asyncio.sleep(0.25)
            quiet = not self._bot_speaking and not self._user_speaking
            # A reply still to be heard holds the line (a minute at most: it may never come).
            wait = self._idle + (60.0 if self._reply_pending else 0.0)
            if quiet and self._ending is None and time.monotonic() - self._last_activity >= wait:
                self.end(reason="idle", farewell=self._farewell)
                return

    def end(self, *, reason: str, farewell: str | None = None) -> None:
        """End the call (once): say ``farewell`` if given, let it play, then hang up."""
        if self._ending is None and self.worker is not None:
            self.ended_by = reason
            self._ending = asyncio.get_running_loop().create_task(self._end(farewell), name="call-end")

    async def _end(self, farewell: str | None):
        logger.info(f"{self._serializer.carrier}: ending the call ({self.ended_by})")
        if farewell:
            self._bot_stopped.clear()
            await self.worker.queue_frame(TTSSpeakFrame(farewell))
            try:
                await asyncio.wait_for(self._bot_stopped.wait(), 60)
            except TimeoutError:
                logger.warning("the farewell did not finish playing within 60 s")
        # The carrier echoes the mark once it has played everything sent before it.
        name = self._serializer.new_mark("hangup-")
        await self._output.send_message(
            OutputTransportMessageUrgentFrame(message=self._serializer.mark_message(name))
        )
        if not await self._serializer.wait_mark(name, timeout=self._mark_timeout):
            logger.debug(f"no mark {name!r} echoed within {self._mark_timeout} s; hanging up anyway")
        await self.worker.queue_frame(EndFrame())


# --- running a call -------------------------------------------------------------------------


async def open_media_socket(
    websocket: WebSocket,
    *,
    token: str,
    tokens: TokenStore,
    state: BotState,
    carrier: str,
    call_id_field: str,
    call_id_required: bool,
) -> tuple[CallTicket, dict] | None:
    """Accept a carrier's media socket on its one-time token, and read its ``start`` message.

    None once the socket is closed: an unknown, used or expired token (1008), models not
    loaded yet (1013), no ``start`` message (1008), or one whose ``call_id_field`` names
    another call than the token's, or none where ``call_id_required`` (1008).
    """
    ticket = tokens.consume(token, carrier)
    if ticket is None:
        logger.warning(f"{carrier}: media socket refused: unknown, used or expired stream token")
        await websocket.close(code=1008, reason="unknown, used or expired stream token")
        return None
    await websocket.accept()
    if state.models is None:
        await websocket.close(code=1013, reason="models are still loading")
        return None
    start = await _read_start(websocket)
    if start is None:
        await websocket.close(code=1008, reason="no start message")
        return None
    named = (start.get("start") or {}).get(call_id_field)
    if named != ticket.call_id and (named is not None or call_id_required):
        logger.warning(f"{carrier}: media socket refused: its {call_id_field} is not the token's call")
        await websocket.close(code=1008, reason=f"{call_id_field} is not the token's call")
        return None
    return ticket, start


async def _read_start(websocket: WebSocket) -> dict | None:
    """The carrier's ``start`` message (``connected`` may come before it); None if it never comes."""
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                raw = await websocket.receive_text()
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(message, dict) and message.get("event") == "start":
                    return message
    except (TimeoutError, Exception) as e:
        logger.warning(f"telephony: no start message on the media socket ({type(e).__name__})")
        return None


async def run_call(
    websocket: WebSocket,
    state: BotState,
    *,
    carrier: str,
    call_id: str,
    serializer: CallSerializerMixin,
) -> None:
    """Run the bot on one call until it ends (the caller's ``stop``, the socket closing, or a hang-up)."""
    from bot.pipeline import build_pipeline
    from bot.server import LiveSession
    from bot.tracing import LatencyTracer

    config = state.config
    session_id = f"{carrier}-{call_id}"
    transport = create_telephony_transport(
        websocket,
        serializer,
        in_sample_rate=config.audio.in_sample_rate,
        session_timeout_s=config.server.session_timeout_s,
    )
    tracer = LatencyTracer(
        session_id=session_id,
        vad_stop_secs=config.vad.stop_secs,
        vad_start_secs=config.vad.start_secs,
        log_dir=config.tracing.dir,
        on_turn=state.record_turn,
    )
    tel = config.telephony
    controller = CallController(
        serializer=serializer,
        output=transport.output(),
        idle_hangup_secs=tel.idle_hangup_secs,
        farewell=tel.farewell,
        goodbye_words=tel.goodbye_words,
        mark_timeout_s=tel.hangup_mark_timeout_s,
    )
    session = build_pipeline(
        config=config, transport=transport, models=state.models, observers=[tracer, controller]
    )

    end_with_the_socket(transport, session.worker, closed="carrier closed the media stream", timed_out="call timeout")

    async def on_stop():
        await serializer.stopped.wait()
        logger.info(f"[{session_id}] the caller hung up")
        await session.worker.cancel(reason="caller hung up")

    state.call_started(carrier)
    logger.info(f"[{session_id}] call started")
    stop_watch = asyncio.create_task(on_stop(), name="call-stop-watch")
    try:
        with state.session(session_id, LiveSession(tracer=tracer, worker=session.worker)):
            runner = WorkerRunner(handle_sigint=False)
            await runner.add_workers(session.worker)
            controller.start(session.worker)
            await runner.run()
    except Exception:
        logger.exception(f"[{session_id}] call failed")
    finally:
        await controller.stop()
        stop_watch.cancel()
        try:
            await stop_watch
        except (asyncio.CancelledError, Exception):
            pass
        state.call_ended(carrier)
        logger.info(f"[{session_id}] call ended ({controller.ended_by or 'by the caller'})")


# --- plug-ins --------------------------------------------------------------------------------


@dataclass
class CarrierPlugin:
    """A carrier: its name and how it mounts its routes (webhook + media socket) on the app."""

    name: str
    mount: Callable[[FastAPI, BotState, TokenStore], None]
    # Start-up warnings (e.g. signatures not checked), in words.
    warnings: Callable[[Any], list[str]] = lambda config: []


def mount_carriers(app: FastAPI, state: BotState, carriers: dict[str, CarrierPlugin]) -> TokenStore:
    """Mount every enabled carrier's routes; one token store for all of them."""
    tokens = TokenStore(ttl_s=state.config.telephony.stream_token_ttl_s)
    for name, plugin in carriers.items():
        section = getattr(state.config.telephony, name, None)
        if section is not None and not section.enabled:
            continue
        plugin.mount(app, state, tokens)
        for warning in plugin.warnings(state.config):
            logger.warning(f"telephony: {warning}")
    return tokens


def new_call_id() -> str:
    return uuid.uuid4().hex[:12]
