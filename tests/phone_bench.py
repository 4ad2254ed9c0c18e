"""The figures of docs/telephony.md: a scripted phone call next to /ws, and Whisper on 8 kHz mu-law.

    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.phone_bench --runs 5 --json

- Voice-to-voice: the real server on loopback; the same question (Kokoro, the test voice)
  asked alternately over /ws (16 kHz PCM, as a browser) and over a Twilio media stream
  (8 kHz mu-law, tests/phone_caller.py), each measured at the client from the moment the
  last non-silent frame of the question left to the arrival of the first non-silent frame
  of the answer.
- WER: every question of the scenarios plus a few more, spoken by Kokoro, transcribed by
  the bot's Whisper from 16 kHz and from 8 kHz mu-law decoded the bot's way (the Twilio
  serializer: mu-law to PCM, soxr up to 16 kHz).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import subprocess
import time

import httpx
import jiwer
import numpy as np
from pydantic import SecretStr
from websockets.asyncio.client import connect

from pipecat.serializers.twilio import TwilioFrameSerializer

from bot.config import load_config
from bot.models import load_models
from bot.scenarios import Speaker, load_scenarios
from tests.phone_caller import SILENCE_PEAK, CarrierAPI, PhoneCaller, g711_encode, to_line
from transports.telephony.twilio import TwilioCallSerializer, twilio_signature

QUESTION = "What is the capital of France?"
EXTRA_QUESTIONS = [
    "How far away is the moon?",
    "Can you recommend a good book for a long flight?",
    "What time does the pharmacy on Main Street close?",
    "I would like to book a table for four people tomorrow evening.",
    "Please remind me to call my sister on Saturday morning.",
    "What is the weather like in Seattle this week?",
    "How do I reset the password on my account?",
    "Spell the word necessary for me.",
]


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def normalize(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def peak(audio: np.ndarray) -> int:
    return int(np.abs(audio.astype(np.int32)).max()) if audio.size else 0


# --- WER ---------------------------------------------------------------------------------


async def phone_path(audio_16k: np.ndarray) -> np.ndarray:
    """16 kHz speech as the bot hears it from a phone: 8 kHz mu-law, decoded by its serializer."""
    serializer = TwilioCallSerializer(stream_sid="MZ", params=TwilioFrameSerializer.InputParams(auto_hang_up=False))
    serializer._sample_rate = 16000
    ulaw = g711_encode(to_line(audio_16k, 16000))
    out = []
    for i, start in enumerate(range(0, len(ulaw), 160)):
        message = {"event": "media", "media": {"chunk": str(i + 1), "payload": base64.b64encode(ulaw[start : start + 160]).decode()}}
        frame = await serializer.deserialize(json.dumps(message))
        if frame is not None:
            out.append(np.frombuffer(frame.audio, dtype=np.int16))
    return np.concatenate(out)


def transcribe(models, audio_16k: np.ndarray) -> str:
    segments, _ = models.whisper.transcribe(audio_16k.astype(np.float32) / 32768, language="en", beam_size=1)
    return " ".join(s.text for s in segments)


async def wer_figures(models, speaker: Speaker) -> dict:
    questions = sorted({p.strip() for s in load_scenarios() for t in s.turns if t.say for p in t.say.split("...") if p.strip()})
    questions += EXTRA_QUESTIONS
    refs, wide, narrow = [], [], []
    for q in questions:
        audio = (np.concatenate([np.zeros(3200, np.float32), speaker(q), np.zeros(4800, np.float32)]) * 32767).astype(np.int16)
        refs.append(normalize(q))
        wide.append(normalize(transcribe(models, audio)))
        narrow.append(normalize(transcribe(models, await phone_path(audio))))
    return {
        "questions": len(questions),
        "words": sum(len(r.split()) for r in refs),
        "wer_16k": round(jiwer.wer(refs, wide), 4),
        "wer_8k_mulaw": round(jiwer.wer(refs, narrow), 4),
        "differences": [
            {"said": r, "16k": w, "8k_mulaw": n} for r, w, n in zip(refs, wide, narrow) if w != n or w != r
        ],
    }


# --- voice-to-voice --------------------------------------------------------------------------


async def over_ws(host: str, audio_16k: np.ndarray) -> float | None:
    async with connect(f"ws://{host}/ws") as ws:
        received: list[tuple[float, np.ndarray]] = []

        async def read():
            async for m in ws:
                if isinstance(m, bytes):
                    received.append((time.monotonic(), np.frombuffer(m, dtype=np.int16)))

        reader = asyncio.create_task(read())
        await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
        loop = asyncio.get_running_loop()
        t0, last_voice = loop.time(), None
        for n, i in enumerate(range(0, len(audio_16k), 320)):
            frame = audio_16k[i : i + 320]
            await ws.send(frame.tobytes())
            if peak(frame) > SILENCE_PEAK:
                last_voice = time.monotonic()
            await asyncio.sleep(max(0.0, t0 + (n + 1) * 0.02 - loop.time()))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            first = next((t for t, a in received if t > last_voice and peak(a) > SILENCE_PEAK), None)
            if first:
                await asyncio.sleep(4)  # let the answer play, as a listener would
                reader.cancel()
                return (first - last_voice) * 1000
            await asyncio.sleep(0.02)
        reader.cancel()
        return None


async def over_phone(host: str, audio_16k: np.ndarray, call_sid: str, auth_token: str) -> float | None:
    form = {"CallSid": call_sid, "AccountSid": "ACbench", "From": "+15550001111", "To": "+15550002222"}
    url = f"http://{host}/telephony/twilio"
    async with httpx.AsyncClient() as http:
        twiml = (await http.post(url, data=form, headers={"X-Twilio-Signature": twilio_signature(auth_token, url, form)})).text
    stream_url = twiml.split('url="', 1)[1].split('"', 1)[0]
    caller = PhoneCaller(await connect(stream_url), carrier="twilio", call_id=call_sid, account_sid="ACbench")
    await caller.start()
    await caller.say(audio_16k, sample_rate=16000)
    last_voice = caller.last_voice_sent
    deadline = time.monotonic() + 60
    result = None
    while time.monotonic() < deadline:
        first = next((t for t, a in caller.received.media if t > last_voice and peak(a) > SILENCE_PEAK), None)
        if first:
            result = (first - last_voice) * 1000
            await asyncio.sleep(4)
            break
        await asyncio.sleep(0.02)
    await caller.hang_up()
    await caller.close()
    return result


async def v2v_figures(config, models, speaker: Speaker, runs: int) -> dict:
    from tests.test_telephony import serve_app

    audio = (np.concatenate([np.zeros(4800, np.float32), speaker(QUESTION), np.zeros(24000, np.float32)]) * 32767).astype(np.int16)
    config = config.model_copy(deep=True)
    with CarrierAPI() as api:
        config.telephony.twilio.auth_token = SecretStr("bench-token")
        config.telephony.twilio.rest_base_url = api.url
        config.telephony.idle_hangup_secs = None
        ws_ms, phone_ms, traces = [], [], {"ws": [], "phone": []}
        with serve_app(config, models=models) as (host, state):
            for i in range(runs):
                for kind in ("ws", "phone"):
                    if kind == "ws":
                        ms = await over_ws(host, audio)
                    else:
                        ms = await over_phone(host, audio, f"CAbench{i:026d}", "bench-token")
                    (ws_ms if kind == "ws" else phone_ms).append(round(ms, 1) if ms else None)
                    await asyncio.sleep(2)
            async with httpx.AsyncClient(base_url=f"http://{host}") as http:
                for turn in (await http.get("/status")).json()["recent_turns"]:
                    traces["phone" if turn["session_id"].startswith("twilio-") else "ws"].append(turn["voice_to_voice_ms"])

    def summary(values):
        values = [v for v in values if v is not None]
        return {"runs": values, "p50": statistics.median(values) if values else None}

    return {"question": QUESTION, "ws": summary(ws_ms), "phone": summary(phone_ms),
            "trace_ws": summary(traces["ws"]), "trace_phone": summary(traces["phone"])}


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-v2v", action="store_true")
    parser.add_argument("--skip-wer", action="store_true")
    args = parser.parse_args()
    config = load_config("config.yaml")
    models = load_models(config)
    speaker = Speaker(kokoro=models.kokoro, sample_rate=16000)
    report = {"cpu": cpu_model(), "cores": __import__("os").cpu_count()}
    if not args.skip_wer:
        report["wer"] = await wer_figures(models, speaker)
    if not args.skip_v2v:
        report["voice_to_voice_ms"] = await v2v_figures(config, models, speaker, args.runs)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
