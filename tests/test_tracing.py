"""The latency tracer fed synthetic frame pushes, as the pipeline would: no models."""

from __future__ import annotations

import json
from dataclasses import asdict, fields

import numpy as np
import pytest

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    OutputAudioRawFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import FramePushed
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from bot.tracing import STAGES, LatencyTracer, TurnTrace
from tests.conftest import TURN_EVENTS
from transports.scripted import ScriptedTransport

VAD_STOP_SECS = 0.2
QUESTION = "What is the capital of France?"
ANSWER = ["The", "capital", "is", "Paris."]
TRACE_KEYS = {f.name for f in fields(TurnTrace)}


class Session:
    """A bot's processors in pipeline order, pushing frames to a tracer at given times.

    With ``echoes``, every frame is also pushed the ways a pipeline repeats it: the
    upstream copy of a broadcast frame, and each processor that passes it on.
    """

    def __init__(self, tracer: LatencyTracer, *, echoes: bool = False):
        transport = ScriptedTransport(cues=[])
        self.input = transport.input()
        self.stt = FrameProcessor(name="stt")
        self.user = FrameProcessor(name="user-aggregator")
        self.llm = FrameProcessor(name="llm")
        self.tts = FrameProcessor(name="tts")
        self.output = transport.output()
        self.assistant = FrameProcessor(name="assistant-aggregator")
        self._order = [self.input, self.stt, self.user, self.llm, self.tts, self.output, self.assistant]
        self._tracer = tracer
        self._echoes = echoes

    async def push(self, frame: Frame, *, at: float, source: FrameProcessor, broadcast: bool = False):
        """``source`` pushes ``frame`` downstream at ``at`` ms (and echoes, if asked)."""
        await self._push(frame, at=at, source=source, direction=FrameDirection.DOWNSTREAM)
        if not self._echoes:
            return
        if broadcast:
            sibling = type(frame)()
            await self._push(sibling, at=at + 0.1, source=source, direction=FrameDirection.UPSTREAM)
        later = self._order[self._order.index(source) + 1 : -1]
        for i, processor in enumerate(later, 1):
            await self._push(frame, at=at + i / 100, source=processor, direction=FrameDirection.DOWNSTREAM, again=True)

    async def _push(self, frame, *, at, source, direction, again=False):
        following = self._order[min(self._order.index(source) + 1, len(self._order) - 1)]
        await self._tracer.on_push_frame(
            FramePushed(
                source=source,
                destination=following,
                frame=frame,
                direction=direction,
                timestamp=int(at * 1_000_000),
                first_push=not again,
            )
        )

    async def user_starts(self, *, at: float):
        """The VAD hears speech; the turn starts and interrupts the bot."""
        await self.push(VADUserStartedSpeakingFrame(start_secs=0.2), at=at, source=self.user, broadcast=True)
        await self.push(UserStartedSpeakingFrame(), at=at + 0.5, source=self.user, broadcast=True)
        await self.push(InterruptionFrame(), at=at + 0.6, source=self.user, broadcast=True)

    async def user_stops(self, *, vad_stop: float, text: str = QUESTION):
        """The VAD hears silence; the transcript comes and the turn ends."""
        await self.push(
            VADUserStoppedSpeakingFrame(stop_secs=VAD_STOP_SECS), at=vad_stop, source=self.user, broadcast=True
        )
        await self.push(TranscriptionFrame(text, "user", "now"), at=vad_stop + 250, source=self.stt)
        await self.push(UserStoppedSpeakingFrame(), at=vad_stop + 290, source=self.user, broadcast=True)

    async def user_turn(self, *, start: float, vad_stop: float, text: str = QUESTION):
        await self.user_starts(at=start)
        await self.user_stops(vad_stop=vad_stop, text=text)

    async def bot_reply(self, *, start: float, speak_ms: float | None = 1700.0, heard: bool = True):
        """The answer: LLM tokens, TTS, then the output transport plays it for ``speak_ms``.

        Unless ``heard`` is False: the output then holds the audio (the user spoke first).
        """
        await self.push(LLMFullResponseStartFrame(), at=start, source=self.llm)
        for i, word in enumerate(ANSWER):
            await self.push(LLMTextFrame(f" {word}"), at=start + 120 + 20 * i, source=self.llm)
        await self.push(LLMFullResponseEndFrame(), at=start + 200, source=self.llm)
        await self.push(TTSStartedFrame(context_id="c1"), at=start + 200, source=self.tts)
        for i in range(3):
            audio = TTSAudioRawFrame(audio=b"\x10\x00" * 960, sample_rate=24000, num_channels=1, context_id="c1")
            await self.push(audio, at=start + 600 + 40 * i, source=self.tts)
        await self.push(BotStartedSpeakingFrame(), at=start + 610, source=self.output, broadcast=True)
        if not heard:
            return
        # The output passes each chunk on once written; the first plays from start + 610.
        written = OutputAudioRawFrame(audio=b"\x00\x10" * 480, sample_rate=24000, num_channels=1)
        await self._push(written, at=start + 630, source=self.output, direction=FrameDirection.DOWNSTREAM)
        for i, word in enumerate(ANSWER):
            # The TTS times each word; the output transport passes it on as it plays.
            spoken = TTSTextFrame(word, text_type="word", context_id="c1")
            await self._push(spoken, at=start + 605 + i, source=self.tts, direction=FrameDirection.DOWNSTREAM)
            await self._push(
                spoken, at=start + 620 + 300 * i, source=self.output,
                direction=FrameDirection.DOWNSTREAM, again=True,
            )  # fmt: skip
        if speak_ms is not None:
            stopped = TTSStoppedFrame(context_id="c1")
            await self._push(stopped, at=start + 600 + speak_ms, source=self.tts, direction=FrameDirection.DOWNSTREAM)
            # The output transport plays the reply out, stops, and passes the stop frame on.
            await self.push(BotStoppedSpeakingFrame(), at=start + 610 + speak_ms, source=self.output, broadcast=True)
            await self._push(
                stopped, at=start + 610 + speak_ms, source=self.output,
                direction=FrameDirection.DOWNSTREAM, again=True,
            )  # fmt: skip


def _tracer(tmp_path, **kwargs) -> LatencyTracer:
    return LatencyTracer(session_id="s1", vad_stop_secs=VAD_STOP_SECS, log_dir=tmp_path, **kwargs)


async def _speaking(tmp_path) -> tuple[LatencyTracer, Session]:
    """A session whose bot is in the middle of its answer to the first question."""
    tracer = _tracer(tmp_path)
    session = Session(tracer)
    await session.user_turn(start=1000, vad_stop=2400)
    await session.bot_reply(start=2700, speak_ms=None)
    return tracer, session


async def _normal_turn(tracer: LatencyTracer, *, echoes: bool = False) -> None:
    session = Session(tracer, echoes=echoes)
    await session.user_turn(start=1000, vad_stop=2400)
    await session.bot_reply(start=2700)


async def test_normal_turn_records_every_field(tmp_path):
    tracer = _tracer(tmp_path)
    await _normal_turn(tracer)

    assert tracer.open_turn is None
    [turn] = tracer.turns
    assert turn.session_id == "s1" and turn.turn == 0
    assert turn.user_speech_start_ms == pytest.approx(1000)
    assert turn.vad_stop_ms == pytest.approx(2400)
    assert turn.user_speech_end_ms == pytest.approx(2400 - VAD_STOP_SECS * 1000)
    assert turn.transcript_ms == pytest.approx(2650)
    assert turn.generation_start_ms == pytest.approx(2700)
    assert turn.first_token_ms == pytest.approx(2820)
    assert turn.tts_start_ms == pytest.approx(2900)
    assert turn.first_tts_audio_ms == pytest.approx(3300)
    assert turn.first_audio_out_ms == pytest.approx(3310)
    assert turn.bot_end_ms == pytest.approx(5010)
    assert turn.interrupted is False
    assert turn.user_text == QUESTION
    assert turn.bot_text == " ".join(ANSWER)
    assert turn.stages == {
        "endpointing_ms": 450.0,
        "llm_wait_ms": 50.0,
        "llm_first_token_ms": 120.0,
        "tts_first_audio_ms": 400.0,
        "output_ms": 10.0,
    }
    assert set(turn.stages) == set(STAGES)
    # Voice to voice: first audio out minus the VAD stop less its stop delay.
    assert turn.voice_to_voice_ms == pytest.approx(3310 - (2400 - VAD_STOP_SECS * 1000))
    times = [getattr(turn, name) for name in TURN_EVENTS]
    assert times == sorted(times), dict(zip(TURN_EVENTS, times))

    [line] = tracer.path.read_text().splitlines()
    record = json.loads(line)
    assert set(record) == TRACE_KEYS
    assert record == json.loads(json.dumps(asdict(turn)))


async def test_speech_end_is_read_from_the_input_audio(tmp_path):
    """The VAD's stop minus stop_secs trails the speech; the audio says when it ended."""
    tracer = _tracer(tmp_path)
    session = Session(tracer)

    async def audio(start: float, end: float, *, speech_until: float, speech: int, noise: int):
        rng = np.random.default_rng(0)
        for at in np.arange(start, end, 20.0):
            level = speech if at < speech_until else noise
            samples = rng.integers(-level, level + 1, 320).astype(np.int16) if level else np.zeros(320, np.int16)
            frame = InputAudioRawFrame(audio=samples.tobytes(), sample_rate=16000, num_channels=1)
            await session.push(frame, at=float(at), source=session.input)

    # Quiet room: speech until 2200 ms (the last loud frame is pushed at 2180), the VAD stops at 2430.
    await audio(1000, 1200, speech_until=2200, speech=8000, noise=0)
    await session.user_starts(at=1200)
    await audio(1220, 2440, speech_until=2200, speech=8000, noise=0)
    await session.user_stops(vad_stop=2430)
    await session.bot_reply(start=2700)
    # Noise the speech barely rises above: only the VAD's bound is known.
    await audio(6000, 6200, speech_until=7200, speech=2500, noise=2000)
    await session.user_starts(at=6200)
    await audio(6220, 7440, speech_until=7200, speech=2500, noise=2000)
    await session.user_stops(vad_stop=7430)
    await session.bot_reply(start=7700)

    quiet, noisy = tracer.turns
    assert quiet.user_speech_end_ms == pytest.approx(2180)
    assert quiet.voice_to_voice_ms == pytest.approx(3310 - 2180)
    assert noisy.user_speech_end_ms == pytest.approx(7430 - VAD_STOP_SECS * 1000)


async def test_interrupted_turn(tmp_path):
    tracer, session = await _speaking(tmp_path)
    # The user talks over the bot: a new turn opens, the output transport stops.
    await session.user_starts(at=4000)
    await session.push(BotStoppedSpeakingFrame(), at=4020, source=session.output, broadcast=True)
    await session.user_stops(vad_stop=5400, text="Stop, thanks.")
    await session.bot_reply(start=5700)

    first, second = tracer.turns
    assert first.interrupted is True
    assert first.bot_end_ms == pytest.approx(3330)  # the last audio the output wrote
    assert first.voice_to_voice_ms == pytest.approx(3310 - 2200)
    assert second.turn == 1 and second.interrupted is False
    assert second.user_speech_start_ms == pytest.approx(4000)
    assert second.user_text == "Stop, thanks."
    assert second.bot_end_ms == pytest.approx(5700 + 610 + 1700)
    lines = [json.loads(line) for line in tracer.path.read_text().splitlines()]
    assert [(r["turn"], r["interrupted"]) for r in lines] == [(0, True), (1, False)]


async def test_interruption_frame_while_the_bot_speaks_ends_the_turn(tmp_path):
    tracer, session = await _speaking(tmp_path)
    await session.push(InterruptionFrame(), at=3900, source=session.user, broadcast=True)

    [turn] = tracer.turns
    assert turn.interrupted is True and turn.bot_end_ms == pytest.approx(3330)


async def test_barge_in_stop_runs_from_the_speech_onset_to_the_last_audio_sent(tmp_path):
    """The bot paused just after the VAD heard the user: 140 ms from the onset, not the interruption's time."""
    tracer = _tracer(tmp_path, vad_start_secs=0.1)
    session = Session(tracer)
    await session.user_turn(start=1000, vad_stop=2400)
    await session.bot_reply(start=2700, speak_ms=None)
    chunk = OutputAudioRawFrame(audio=b"\x00\x10" * 480, sample_rate=24000, num_channels=1)
    for at in np.arange(3320.0, 4151.0, 20.0):  # played until the pause
        await session._push(chunk, at=float(at), source=session.output, direction=FrameDirection.DOWNSTREAM)
    for at in np.arange(3000.0, 4400.0, 20.0):  # the user speaks from 4000 ms
        level = 6000 if at >= 4000 else 0
        samples = np.full(320, level, np.int16).tobytes()
        await session.push(InputAudioRawFrame(audio=samples, sample_rate=16000, num_channels=1), at=float(at), source=session.input)
        if at == 4120:
            await session.push(VADUserStartedSpeakingFrame(start_secs=0.1), at=at, source=session.user, broadcast=True)
    # The words decide 600 ms later: the turn starts and the rest of the reply is dropped.
    await session.push(UserStartedSpeakingFrame(), at=4700, source=session.user, broadcast=True)
    await session.push(InterruptionFrame(), at=4700, source=session.user, broadcast=True)

    first = tracer.turns[0]
    assert first.interrupted is True
    assert first.bot_end_ms == pytest.approx(4140)
    assert first.barge_in_stop_ms == pytest.approx(140)


async def test_upstream_copies_and_repushes_are_counted_once(tmp_path):
    plain = _tracer(tmp_path / "plain")
    await _normal_turn(plain)
    echoed = _tracer(tmp_path / "echoed")
    await _normal_turn(echoed, echoes=True)

    assert [asdict(t) for t in echoed.turns] == [asdict(t) for t in plain.turns]
    assert len(echoed.path.read_text().splitlines()) == 1


async def test_on_turn_gets_each_turn(tmp_path):
    seen: list[TurnTrace] = []
    tracer = LatencyTracer(session_id="s2", vad_stop_secs=VAD_STOP_SECS, on_turn=seen.append)
    session = Session(tracer)
    await session.user_turn(start=1000, vad_stop=2400)
    await session.bot_reply(start=2700)
    await session.user_turn(start=6000, vad_stop=7400)
    await session.bot_reply(start=7700)

    assert tracer.path is None
    assert seen == tracer.turns
    assert [t.turn for t in seen] == [0, 1]
    assert all(t.voice_to_voice_ms == pytest.approx(1110) for t in seen)


async def test_a_gap_in_the_bots_voice_does_not_end_its_turn(tmp_path):
    """pipecat reports the bot stopped after a few seconds without audio; the reply goes on."""
    tracer, session = await _speaking(tmp_path)
    # Synthesis fell behind: a gap, then the rest of the reply, then its end.
    await session.push(BotStoppedSpeakingFrame(), at=5000, source=session.output, broadcast=True)
    assert tracer.open_turn is not None
    await session.push(BotStartedSpeakingFrame(), at=8000, source=session.output, broadcast=True)
    stopped = TTSStoppedFrame(context_id="c1")
    await session._push(stopped, at=9000, source=session.tts, direction=FrameDirection.DOWNSTREAM)
    await session._push(stopped, at=9010, source=session.output, direction=FrameDirection.DOWNSTREAM, again=True)

    (turn,) = tracer.turns
    assert turn.bot_end_ms == pytest.approx(9010)
    assert turn.bot_text == " ".join(ANSWER)


async def test_the_words_that_decide_a_barge_in_belong_to_the_turn_they_open(tmp_path):
    """Words over the bot are transcribed before they open their turn: that turn keeps them."""
    tracer, session = await _speaking(tmp_path)
    await session.push(VADUserStartedSpeakingFrame(start_secs=0.2), at=4000, source=session.user, broadcast=True)
    await session.push(
        VADUserStoppedSpeakingFrame(stop_secs=VAD_STOP_SECS), at=5400, source=session.user, broadcast=True
    )
    # The final transcript decides: real words, a barge-in, and only then the turn opens.
    await session.push(TranscriptionFrame("Wait, what is two plus two?", "user", "now"), at=5650, source=session.stt)
    await session.push(UserStartedSpeakingFrame(), at=5651, source=session.user, broadcast=True)
    await session.push(InterruptionFrame(), at=5652, source=session.user, broadcast=True)
    await session.push(UserStoppedSpeakingFrame(), at=5660, source=session.user, broadcast=True)
    await session.bot_reply(start=5700)

    first, second = tracer.turns
    assert first.interrupted is True and first.user_text == QUESTION
    assert second.user_text == "Wait, what is two plus two?"


async def test_a_reply_the_output_held_before_any_of_it_played_is_no_interruption(tmp_path):
    """The user went on in a pause: the reply's first audio waited at the output, then was dropped unheard."""
    tracer = _tracer(tmp_path)
    session = Session(tracer)
    await session.user_turn(start=1000, vad_stop=2400, text="I'd like to book.")
    await session.bot_reply(start=2700, speak_ms=None, heard=False)
    await session.user_starts(at=3400)
    await session.user_stops(vad_stop=5400, text="A table for two.")
    await session.bot_reply(start=5700)

    first, second = tracer.turns
    assert first.interrupted is False and first.voice_to_voice_ms is None and first.bot_text == ""
    assert second.interrupted is False and second.voice_to_voice_ms == pytest.approx(1110)


async def test_a_reply_paused_under_the_users_words_is_cut_when_they_barge_in(tmp_path):
    """The output holds a reply while words decide; pipecat reports the bot stopped; it was still cut."""
    tracer, session = await _speaking(tmp_path)
    await session.push(VADUserStartedSpeakingFrame(start_secs=0.2), at=4000, source=session.user, broadcast=True)
    await session.push(BotStoppedSpeakingFrame(), at=5000, source=session.output, broadcast=True)
    await session.push(UserStartedSpeakingFrame(), at=5651, source=session.user, broadcast=True)

    [first] = tracer.turns
    assert first.interrupted is True
