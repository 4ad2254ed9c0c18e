"""Preemptive replies (processors/preemptive.py): started on the words heard early, adopted or never heard.

Whole conversations through the real pipeline and models. The user's audio is cued on
the bot's own events (the preemptive reply has begun), not on the clock, and the VAD's
end-of-speech wait is widened so that the window in which the turn is still open does
not depend on this CPU's speed.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    EagerEndOfTurnCancelFrame,
    Frame,
    InputAudioRawFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from bot.conversation import run_conversation
from processors.barge_in import words_of
from processors.kokoro_tts import KokoroTTSService
from processors.preemptive import PreemptionWasteFrame, SpeculativeReplyFrame
from processors.responder import LlamaCppLLMService
from tests.conftest import silence
from tests.live_pipeline import running
from transports.scripted import Cue


class PreemptionWatch(BaseObserver):
    """Counts preemptive replies, their cancellations, and the tokens of each."""

    def __init__(self):
        super().__init__()
        self.tokens: list[int] = []  # per preemptive reply
        self.cancelled = 0
        self._open = False

    async def on_push_frame(self, data: FramePushed):
        frame = data.frame
        if not data.first_push or data.direction != FrameDirection.DOWNSTREAM:
            return
        if isinstance(frame, SpeculativeReplyFrame):
            self.tokens.append(0)
            self._open = True
        elif isinstance(frame, EagerEndOfTurnCancelFrame):
            self.cancelled += self._open
            self._open = False
        elif isinstance(frame, LLMTextFrame) and self._open and isinstance(data.source, LlamaCppLLMService):
            self.tokens[-1] += 1


def _config(base_config, *, preemptive: bool, vad_stop_secs: float):
    config = base_config.model_copy(deep=True)
    config.turns.preemptive = preemptive
    config.vad.stop_secs = vad_stop_secs
    return config


async def test_going_on_after_the_early_words_cancels_the_preemptive_reply(base_config, models, speaker):
    """The user pauses once the bot has begun answering the fragment, then finishes the sentence."""
    watch = PreemptionWatch()
    first, rest = "What is the capital", "of France?"
    cues = [
        Cue(audio=np.concatenate([silence(0.5), speaker(first)]), text=first, at=0.0),
        # Goes on once the preemptive reply to the fragment has written two tokens. (Whisper
        # drops words after a pause much longer than that: the synthesis is tested below.)
        Cue(
            audio=np.concatenate([speaker(rest), silence(0.3)]),
            text=rest,
            when=lambda: bool(watch.tokens) and watch.tokens[0] >= 2,
        ),
    ]
    config = _config(base_config, preemptive=True, vad_stop_secs=1.0)
    result = await run_conversation(config=config, models=models, cues=cues, observers=[watch])

    report = {"turns": result.summary()["turns"], "messages": result.messages, "tokens": watch.tokens}
    assert watch.cancelled >= 1 and watch.tokens[0] >= 2, report
    [turn] = result.turns
    assert turn.trace.preemptive_attempts >= 2 and turn.trace.preemptive_wasted_tokens >= 2, report
    # Not a sound before the sentence was finished, and what was heard is the final reply.
    assert result.recording.last_sound_between(cues[0].started, cues[1].speech_end) is None, report
    assert turn.bot_text and words_of(turn.bot_text) == words_of(turn.trace.generated_text), report
    # The context holds the whole sentence, once, and one answer.
    users = [m["content"] for m in result.messages if m["role"] == "user"]
    assistants = [m["content"] for m in result.messages if m["role"] == "assistant"]
    assert [words_of(u) for u in users] == [words_of(f"{first} {rest}")], report
    assert len(assistants) == 1 and words_of(assistants[0]) == words_of(turn.bot_text), report


async def test_a_plain_question_is_answered_by_the_preemptive_reply_and_sooner(base_config, models, speaker):
    """The same audio with and without preemption: the same answer, adopted, and it starts sooner."""
    question = "What is the capital of France?"
    runs = {}
    for preemptive in (True, False):
        cues = [Cue(audio=np.concatenate([silence(0.5), speaker(question), silence(0.3)]), text=question, at=0.0)]
        config = _config(base_config, preemptive=preemptive, vad_stop_secs=0.8)
        result = await run_conversation(config=config, models=models, cues=cues)
        [turn] = result.turns
        runs[preemptive] = turn
    early, plain = runs[True].trace, runs[False].trace
    report = {"preemptive": early, "plain": plain}

    # Adopted; an attempt made in the pause before "France" (on a CPU whose Whisper is done
    # within it) was withdrawn at the next loud frame.
    assert early.preemptive_adopted and 1 <= early.preemptive_attempts <= base_config.turns.preemptive_max_attempts, report
    # It began while the VAD was still confirming the end of speech; the plain one after the transcript.
    assert early.generation_start_ms < early.vad_stop_ms, report
    assert plain.generation_start_ms > plain.transcript_ms and not plain.preemptive_attempts, report
    assert words_of(early.bot_text) == words_of(plain.bot_text) != [], report
    # Each trace's own clock: from the end of the user's speech to the first audio out.
    assert early.voice_to_voice_ms < plain.voice_to_voice_ms, report


# --- the TTS holds a preemptive reply: made until it could start, then it waits ----------------------

REPLY = "The capital of France is Paris. It is a lovely city on the Seine."


class Sink(FrameProcessor):
    """Records what leaves the TTS."""

    def __init__(self):
        super().__init__()
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append(frame)
        await self.push_frame(frame, direction)


async def _until(check, timeout: float = 60.0):
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def _of_the_reply(frames: list[Frame]) -> list[Frame]:
    return [f for f in frames if isinstance(f, (TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame, LLMFullResponseStartFrame))]


@pytest.mark.parametrize("outcome", ["confirmed", "cancelled"])
async def test_the_tts_makes_a_preemptive_reply_ready_to_start_and_holds_it(models, outcome):
    tts = KokoroTTSService(
        kokoro=models.kokoro_stream, budget=models.budget, speed_model=models.synthesis_speed, voice="jf_alpha"
    )
    sink = Sink()
    async with running([tts, sink], params=PipelineParams(audio_out_sample_rate=24000)) as worker:
        await worker.queue_frames(
            [UserStartedSpeakingFrame(), SpeculativeReplyFrame(), LLMFullResponseStartFrame(), LLMTextFrame(REPLY), LLMFullResponseEndFrame()]
        )
        await _until(lambda: any(reply.held for reply in tts._replies.values()))
        [reply] = [reply for reply in tts._replies.values() if reply.held]
        # It is made until what it holds could start at once, at this CPU's measured speed; then it waits.
        await _until(lambda: tts._could_start(reply))
        made = (reply.held_secs, reply.spoken_secs)
        await asyncio.sleep(1.0)
        assert (reply.held_secs, reply.spoken_secs) == made and tts._could_start(reply)
        assert _of_the_reply(sink.frames) == [], sink.frames
        seen = len(sink.frames)
        if outcome == "confirmed":
            await worker.queue_frame(UserStoppedSpeakingFrame())
            await _until(lambda: any(isinstance(f, TTSStoppedFrame) for f in sink.frames))
            after = sink.frames[seen:]
            assert isinstance(after[0], UserStoppedSpeakingFrame)
            audio = b"".join(f.audio for f in after if isinstance(f, TTSAudioRawFrame))
            assert len(audio) / 2 / 24000 > 2.0  # the whole reply, held part first
        else:
            await worker.queue_frame(EagerEndOfTurnCancelFrame())
            await _until(lambda: any(isinstance(f, PreemptionWasteFrame) for f in sink.frames))
            [waste] = [f for f in sink.frames if isinstance(f, PreemptionWasteFrame)]
            assert waste.synthesis_secs > 0
            # Nothing of it ever leaves; the next reply (a confirmed turn's) plays as usual.
            await worker.queue_frames([UserStoppedSpeakingFrame(), LLMFullResponseStartFrame(), LLMTextFrame("Sure."), LLMFullResponseEndFrame()])
            await _until(lambda: any(isinstance(f, TTSStoppedFrame) for f in sink.frames))
            audio = b"".join(f.audio for f in sink.frames if isinstance(f, TTSAudioRawFrame))
            assert 0 < len(audio) / 2 / 24000 < 1.5, "only the short reply is heard"


# --- two sessions: one speaks, the other's turn ends with a preemptive reply ----------------------


class Moments(BaseObserver):
    """When (time.monotonic()) a session's audio began, its bot first spoke and last stopped,
    and its first preemptive reply began and was settled (adopted or cancelled)."""

    def __init__(self):
        super().__init__()
        self.first_input: float | None = None  # the scripted transport's time zero, within a frame
        self.bot_started: float | None = None
        self.bot_stopped: float | None = None
        self.preemptive: float | None = None
        self.settled: float | None = None

    async def on_push_frame(self, data: FramePushed):
        now, frame = time.monotonic(), data.frame
        if isinstance(frame, InputAudioRawFrame):
            self.first_input = self.first_input or now
        elif isinstance(frame, BotStartedSpeakingFrame):
            self.bot_started = self.bot_started or now
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self.bot_stopped = now
        elif isinstance(frame, SpeculativeReplyFrame):
            self.preemptive = self.preemptive or now
        elif isinstance(frame, (UserStoppedSpeakingFrame, EagerEndOfTurnCancelFrame)) and self.preemptive:
            self.settled = self.settled or now


async def test_a_preemptive_reply_makes_no_hole_in_another_sessions_reply(base_config, slow_models, speaker):
    """On a CPU synthesizing SLOW_FACTOR times slower: B asks while A's long story plays.

    While B's preemptive reply is in flight, A's story plays on without a hole. (B's reply
    proper, once its turn is confirmed, goes before A's buffered audio: a listener waiting
    for the first sound comes first, and that may cost A a gap on a CPU this slow.)
    """
    story, question = "Tell me a long story about a brave little dragon.", "What is the capital of France?"
    a_moments, b_moments = Moments(), Moments()
    config = _config(base_config, preemptive=True, vad_stop_secs=0.8)
    a = run_conversation(
        config=config,
        models=slow_models,
        cues=[Cue(audio=np.concatenate([silence(0.5), speaker(story), silence(0.3)]), text=story, at=0.0)],
        observers=[a_moments],
        session_id="speaking",
    )
    b = run_conversation(
        config=config,
        models=slow_models,
        cues=[
            Cue(audio=np.concatenate([speaker(question), silence(0.3)]), text=question, when=lambda: a_moments.bot_started is not None)
        ],
        observers=[b_moments],
        session_id="asking",
    )
    a_result, b_result = await asyncio.gather(a, b)
    [a_turn] = [t for t in a_result.turns if t.voice_to_voice_ms is not None]
    [b_turn] = b_result.turns
    report = {"speaking": a_result.summary()["turns"], "asking": b_result.summary()["turns"]}
    assert b_turn.trace.preemptive_attempts >= 1 and b_turn.bot_text, report
    # B's preemptive reply was made while A's story was playing...
    assert a_moments.bot_started < b_moments.preemptive < b_moments.settled < a_moments.bot_stopped, report
    # ...and meanwhile A's voice never ran dry. (A's holes: when its audio resumed, on its own clock.)
    holes = [(a_moments.first_input + resumed - gap, a_moments.first_input + resumed) for resumed, gap in a_result.recording.holes]
    during = [(start, end) for start, end in holes if end - start > 0.15 and start < b_moments.settled and end > b_moments.preemptive]
    assert during == [], (during, b_moments.preemptive, b_moments.settled, report)
