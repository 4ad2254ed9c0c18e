"""The browser transport: raw PCM over a WebSocket, JSON for everything else.

Wire protocol (one connection = one conversation):

- client -> server, binary: 16-bit little-endian mono PCM at the declared rate
  (default the pipeline's input rate), whole samples in each message.
- client -> server, text: ``{"type": "auth", "token": ...}`` first, where the server asks
  for a token (bot/access.py); ``{"type": "start", "sample_rate": 48000}`` declares the
  microphone rate (resampled server-side with soxr); ``{"type": "ping"}``.
- server -> client, binary: 16-bit mono PCM at the pipeline's output rate.
- server -> client, text: ``{"type": "ready", "session_id": ..., "sample_rate_in": ...,
  "sample_rate_out": ...}`` (first), ``{"type": "transcript", "text": ...}`` (what the user
  said, per turn), ``{"type": "bot_text", "text": ...}`` (each word as its audio is sent),
  ``{"type": "pause"}`` (hold playback: the user may be barging in), ``{"type": "resume"}``
  (play on: it was not a barge-in), ``{"type": "interrupt"}`` (flush playback now; it ends a
  pause), ``{"type": "error", "message": ...}``, ``{"type": "pong"}``.

Bad input gets an error message; it never ends the session.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import soxr
from fastapi import WebSocket
from loguru import logger

from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputTransportMessageFrame,
    OutputTransportMessageUrgentFrame,
    TranscriptionFrame,
    TTSTextFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.serializers.base_serializer import FrameSerializer
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketOutputTransport,
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)

from processors.apology import FaultNoticeFrame
from transports.playback_gate import PausableOutputMixin

if TYPE_CHECKING:
    from pipecat.pipeline.worker import PipelineWorker

# A browser sends at its AudioContext rate: the output device's rate unless told otherwise.
SUPPORTED_INPUT_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)


def error_frame(message: str) -> OutputTransportMessageUrgentFrame:
    """A frame that tells the client what was wrong with its input."""
    return OutputTransportMessageUrgentFrame(message={"type": "error", "message": message})


class PCMJSONSerializer(FrameSerializer):
    """Raw PCM audio both ways plus small JSON events: easy for a plain web page."""

    def __init__(self, *, max_message_bytes: int = 64_000, **kwargs):
        """Initialize the serializer.

        Args:
            max_message_bytes: Larger messages are refused (about 2 s of 16 kHz audio).
            **kwargs: Passed to ``FrameSerializer``.
        """
        super().__init__(**kwargs)
        self._max_bytes = max_message_bytes
        self._pipeline_rate = 16000
        self._resampler: soxr.ResampleStream | None = None

    async def setup(self, setup: FrameProcessorSetup):
        self._pipeline_rate = setup.audio_in_sample_rate or self._pipeline_rate

    async def serialize(self, frame: Frame) -> str | bytes | None:
        if isinstance(frame, OutputAudioRawFrame):
            return frame.audio
        if isinstance(frame, InterruptionFrame):
            return json.dumps({"type": "interrupt"})
        if isinstance(frame, (OutputTransportMessageFrame, OutputTransportMessageUrgentFrame)):
            if self.should_ignore_frame(frame):
                return None
            return json.dumps(frame.message)
        return None

    async def deserialize(self, data: str | bytes) -> Frame | None:
        if len(data) > self._max_bytes:
            return error_frame(f"message of {len(data)} bytes exceeds the {self._max_bytes}-byte limit")
        if isinstance(data, bytes):
            return self._audio(data)
        try:
            message = json.loads(data)
            kind = message["type"]
        except (ValueError, TypeError, KeyError):
            return error_frame('text messages must be JSON objects with a "type"')
        if kind == "start":
            rate = message.get("sample_rate")
            if rate not in SUPPORTED_INPUT_RATES:
                return error_frame(f"sample_rate must be one of {SUPPORTED_INPUT_RATES}, got {rate!r}")
            # A stream resampler keeps state across messages, so chunk edges don't click.
            self._resampler = (
                soxr.ResampleStream(rate, self._pipeline_rate, 1, dtype="int16")
                if rate != self._pipeline_rate
                else None
            )
            return None
        if kind == "auth":
            return None  # the token was checked before the session began (bot/access.py)
        if kind == "ping":
            return OutputTransportMessageUrgentFrame(message={"type": "pong"})
        return error_frame(f"unknown message type {kind!r}")

    def _audio(self, data: bytes) -> Frame | None:
        if len(data) % 2:
            # Dropped whole: playing it would shift every later sample by a byte.
            return error_frame(f"audio messages must hold whole 16-bit samples, got {len(data)} bytes")
        if self._resampler is not None:
            data = self._resampler.resample_chunk(np.frombuffer(data, dtype=np.int16)).tobytes()
        if not data:
            return None
        return InputAudioRawFrame(audio=data, sample_rate=self._pipeline_rate, num_channels=1)


class ClientEventsObserver(BaseObserver):
    """Sends the client what the user said and what the bot says.

    The FastAPI output transport only serializes audio, interruptions and transport
    messages, and the user aggregator consumes transcriptions, so the serializer
    never sees these frames: they are turned into transport messages here.
    """

    def __init__(self, *, output: BaseOutputTransport):
        """Initialize the observer.

        Args:
            output: The session's output transport; the messages go out through it.
        """
        super().__init__()
        self._output = output

    async def on_push_frame(self, data: FramePushed):
        frame = data.frame
        if isinstance(frame, TranscriptionFrame) and data.direction == FrameDirection.DOWNSTREAM:
            if not data.first_push or not frame.text.strip():
                return
            message = {"type": "transcript", "text": frame.text.strip()}
        elif isinstance(frame, TTSTextFrame) and data.source is self._output:
            # The output transport passes each word on as its audio is sent: what was heard.
            message = {"type": "bot_text", "text": frame.text}
        elif isinstance(frame, FaultNoticeFrame) and data.first_push:
            message = {"type": "error", "message": f"Sorry, {frame.message}"}
        else:
            return
        await self._output.queue_frame(OutputTransportMessageUrgentFrame(message=message))


class PausableWebsocketOutputTransport(PausableOutputMixin, FastAPIWebsocketOutputTransport):
    """Holds the audio while the user may be barging in, and tells the page to hold its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._said_last = False

    async def say_last(self, message: dict) -> None:
        """Send the session's last message: nothing the pipeline still has in hand follows it."""
        self._said_last = True
        await super()._write_frame(OutputTransportMessageUrgentFrame(message=message))

    async def _write_frame(self, frame: Frame) -> bool:
        if self._said_last:
            return False
        return await super()._write_frame(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        if not await self.playback_gate.admit():
            return False
        return await super().write_audio_frame(frame)

    async def on_playback_paused(self) -> None:
        await self.send_message(OutputTransportMessageUrgentFrame(message={"type": "pause"}))

    async def on_playback_resumed(self) -> None:
        await self.send_message(OutputTransportMessageUrgentFrame(message={"type": "resume"}))


class VoxbotWebsocketTransport(FastAPIWebsocketTransport):
    """pipecat's FastAPI WebSocket transport with an output that can pause."""

    def __init__(self, websocket: WebSocket, params: FastAPIWebsocketParams, **kwargs):
        super().__init__(websocket, params, **kwargs)
        self._output = PausableWebsocketOutputTransport(
            self, self._client, self._params, name=self._output_name
        )


def create_websocket_transport(
    websocket: WebSocket,
    *,
    in_sample_rate: int,
    out_sample_rate: int,
    session_timeout_s: int,
    max_message_bytes: int,
    allowed_origins: list[str],
) -> VoxbotWebsocketTransport:
    """A pipecat FastAPI WebSocket transport speaking :class:`PCMJSONSerializer`."""
    logger.debug(f"websocket transport: in {in_sample_rate} Hz, out {out_sample_rate} Hz")
    return VoxbotWebsocketTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_in_sample_rate=in_sample_rate,
            audio_out_enabled=True,
            audio_out_sample_rate=out_sample_rate,
            add_wav_header=False,
            serializer=PCMJSONSerializer(max_message_bytes=max_message_bytes),
            session_timeout=session_timeout_s,
            allowed_origins=allowed_origins,
        ),
    )


def end_with_the_socket(transport: FastAPIWebsocketTransport, worker: PipelineWorker, *, closed: str, timed_out: str) -> None:
    """Cancel the session's pipeline when its socket closes or its time is up (browser or phone)."""

    @transport.event_handler("on_client_disconnected")
    async def on_disconnected(transport, client):
        await worker.cancel(reason=closed)

    @transport.event_handler("on_session_timeout")
    async def on_timeout(transport, client):
        await worker.cancel(reason=timed_out)
