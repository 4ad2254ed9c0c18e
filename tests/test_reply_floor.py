"""A statement's reply waits out the user's pause; a question's does not (processors/reply_floor.py)."""

import asyncio
import time

import pytest

from pipecat.frames.frames import LLMContextFrame, TTSSpeakFrame, VADUserStoppedSpeakingFrame
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.tests.utils import run_test

from processors.kokoro_tts import KokoroTTSService
from processors.reply_floor import ReplyFloor, ReplyNotBeforeFrame
from tests.live_pipeline import running
from transports.scripted import ScriptedTransport


def _context(user_text: str) -> LLMContextFrame:
    return LLMContextFrame(context=LLMContext(messages=[{"role": "user", "content": user_text}]))


@pytest.mark.parametrize(
    ("said", "waits"),
    [("I'd like to book.", True), ("Tell me a long story", True), ("What is the capital of France?", False)],
)
async def test_only_a_reply_to_words_that_do_not_ask_waits(said, waits):
    before = time.monotonic()
    down, _ = await run_test(
        ReplyFloor(statement_wait_secs=0.8),
        frames_to_send=[VADUserStoppedSpeakingFrame(stop_secs=0.2), _context(said)],
    )
    floors = [f for f in down if isinstance(f, ReplyNotBeforeFrame)]
    if not waits:
        assert floors == []
        return
    [floor] = floors
    # From the end of the speech (the VAD stop less its silence), not from the turn's end.
    assert before - 0.2 + 0.8 <= floor.at <= time.monotonic() - 0.2 + 0.8
    assert isinstance(down[-1], LLMContextFrame)


async def test_no_wait_when_it_is_turned_off():
    down, _ = await run_test(
        ReplyFloor(statement_wait_secs=0.0),
        frames_to_send=[VADUserStoppedSpeakingFrame(stop_secs=0.2), _context("I'd like to book.")],
    )
    assert not [f for f in down if isinstance(f, ReplyNotBeforeFrame)]


async def _first_sound(models, *, floor_after: float | None) -> float:
    """Seconds from the request to the reply's first sound, with its floor ``floor_after`` s ahead (or none)."""
    transport = ScriptedTransport(cues=[])
    tts = KokoroTTSService(
        kokoro=models.kokoro_stream, budget=models.budget, speed_model=models.synthesis_speed, voice="jf_alpha"
    )
    rec = transport.recording
    async with running(
        [transport.input(), tts, transport.output()], params=PipelineParams(audio_out_sample_rate=24000)
    ) as worker:
        asked = transport.clock.now()
        if floor_after is not None:
            await worker.queue_frame(ReplyNotBeforeFrame(at=time.monotonic() + floor_after))
        await worker.queue_frame(TTSSpeakFrame("Sure, a table for two at seven."))
        async with asyncio.timeout(60):
            while rec.first_sound_after(asked) is None:
                await asyncio.sleep(0.02)
    return rec.first_sound_after(asked) - asked


async def test_the_tts_holds_a_ready_reply_until_its_floor_then_plays_it_at_once(models):
    """Made as soon as possible, heard no sooner than the floor, and at the floor: it was ready."""
    unheld = await _first_sound(models, floor_after=None)
    floor = unheld + 1.0  # past the time it takes to make on this CPU, whatever its speed
    held = await _first_sound(models, floor_after=floor)
    assert floor - 0.05 <= held < floor + 0.3, (unheld, held)
