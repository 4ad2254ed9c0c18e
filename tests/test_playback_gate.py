"""Pausing the bot's voice while the user may be barging in: the gate, and a real output transport."""

import asyncio
import time

import numpy as np
import pytest

from pipecat.frames.frames import Frame, InterruptionFrame, TTSAudioRawFrame, TTSTextFrame
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from transports.playback_gate import PausePlaybackFrame, PlaybackGate, ResumePlaybackFrame
from tests.live_pipeline import running
from transports.scripted import SILENCE_LEVEL, ScriptedTransport

RATE = 24000


async def test_gate_holds_until_resumed_and_counts_the_time_held():
    gate = PlaybackGate()
    gate.pause(max_secs=5.0)
    waiter = asyncio.create_task(gate.admit())
    await asyncio.sleep(0.1)
    assert not waiter.done() and gate.paused

    gate.resume(after_secs=0.05)
    assert await asyncio.wait_for(waiter, 1.0) is True
    assert not gate.paused
    assert 0.14 <= gate.held_secs < 0.4
    gate.reply_done()
    assert gate.held_secs == 0.0


async def test_interruption_drops_what_waits_at_the_gate():
    gate = PlaybackGate()
    gate.pause(max_secs=5.0)
    waiter = asyncio.create_task(gate.admit())
    await asyncio.sleep(0.05)

    gate.interrupt()
    assert await asyncio.wait_for(waiter, 1.0) is False
    assert not gate.paused and gate.held_secs == 0.0
    assert await gate.admit() is True  # the next reply plays at once


async def test_a_pause_ends_by_itself_after_max_secs():
    gate = PlaybackGate()
    gate.pause(max_secs=0.15)
    start = time.monotonic()
    assert await asyncio.wait_for(gate.admit(), 1.0) is True
    assert 0.14 <= time.monotonic() - start < 0.4


class Arrivals(FrameProcessor):
    """Notes when each word leaves the output transport (i.e. is heard)."""

    def __init__(self):
        super().__init__()
        self.words: list[tuple[str, float]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSTextFrame):
            self.words.append((frame.text, time.monotonic()))
        await self.push_frame(frame, direction)


class Speaker(FrameProcessor):
    """Stands in for the TTS: pushes a second of loud audio and one word due mid-way."""

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)

    async def say(self, *, word_at_secs: float) -> float:
        start = time.monotonic()
        pts = self.get_clock().get_time() + int(word_at_secs * 1e9)
        word = TTSTextFrame("dragon", text_type="word", context_id="c1")
        word.pts = pts
        await self.push_frame(word)
        audio = np.full(RATE // 10, 8000, np.int16).tobytes()
        for _ in range(10):
            await self.push_frame(TTSAudioRawFrame(audio, sample_rate=RATE, num_channels=1, context_id="c1"))
        return start


def _sound_spans(transport: ScriptedTransport) -> list[tuple[float, float]]:
    """(start, end) of each stretch of continuous bot sound on the recording."""
    spans: list[list[float]] = []
    for start, audio in transport.recording.chunks:
        if not np.any(np.abs(audio.astype(np.int32)) > SILENCE_LEVEL):
            continue
        end = start + len(audio) / RATE
        if spans and start - spans[-1][1] < 0.005:
            spans[-1][1] = end
        else:
            spans.append([start, end])
    return [tuple(s) for s in spans]


async def _speak_pause_then(then: Frame, *, paused_secs: float, settle_secs: float):
    """The bot speaks; 0.3 s in its playback pauses, and ``paused_secs`` later ``then`` comes."""
    transport = ScriptedTransport(cues=[], out_sample_rate=RATE)
    speaker, arrivals = Speaker(), Arrivals()
    params = PipelineParams(audio_out_sample_rate=RATE)
    async with running([speaker, transport.output(), arrivals], params=params) as worker:
        start = await speaker.say(word_at_secs=0.5)
        await asyncio.sleep(0.3)
        await worker.queue_frame(PausePlaybackFrame(max_secs=5.0))
        await asyncio.sleep(paused_secs)
        await worker.queue_frame(then)
        await asyncio.sleep(settle_secs)
    return transport, arrivals, start


async def test_paused_audio_is_held_then_played_in_full_and_its_words_wait_with_it():
    transport, arrivals, start = await _speak_pause_then(ResumePlaybackFrame(), paused_secs=0.4, settle_secs=1.2)

    spans = _sound_spans(transport)
    assert len(spans) == 2, spans  # spoke, held, spoke on
    (a0, a1), (b0, b1) = spans
    assert 0.3 <= b0 - a1 <= 0.5, spans  # silent while paused
    assert (a1 - a0) + (b1 - b0) == pytest.approx(1.0, abs=0.03)  # nothing lost
    assert transport.recording.holes == []  # a pause is no hole
    [(word, heard_at)] = arrivals.words
    # Due 0.5 s in; held about 0.4 s before that: heard about 0.9 s in, with its audio.
    assert 0.8 <= heard_at - start <= 1.05, heard_at - start


async def test_an_interruption_while_paused_drops_the_rest_of_the_reply():
    transport, arrivals, _ = await _speak_pause_then(InterruptionFrame(), paused_secs=0.3, settle_secs=1.0)

    spans = _sound_spans(transport)
    assert len(spans) == 1, spans
    assert spans[0][1] - spans[0][0] < 0.4, spans  # stopped at the pause, never resumed
    assert arrivals.words == []  # the word due in the held audio was never heard
