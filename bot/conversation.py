"""Runs the real bot on a scripted user channel and measures each turn from the audio itself.

Voice-to-voice latency here is measured, not read from logs: from the true end of
the user's speech in the audio fed in to the first non-silent sample of the bot's
reply leaving the output transport.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from loguru import logger

from pipecat.observers.base_observer import BaseObserver
from pipecat.workers.runner import WorkerRunner

from bot.config import Config
from bot.models import Models
from bot.pipeline import build_pipeline
from bot.pipeline import BotSession
from bot.tracing import LatencyTracer, TurnTrace
from transports.scripted import BotRecording, Cue, ScriptedTransport

_FRAME = 0.02
_SPEECH_RMS = 300  # about -40 dBFS
_MAX_GAP = 0.5


def speech_segments(audio: np.ndarray, *, sample_rate: int, max_gap: float = _MAX_GAP) -> list[tuple[float, float]]:
    """(start, end) seconds of speech in int16 audio; pauses shorter than ``max_gap`` join."""
    step = int(sample_rate * _FRAME)
    n = len(audio) // step
    if n == 0:
        return []
    frames = audio[: n * step].astype(np.float32).reshape(n, step)
    voiced = np.sqrt(np.mean(frames**2, axis=1)) > _SPEECH_RMS
    segments: list[list[float]] = []
    for i in np.flatnonzero(voiced):
        start, end = i * _FRAME, (i + 1) * _FRAME
        if segments and start - segments[-1][1] <= max_gap:
            segments[-1][1] = end
        else:
            segments.append([start, end])
    return [(s, e) for s, e in segments]


def cues_from_wav(audio: np.ndarray, *, sample_rate: int) -> list[Cue]:
    """One cue per stretch of speech in a recording, each at its original time."""
    cues = []
    for start, end in speech_segments(audio, sample_rate=sample_rate):
        i, j = int(start * sample_rate), int(end * sample_rate)
        cues.append(Cue(audio=audio[i:j], at=start))
    return cues


@dataclass
class TurnResult:
    """A user turn and the bot's reply, with the latency measured on the audio."""

    user_text: str
    bot_text: str
    voice_to_voice_ms: float | None
    trace_voice_to_voice_ms: float | None
    interrupted: bool
    trace: TurnTrace
    # Gaps (ms) where the bot's voice ran dry inside this reply: synthesis fell behind.
    holes_ms: list[float] = field(default_factory=list)


@dataclass
class ConversationResult:
    """What happened: the turns, the bot's audio, the cues as played, the context."""

    turns: list[TurnResult]
    recording: BotRecording
    cues: list[Cue]
    messages: list[dict]
    trace_path: str | None = None

    def bot_audio(self) -> np.ndarray:
        return self.recording.timeline()

    def summary(self) -> dict:
        return {
            "turns": [
                {
                    "user_text": t.user_text,
                    "bot_text": t.bot_text,
                    "voice_to_voice_ms": t.voice_to_voice_ms,
                    "interrupted": t.interrupted,
                    "holes_ms": t.holes_ms,
                }
                for t in self.turns
            ]
        }


def build_bot(*, config: Config, models: Models, transport, observers) -> BotSession:
    return build_pipeline(config=config, transport=transport, models=models, observers=observers)


async def run_conversation(
    *,
    config: Config,
    models: Models,
    cues: list[Cue],
    echo_gain: float = 0.0,
    settle_secs: float = 1.5,
    max_tail_secs: float = 90.0,
    session_id: str | None = None,
    build=build_bot,
    observers: list[BaseObserver] | None = None,
    make_transport=ScriptedTransport,
) -> ConversationResult:
    """Play the cues as the user, record the bot, and measure every turn.

    Args:
        config: Bot configuration.
        models: Loaded models.
        cues: The user's audio (int16 at the configured input rate) and timing.
        echo_gain: How much of the bot leaks back into the microphone.
        settle_secs: Quiet time after the last reply before the session ends.
        max_tail_secs: Most time to wait after the last cue.
        session_id: Names the trace file.
        build: Makes the bot for a transport (the stock baseline passes its own).
        observers: Watch the session's frames beside the latency tracer.
        make_transport: The scripted transport's class (a phone line passes one that
            carries the audio through a carrier's codec).
    """
    rate = config.audio.in_sample_rate
    session_id = session_id or f"talk-{uuid.uuid4().hex[:8]}"
    transport = make_transport(
        cues=cues,
        in_sample_rate=rate,
        out_sample_rate=config.audio.out_sample_rate,
        echo_gain=echo_gain,
    )
    tracer = LatencyTracer(
        session_id=session_id,
        vad_stop_secs=config.vad.stop_secs,
        vad_start_secs=config.vad.start_secs,
        log_dir=config.tracing.dir,
    )
    session = build(
        config=config, models=models, transport=transport, observers=[tracer, *(observers or [])]
    )
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(session.worker)
    run = asyncio.create_task(runner.run())
    try:
        await _wait_until_done(transport, tracer, run, settle_secs=settle_secs, max_tail_secs=max_tail_secs)
    finally:
        await session.worker.cancel(reason="script finished")
        await asyncio.wait_for(run, timeout=10)

    rec = transport.recording
    offset_ms = transport.input().pipeline_offset_ms
    turns = []
    ends = [c.speech_end for c in cues if c.speech_end is not None]
    for i, trace in enumerate(tracer.turns):
        measured, holes = None, []
        # A turn the user went on from before the bot spoke (a pause mid-sentence, a second
        # question) has no reply of its own: the next turn's reply is measured from its own end.
        follow = tracer.turns[i + 1].user_speech_start_ms if i + 1 < len(tracer.turns) else None
        if trace.user_speech_end_ms is not None and trace.first_audio_out_ms is not None and ends:
            estimate = (trace.user_speech_end_ms - offset_ms) / 1000
            end = min(ends, key=lambda e: abs(e - estimate))
            sound = rec.first_sound_after(end)
            if sound is not None and (follow is None or sound < (follow - offset_ms) / 1000):
                measured = round((sound - end) * 1000, 1)
                bot_end = (trace.bot_end_ms - offset_ms) / 1000 if trace.bot_end_ms else float("inf")
                holes = [round(g * 1000, 1) for g in rec.holes_between(sound, bot_end + 0.1)]
        turns.append(
            TurnResult(
                user_text=trace.user_text,
                bot_text=trace.bot_text,
                voice_to_voice_ms=measured,
                trace_voice_to_voice_ms=trace.voice_to_voice_ms,
                interrupted=trace.interrupted,
                trace=trace,
                holes_ms=holes,
            )
        )
    return ConversationResult(
        turns=turns,
        recording=rec,
        cues=cues,
        messages=list(session.context.get_messages()),
        trace_path=str(tracer.path) if tracer.path else None,
    )


async def _wait_until_done(transport, tracer, run, *, settle_secs: float, max_tail_secs: float):
    await transport.input().finished.wait()
    ended = time.monotonic()
    rec = transport.recording
    while not run.done() and time.monotonic() - ended < max_tail_secs:
        await asyncio.sleep(0.1)
        now = transport.clock.now()
        quiet = rec.last_sound is None or now - rec.last_sound >= settle_secs
        if quiet and tracer.open_turn is None and time.monotonic() - ended >= settle_secs:
            return
    if not run.done():
        logger.debug("conversation: stopped waiting after max_tail_secs")
