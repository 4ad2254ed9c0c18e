"""A scripted carrier: speaks Twilio's and Telnyx's media-stream protocols as the carrier would.

- :class:`PhoneCaller` is the carrier's side of a media WebSocket: ``connected`` and
  ``start`` first, then a 20 ms G.711 ``media`` frame every 20 ms of wall time (the
  caller's speech, or line silence), numbered like the carrier numbers them. What the bot
  sends is played into a model of the carrier's jitter buffer: ``mark`` is echoed when
  everything sent before it has played, ``clear`` empties the buffer (and echoes the
  marks still waiting, as Twilio does).
- :class:`CarrierAPI` is the carrier's REST API on loopback: it records each request
  (method, path, auth header, body, time) and answers with a chosen status.
- G.711 here is written from the ITU reference (not pipecat's), so the bot is checked
  against an independent codec.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import soxr
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

RATE = 8000
FRAME = 160  # 20 ms at 8 kHz
SILENCE_PEAK = 100  # about -50 dBFS, as transports/scripted.py


# --- G.711 (ITU-T reference algorithm) ---------------------------------------------------


def _ulaw_byte(sample: int) -> int:
    bias, clip = 0x84, 32635
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), clip) + bias
    exponent = max(0, min(7, magnitude.bit_length() - 8))
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def _ulaw_sample(byte: int) -> int:
    u = ~byte & 0xFF
    magnitude = ((((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)) - 0x84
    return -magnitude if u & 0x80 else magnitude


def _alaw_byte(sample: int) -> int:
    pcm = sample >> 3
    if pcm >= 0:
        mask = 0xD5
    else:
        mask, pcm = 0x55, -pcm - 1
    for seg, end in enumerate((0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)):
        if pcm <= end:
            break
    else:
        return 0x7F ^ mask
    value = seg << 4 | ((pcm >> 1) if seg < 2 else (pcm >> seg)) & 0x0F
    return value ^ mask


def _alaw_sample(byte: int) -> int:
    a = byte ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (seg - 1)
    return t if a & 0x80 else -t


_ENCODE = {
    "PCMU": np.array([_ulaw_byte(s) for s in range(-32768, 32768)], dtype=np.uint8),
    "PCMA": np.array([_alaw_byte(s) for s in range(-32768, 32768)], dtype=np.uint8),
}
_DECODE = {
    "PCMU": np.array([_ulaw_sample(b) for b in range(256)], dtype=np.int16),
    "PCMA": np.array([_alaw_sample(b) for b in range(256)], dtype=np.int16),
}


def g711_encode(audio: np.ndarray, encoding: str = "PCMU") -> bytes:
    return _ENCODE[encoding][audio.astype(np.int32) + 32768].tobytes()


def g711_decode(data: bytes, encoding: str = "PCMU") -> np.ndarray:
    return _DECODE[encoding][np.frombuffer(data, dtype=np.uint8)]


def to_line(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """int16 audio at ``sample_rate`` as the phone line carries it: 8 kHz int16 (before G.711)."""
    if sample_rate == RATE:
        return audio.astype(np.int16)
    return soxr.resample(audio.astype(np.float32), sample_rate, RATE).clip(-32768, 32767).astype(np.int16)


def is_loud(audio: np.ndarray) -> bool:
    return audio.size > 0 and int(np.abs(audio.astype(np.int32)).max()) > 1000


# --- the carrier's media socket ------------------------------------------------------------------


@dataclass
class Received:
    """Everything the bot sent on the stream, with arrival times (time.monotonic())."""

    media: list[tuple[float, np.ndarray]] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)
    marks_echoed: list[tuple[float, str]] = field(default_factory=list)
    other: list[dict] = field(default_factory=list)
    closed_at: float | None = None

    def audio(self, *, since: float = 0.0, until: float = float("inf")) -> np.ndarray:
        chunks = [a for t, a in self.media if since <= t < until]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)

    def first_loud_after(self, t: float) -> float | None:
        for at, audio in self.media:
            if at >= t and is_loud(audio):
                return at
        return None

    def last_loud(self) -> float | None:
        return next((at for at, audio in reversed(self.media) if is_loud(audio)), None)


class PhoneCaller:
    """The carrier's end of one media stream (Twilio or Telnyx), with a caller speaking into it."""

    def __init__(
        self,
        ws: ClientConnection,
        *,
        carrier: str,
        call_id: str,
        stream_id: str = "MZ00000000000000000000000000000000",
        account_sid: str = "ACtest",
        encoding: str = "PCMU",
        shuffle: bool = False,
        buffer_secs: float = 0.0,
    ):
        self.ws = ws
        self.carrier = carrier
        self.call_id = call_id
        self.stream_id = stream_id
        self.account_sid = account_sid
        self.encoding = encoding
        self.shuffle = shuffle  # swap neighbouring media frames, as a jittery network does
        self.buffer_secs = buffer_secs  # the bot's audio plays this long after it arrives (a jitter buffer)
        self.received = Received()
        self._seq = 0
        self._chunk = 0
        self._queue: list[np.ndarray] = []
        self._spoken = asyncio.Event()
        self._play_end = 0.0
        self._pending_marks: dict[str, asyncio.Task] = {}
        self._sender: asyncio.Task | None = None
        self._reader: asyncio.Task | None = None
        self.speech_end: float | None = None  # when the last spoken frame (not line silence) left
        self.last_voice_sent: float | None = None  # when the last non-silent frame left (end of speech)

    # The carrier's messages -----------------------------------------------------------------

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    def _envelope(self, event: str, **body) -> dict:
        if self.carrier == "twilio":
            return {"event": event, "sequenceNumber": self._next_seq(), **body, "streamSid": self.stream_id}
        return {"event": event, "sequence_number": self._next_seq(), **body, "stream_id": self.stream_id}

    def start_message(self) -> dict:
        if self.carrier == "twilio":
            return self._envelope(
                "start",
                start={
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_id,
                    "callSid": self.call_id,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": {},
                },
            )
        return self._envelope(
            "start",
            start={
                "user_id": "test-user",
                "call_control_id": self.call_id,
                "client_state": None,
                "from": "+15550001111",
                "to": "+15550002222",
                "media_format": {"encoding": self.encoding, "sample_rate": 8000, "channels": 1},
            },
        )

    def media_message(self, payload: bytes) -> dict:
        self._chunk += 1
        return self._envelope(
            "media",
            media={
                "track": "inbound",
                "chunk": str(self._chunk),
                "timestamp": str((self._chunk - 1) * 20),
                "payload": base64.b64encode(payload).decode(),
            },
        )

    def stop_message(self) -> dict:
        if self.carrier == "twilio":
            return self._envelope("stop", stop={"accountSid": self.account_sid, "callSid": self.call_id})
        return self._envelope("stop", stop={"user_id": "test-user", "call_control_id": self.call_id})

    # The call ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """connected, start, then the line runs: 20 ms of audio every 20 ms until hang-up."""
        connected = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        if self.carrier == "telnyx":
            connected = {"event": "connected", "version": "1.0.0"}
        await self.ws.send(json.dumps(connected))
        await self.ws.send(json.dumps(self.start_message()))
        self._reader = asyncio.create_task(self._read())
        self._sender = asyncio.create_task(self._line())

    async def say(self, audio: np.ndarray, *, sample_rate: int, wait: bool = True) -> None:
        """Speak ``audio`` into the line in real time; returns when its last frame is sent."""
        line = to_line(audio, sample_rate)
        self._spoken.clear()
        self._queue.extend(line[i : i + FRAME] for i in range(0, len(line), FRAME))
        if wait:
            await self._spoken.wait()

    async def _line(self):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = 0
        held: dict | None = None
        try:
            while True:
                if self._queue:
                    frame = self._queue.pop(0)
                    frame = np.pad(frame, (0, FRAME - len(frame)))
                    if not self._queue:
                        self.speech_end = time.monotonic()
                        self._spoken.set()
                else:
                    frame = np.zeros(FRAME, np.int16)
                if int(np.abs(frame.astype(np.int32)).max()) > SILENCE_PEAK:
                    self.last_voice_sent = time.monotonic()
                message = self.media_message(g711_encode(frame, self.encoding))
                if self.shuffle and held is None and n % 10 == 5:
                    held = message  # sent after the next one: out of order
                else:
                    await self.ws.send(json.dumps(message))
                    if held is not None:
                        await self.ws.send(json.dumps(held))
                        held = None
                n += 1
                await asyncio.sleep(max(0.0, t0 + n * 0.02 - loop.time()))
        except ConnectionClosed:
            pass

    async def _read(self):
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                now = time.monotonic()
                event = message.get("event")
                if event == "media":
                    audio = g711_decode(base64.b64decode(message["media"]["payload"]), self.encoding)
                    self.received.media.append((now, audio))
                    self._play_end = max(now + self.buffer_secs, self._play_end) + len(audio) / RATE
                elif event == "clear":
                    self.received.clears.append(now)
                    self._play_end = now
                    for name, task in list(self._pending_marks.items()):
                        task.cancel()
                        await self._echo_mark(name)
                elif event == "mark":
                    name = message["mark"]["name"]
                    self.received.marks.append((now, name))
                    self._pending_marks[name] = asyncio.create_task(self._mark_when_played(name, self._play_end))
                else:
                    self.received.other.append(message)
        except ConnectionClosed:
            pass
        self.received.closed_at = time.monotonic()

    async def _mark_when_played(self, name: str, due: float):
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        await self._echo_mark(name)

    async def _echo_mark(self, name: str):
        self._pending_marks.pop(name, None)
        self.received.marks_echoed.append((time.monotonic(), name))
        try:
            await self.ws.send(json.dumps(self._envelope("mark", mark={"name": name})))
        except ConnectionClosed:
            pass

    async def hang_up(self) -> None:
        """The caller hangs up: ``stop``, then the carrier closes the socket."""
        await self._stop_line()
        try:
            await self.ws.send(json.dumps(self.stop_message()))
            await self.ws.close()
        except ConnectionClosed:
            pass

    async def wait_closed(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
            return True
        except TimeoutError:
            return False

    async def _stop_line(self):
        if self._sender:
            self._sender.cancel()
            try:
                await self._sender
            except (asyncio.CancelledError, ConnectionClosed):
                pass

    async def close(self):
        await self._stop_line()
        for task in list(self._pending_marks.values()):
            task.cancel()
        await self.ws.close()
        if self._reader:
            await self._reader


# --- the carrier's REST API on loopback -------------------------------------------------------


@dataclass
class APIRequest:
    method: str
    path: str
    authorization: str | None
    body: bytes
    at: float

    def json(self):
        return json.loads(self.body or b"{}")


class CarrierAPI:
    """A tiny HTTP server on 127.0.0.1 that records requests and answers ``status``/``body``."""

    def __init__(self, *, status: int = 200, body: dict | None = None):
        self.status = status
        self.body = body if body is not None else {}
        self.requests: list[APIRequest] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                data = self.rfile.read(length) if length else b""
                api.requests.append(
                    APIRequest("POST", self.path, self.headers.get("authorization"), data, time.monotonic())
                )
                reply = json.dumps(api.body).encode()
                self.send_response(api.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="carrier-api", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    async def wait_for(self, check, timeout: float = 30.0) -> APIRequest | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for request in list(self.requests):
                if check(request):
                    return request
            await asyncio.sleep(0.05)
        return None
