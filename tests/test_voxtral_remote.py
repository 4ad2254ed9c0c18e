"""The remote Voxtral STT against a real loopback HTTP server speaking vLLM's transcription API."""

from __future__ import annotations

import asyncio
import io
import socket
import time
import wave

import numpy as np
from aiohttp import web

from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    TranscriptionFrame,
    TTSSpeakFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.tests.utils import run_test

from processors.apology import APOLOGY, FaultNoticeFrame
from processors.voxtral_remote_stt import VoxtralRemoteSTTService
from tests.loopback_http import serve_routes

RATE = 16000
TRAILING_SILENCE_SECS = 0.1
MODEL = "mistralai/Voxtral-Mini-3B-2507"
API_KEY = "sk-test"
TRANSCRIPT = "hello from vllm"


class FakeVLLM:
    """``POST /v1/audio/transcriptions`` as vLLM serves it, answering each request as scripted.

    ``answers`` is consumed in order: "ok", "error" (HTTP 500) or "hang" (never in time).
    """

    def __init__(self, answers: list[str]):
        self.answers = list(answers)
        self.requests: list[dict] = []

    async def transcriptions(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form["file"]
        self.requests.append(
            {
                "authorization": request.headers.get("Authorization"),
                "fields": {k: v for k, v in form.items() if k != "file"},
                "filename": upload.filename,
                "wav": upload.file.read(),
            }
        )
        answer = self.answers.pop(0) if self.answers else "ok"
        if answer == "error":
            return web.json_response({"error": "CUDA out of memory"}, status=500)
        if answer == "hang":
            await asyncio.sleep(30)
        return web.json_response({"text": f" {TRANSCRIPT} "})


def serve(server: FakeVLLM):
    """Run ``server`` on a free loopback port; yields its base URL."""
    return serve_routes([web.post("/v1/audio/transcriptions", server.transcriptions)])


def tone(seconds: float) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16).tobytes()


def turn(audio: bytes) -> list[Frame]:
    """One user turn as the STT sees it: VAD start, 20 ms audio frames, VAD stop."""
    step = RATE * 2 // 50
    return [
        VADUserStartedSpeakingFrame(),
        *(
            InputAudioRawFrame(audio=audio[i : i + step], sample_rate=RATE, num_channels=1)
            for i in range(0, len(audio), step)
        ),
        VADUserStoppedSpeakingFrame(stop_secs=0.2),
    ]


def stt(base_url: str, *, timeout_s: float = 5.0) -> VoxtralRemoteSTTService:
    return VoxtralRemoteSTTService(
        base_url=base_url,
        model=MODEL,
        api_key=API_KEY,
        language="en",
        timeout_s=timeout_s,
        trailing_silence_secs=TRAILING_SILENCE_SECS,
    )


def of_type(frames, kind) -> list:
    return [f for f in frames if isinstance(f, kind)]


def assert_apologized(down, says: str):
    """The user hears the apology, and the page is told what failed."""
    assert [f.text for f in of_type(down, TTSSpeakFrame)] == [APOLOGY]
    (notice,) = of_type(down, FaultNoticeFrame)
    assert says in notice.message, notice.message


async def test_uploads_a_wav_with_the_openai_fields_and_yields_the_transcript():
    server = FakeVLLM(["ok"])
    audio = tone(0.6)
    async with serve(server) as base_url:
        down, up = await run_test(stt(base_url), frames_to_send=turn(audio))

    (transcript,) = of_type(down, TranscriptionFrame)
    assert transcript.text == TRANSCRIPT
    assert transcript.language == "en"
    assert not of_type(up, ErrorFrame)

    (request,) = server.requests
    assert request["authorization"] == f"Bearer {API_KEY}"
    assert request["fields"] == {"model": MODEL, "language": "en", "response_format": "json"}
    assert request["filename"].endswith(".wav")
    with wave.open(io.BytesIO(request["wav"])) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, RATE)
        sent = wav.readframes(wav.getnframes())
    # The whole turn plus the trailing silence the service pads it with.
    assert sent == audio + bytes(int(RATE * TRAILING_SILENCE_SECS) * 2)


async def test_server_error_ends_only_that_turn():
    server = FakeVLLM(["error", "ok"])
    async with serve(server) as base_url:
        service = stt(base_url)
        down, up = await run_test(service, frames_to_send=turn(tone(0.3)) + turn(tone(0.3)))

    (error,) = of_type(up, ErrorFrame)
    assert base_url in error.error and "HTTP 500" in error.error
    assert_apologized(down, "HTTP 500")
    # The session goes on: the next turn is transcribed.
    assert [f.text for f in of_type(down, TranscriptionFrame)] == [TRANSCRIPT]
    assert len(server.requests) == 2
    assert service.is_usable


async def test_timeout_ends_the_turn_quickly_and_the_next_turn_works():
    server = FakeVLLM(["hang", "ok"])
    timeout_s = 0.5
    async with serve(server) as base_url:
        start = time.monotonic()
        down, up = await run_test(
            stt(base_url, timeout_s=timeout_s), frames_to_send=turn(tone(0.3)) + turn(tone(0.3))
        )
        elapsed = time.monotonic() - start

    (error,) = of_type(up, ErrorFrame)
    assert base_url in error.error and f"{timeout_s} s" in error.error
    assert_apologized(down, "did not answer")
    assert elapsed < timeout_s + 2.0, elapsed
    assert [f.text for f in of_type(down, TranscriptionFrame)] == [TRANSCRIPT]


async def test_unreachable_server_is_a_clear_error():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/v1"
    down, up = await run_test(stt(base_url, timeout_s=2.0), frames_to_send=turn(tone(0.3)))

    (error,) = of_type(up, ErrorFrame)
    assert f"{base_url}/audio/transcriptions is unreachable" in error.error
    assert_apologized(down, "is unreachable")
    assert not of_type(down, TranscriptionFrame)
