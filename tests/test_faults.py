"""A model that fails mid-turn, injected into the real pipeline: the user hears why, the next turn works."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import numpy as np
from pipecat.frames.frames import VADUserStoppedSpeakingFrame
from pipecat.observers.base_observer import BaseObserver, FramePushed

from bot.conversation import run_conversation
from processors.apology import APOLOGY, FaultNoticeFrame
from tests.conftest import silence
from transports.scripted import Cue

FIRST, SECOND = "Hello, can you hear me?", "What is the capital of France?"


def _normalize(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


class Faulty:
    """A model whose calls of ``methods`` raise, as a model that runs out of memory would.

    Only the first call, or with ``until`` every call until it says the fault has been
    seen (a model that fails a whole turn, its speculative passes too).
    """

    def __init__(self, model, *methods: str, until: Callable[[], bool] | None = None):
        self._model = model
        self._methods = set(methods)
        self._until = until or (lambda: self.raised > 0)
        self._lock = threading.Lock()
        self.calls = 0
        self.raised = 0

    def __getattr__(self, name: str):
        value = getattr(self._model, name)
        if name not in self._methods:
            return value

        def call(*args, **kwargs):
            with self._lock:
                fail = not self._until()
                self.calls += 1
                self.raised += fail
            if fail:
                raise RuntimeError(f"injected fault in {name}")
            return value(*args, **kwargs)

        return call


class Notices(BaseObserver):
    """The fault notices a session pushed (what the web page shows)."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    async def on_push_frame(self, data: FramePushed):
        if isinstance(data.frame, FaultNoticeFrame) and data.first_push:
            self.messages.append(data.frame.message)


class SawFrame(BaseObserver):
    """Whether a frame of a type has been pushed yet."""

    def __init__(self, kind: type):
        super().__init__()
        self._kind = kind
        self.seen = False

    async def on_push_frame(self, data: FramePushed):
        self.seen = self.seen or isinstance(data.frame, self._kind)


async def _two_turns(config, models, speaker, notices: Notices):
    cues = [
        Cue(audio=speaker(FIRST), text=FIRST, at=0.5),
        Cue(audio=speaker(SECOND), text=SECOND, after_bot_done=0.8),
    ]
    return await run_conversation(config=config, models=models, cues=cues, observers=[notices])


def _assert_apology_then_answer(result, notices: Notices, what: str):
    answered = [t for t in result.turns if t.bot_text]
    report = result.summary()
    assert len(answered) == 2, report
    assert _normalize(answered[0].bot_text) == _normalize(APOLOGY), report
    # The next turn is heard and answered aloud (what a 135M model answers is not ours to test).
    assert _normalize(answered[1].user_text) == _normalize(SECOND) and answered[1].voice_to_voice_ms is not None, report
    assert _normalize(answered[1].bot_text) != _normalize(APOLOGY), report
    assert len(notices.messages) == 1 and what in notices.messages[0], notices.messages
    # The conversation goes on: the second question and its answer are in the context.
    users = [_normalize(str(m["content"])) for m in result.messages if m["role"] == "user"]
    assert users[-1] == _normalize(SECOND), result.messages


async def test_a_failed_reply_is_an_apology_and_the_next_turn_is_answered(base_config, models, speaker):
    notices = Notices()
    # A preemptive reply's call may be the first, and be withdrawn unheard: the fault must last the turn.
    llm = Faulty(models.llm, "create_chat_completion", until=lambda: bool(notices.messages))
    result = await _two_turns(base_config, dataclasses.replace(models, llm=llm), speaker, notices)
    assert llm.raised >= 1 and llm.calls > llm.raised
    _assert_apology_then_answer(result, notices, "the reply failed")


async def test_failed_speech_recognition_is_an_apology_and_the_next_turn_is_heard(base_config, models, speaker):
    notices = Notices()
    # A speculative pass that fails is made again on the whole turn: the fault must last the turn.
    whisper = Faulty(models.whisper, "transcribe", "feature_extractor", until=lambda: bool(notices.messages))
    result = await _two_turns(base_config, dataclasses.replace(models, whisper=whisper), speaker, notices)
    assert whisper.raised >= 1
    _assert_apology_then_answer(result, notices, "speech recognition failed")


async def test_a_failed_speculative_pass_costs_the_user_nothing(base_config, models, speaker):
    """The early passes, made after a short quiet before the VAD stops, fail: the whole turn is transcribed again."""
    assert base_config.stt.whisper.speculate_after_secs, "the speculative pass is what this fault hits"
    stopped = SawFrame(VADUserStoppedSpeakingFrame)
    whisper = Faulty(models.whisper, "transcribe", "feature_extractor", until=lambda: stopped.seen)
    notices = Notices()
    result = await run_conversation(
        config=base_config,
        models=dataclasses.replace(models, whisper=whisper),
        cues=[Cue(audio=speaker(SECOND), text=SECOND, at=0.5)],
        observers=[notices, stopped],
    )
    [turn] = [t for t in result.turns if t.bot_text]
    assert whisper.raised >= 1 and not notices.messages, (whisper.raised, notices.messages)
    assert _normalize(turn.user_text) == _normalize(SECOND), result.summary()
    assert _normalize(turn.bot_text) != _normalize(APOLOGY), result.summary()


async def test_failed_synthesis_is_shown_and_the_next_turn_is_spoken(base_config, models, speaker):
    stream = Faulty(models.kokoro_stream, "decode")
    notices = Notices()
    cues = [
        Cue(audio=speaker(FIRST), text=FIRST, at=0.5),
        # The failed piece may have been the whole reply: ask again once the page was told.
        Cue(audio=speaker(SECOND), text=SECOND, when=lambda: bool(notices.messages)),
    ]
    result = await run_conversation(
        config=base_config, models=dataclasses.replace(models, kokoro_stream=stream), cues=cues, observers=[notices]
    )
    assert stream.calls >= 2
    assert len(notices.messages) == 1 and "could not be spoken" in notices.messages[0], notices.messages
    last = result.turns[-1]
    assert _normalize(last.user_text) == _normalize(SECOND), result.summary()
    assert last.bot_text.strip() and last.voice_to_voice_ms is not None, result.summary()


async def test_the_page_is_told_and_hears_the_apology(base_config, models, speaker):
    from tests.live_server import serve
    from tests.conftest import RATE
    from tests.test_server import session

    # Every call fails: a preemptive reply's failed call may be withdrawn unheard, and a new one made.
    llm = Faulty(models.llm, "create_chat_completion", until=lambda: False)
    audio = np.concatenate([silence(0.3, sample_rate=RATE), speaker(SECOND, sample_rate=RATE), silence(1.5, sample_rate=RATE)])
    with serve(base_config, models=dataclasses.replace(models, llm=llm)) as host:
        async with session(host) as client:
            await client.stream(audio)
            await client.until(lambda: client.of_type("error") and client.of_type("bot_text"), "the fault's notice and words")
            await client.until(
                lambda: _normalize(" ".join(e["text"] for e in client.of_type("bot_text"))) == _normalize(APOLOGY),
                "the whole apology",
            )
    [error] = client.of_type("error")
    assert error["message"].startswith("Sorry, the reply failed"), error
