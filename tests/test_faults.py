"""A model that fails mid-turn, injected into the real pipeline: the user hears why, the next turn works."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
from pipecat.observers.base_observer import BaseObserver, FramePushed

from bot.conversation import run_conversation
from processors.apology import APOLOGY, FaultNoticeFrame
from tests.conftest import silence
from transports.scripted import Cue

FIRST, SECOND = "Hello, can you hear me?", "What is the capital of France?"


def _normalize(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


class FailsOnce:
    """A model whose first call of ``method`` raises, as a model that runs out of memory would."""

    def __init__(self, model, *methods: str):
        self._model = model
        self._methods = set(methods)
        self._lock = threading.Lock()
        self.failed = 0

    def __getattr__(self, name: str):
        value = getattr(self._model, name)
        if name not in self._methods:
            return value

        def call(*args, **kwargs):
            with self._lock:
                fail, self.failed = self.failed == 0, self.failed + 1
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
    llm = FailsOnce(models.llm, "create_chat_completion")
    notices = Notices()
    result = await _two_turns(base_config, dataclasses.replace(models, llm=llm), speaker, notices)
    assert llm.failed >= 2
    _assert_apology_then_answer(result, notices, "the reply failed")


async def test_failed_speech_recognition_is_an_apology_and_the_next_turn_is_heard(base_config, models, speaker):
    whisper = FailsOnce(models.whisper, "transcribe", "feature_extractor")
    notices = Notices()
    result = await _two_turns(base_config, dataclasses.replace(models, whisper=whisper), speaker, notices)
    assert whisper.failed >= 2
    _assert_apology_then_answer(result, notices, "speech recognition failed")


async def test_failed_synthesis_is_shown_and_the_next_turn_is_spoken(base_config, models, speaker):
    stream = FailsOnce(models.kokoro_stream, "decode")
    notices = Notices()
    cues = [
        Cue(audio=speaker(FIRST), text=FIRST, at=0.5),
        # The failed piece may have been the whole reply: ask again once the page was told.
        Cue(audio=speaker(SECOND), text=SECOND, when=lambda: bool(notices.messages)),
    ]
    result = await run_conversation(
        config=base_config, models=dataclasses.replace(models, kokoro_stream=stream), cues=cues, observers=[notices]
    )
    assert stream.failed >= 2
    assert len(notices.messages) == 1 and "could not be spoken" in notices.messages[0], notices.messages
    last = result.turns[-1]
    assert _normalize(last.user_text) == _normalize(SECOND), result.summary()
    assert last.bot_text.strip() and last.voice_to_voice_ms is not None, result.summary()


async def test_the_page_is_told_and_hears_the_apology(base_config, models, speaker):
    from tests.live_server import serve
    from tests.conftest import RATE
    from tests.test_server import session

    llm = FailsOnce(models.llm, "create_chat_completion")
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
