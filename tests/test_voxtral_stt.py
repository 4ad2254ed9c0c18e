"""Voxtral through the production path (load_models -> bot/pipeline.py) on a tiny random checkpoint.

The tiny model's words are noise, so these tests assert on frames and flow, not text.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="needs the voxtral extra")

import torch

from pipecat.frames.frames import (
    ErrorFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMTextFrame,
    TranscriptionFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMUserAggregator
from pipecat.tests.utils import SleepFrame, run_test

from bot.assets import MissingModelError
from bot.config import Config
from bot.conversation import run_conversation
from bot.models import choose_stt_engine, load_models, load_voxtral
from processors.voxtral_responder import VoxtralLLMService, fold_system_prompt
from transports.scripted import Cue
from tests.tiny_voxtral import build_tiny_voxtral

QUESTION = "What is the capital of France?"


class FrameLog(BaseObserver):
    """Every frame pushed in a session, with the processors it went between."""

    def __init__(self):
        super().__init__()
        self.pushed: list[FramePushed] = []

    async def on_push_frame(self, data: FramePushed):
        self.pushed.append(data)

    def frames(self, kind: type, *, source: type = object, destination: type = object) -> list:
        return [
            p.frame
            for p in self.pushed
            if isinstance(p.frame, kind)
            and isinstance(p.source, source)
            and isinstance(p.destination, destination)
        ]


@pytest.fixture(scope="module")
def tiny_voxtral(tmp_path_factory) -> Path:
    return build_tiny_voxtral(tmp_path_factory.mktemp("voxtral") / "tiny")


def voxtral_config(base: Config, model_path: Path, *, llm_engine: str = "llama_cpp") -> Config:
    config = base.model_copy(deep=True)
    config.stt.engine = "voxtral"
    config.stt.voxtral.model_path = model_path
    config.stt.voxtral.max_new_tokens = 8
    config.llm.engine = llm_engine
    config.llm.max_tokens = 8  # short replies keep the spoken answer (real-time playback) short
    return config


def user_turn(speaker) -> list[Cue]:
    return [Cue(audio=speaker(QUESTION), text=QUESTION, at=0.5)]


async def test_voxtral_stt_turn_through_the_pipeline(base_config, tiny_voxtral, speaker):
    config = voxtral_config(base_config, tiny_voxtral)
    models = load_models(config)
    assert models.describe()["stt"] == {
        "engine": "voxtral",
        "reason": "stt.engine is set to voxtral",
        "device": "cpu",
        "dtype": "float32",
        "gpu_memory_bytes": None,
    }
    log = FrameLog()
    result = await run_conversation(
        config=config, models=models, cues=user_turn(speaker), observers=[log]
    )

    heard = log.frames(TranscriptionFrame, destination=LLMUserAggregator)
    assert heard and all(f.text and f.language == "en" for f in heard), result.summary()
    user_messages = [m for m in result.messages if m["role"] == "user"]
    assert user_messages and heard[0].text in user_messages[0]["content"]
    assert result.messages[-1]["role"] == "assistant"
    (turn,) = result.turns
    assert turn.voice_to_voice_ms is not None and turn.voice_to_voice_ms > 0
    assert result.recording.last_sound is not None  # the bot spoke


async def test_voxtral_answers_as_the_responder(base_config, tiny_voxtral, speaker):
    config = voxtral_config(base_config, tiny_voxtral, llm_engine="voxtral")
    models = load_models(config)
    assert models.llm is None  # one model in memory: Voxtral hears and answers
    log = FrameLog()
    result = await run_conversation(
        config=config, models=models, cues=user_turn(speaker), observers=[log]
    )

    tokens = log.frames(LLMTextFrame, source=VoxtralLLMService)
    assert len(tokens) > 1, result.summary()  # streamed, not one blob
    assistant = [m for m in result.messages if m["role"] == "assistant"]
    assert assistant and assistant[-1]["content"].strip()
    assert result.recording.last_sound is not None


async def test_interruption_stops_generation(base_config, tiny_voxtral):
    max_tokens = 1500  # uninterrupted, the tiny model writes at least this many letters
    model = load_voxtral(voxtral_config(base_config, tiny_voxtral))
    llm = VoxtralLLMService(model=model, system_prompt="Be brief.", max_tokens=max_tokens)
    context = LLMContext(messages=[{"role": "user", "content": "Tell me a long story."}])
    start = time.monotonic()
    down, _ = await run_test(
        llm,
        frames_to_send=[
            LLMContextFrame(context=context),
            SleepFrame(sleep=0.2),
            InterruptionFrame(),
        ],
    )
    elapsed = time.monotonic() - start

    streamed = "".join(f.text for f in down if isinstance(f, LLMTextFrame))
    assert streamed and len(streamed) < max_tokens // 2, len(streamed)
    assert elapsed < 3.0, elapsed
    assert not model.lock.locked()  # the generating thread has finished


class PromptLengths:
    """The real tiny model; each prompt it is asked to continue is measured (a spy, not a fake)."""

    def __init__(self, model):
        self._model = model
        self.lengths: list[int] = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, **kwargs):
        self.lengths.append(kwargs["input_ids"].shape[1])
        return self._model.generate(**kwargs)


async def test_a_conversation_longer_than_voxtrals_window_is_still_answered(base_config, tiny_voxtral):
    """60 exchanges (~10,000 tokens) on a model with a 2048-token window: the oldest are left
    out, counted by Voxtral's own chat template, and the latest question is answered."""
    model = load_voxtral(voxtral_config(base_config, tiny_voxtral))
    spy = PromptLengths(model.model)
    model.model = spy
    max_tokens = 8
    llm = VoxtralLLMService(model=model, system_prompt="Be brief.", max_tokens=max_tokens, temperature=0.0)
    context = LLMContext()
    for i in range(60):
        context.add_message({"role": "user", "content": f"Question {i}: " + "tell me more about it " * 15})
        context.add_message({"role": "assistant", "content": f"Answer {i}: " + "here is more about it " * 15})
    context.add_message({"role": "user", "content": QUESTION})

    down, up = await run_test(llm, frames_to_send=[LLMContextFrame(context=context)])

    assert not [f for f in [*down, *up] if isinstance(f, ErrorFrame)]
    assert "".join(f.text for f in down if isinstance(f, LLMTextFrame)).strip()
    (length,) = spy.lengths
    window = model.model.config.text_config.max_position_embeddings
    assert window // 2 < length <= window - (max_tokens + 24), length  # trimmed, not emptied


def test_default_install_needs_no_torch():
    """With torch and transformers unimportable, the bot still imports and auto picks Whisper."""
    code = (
        "import sys; sys.modules['torch'] = sys.modules['transformers'] = None\n"
        "import bot.cli, bot.server\n"
        "from bot.config import Config\n"
        "from bot.models import choose_stt_engine\n"
        "print(choose_stt_engine(Config())[1])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "torch is not installed" in out.stdout, out.stderr


def test_auto_without_cuda_picks_whisper(base_config, tiny_voxtral, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = voxtral_config(base_config, tiny_voxtral)
    config.stt.engine = "auto"
    engine, reason = choose_stt_engine(config)
    assert engine == "whisper" and "no CUDA GPU" in reason


def test_auto_with_cuda_and_weights_picks_voxtral(base_config, tiny_voxtral, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = voxtral_config(base_config, tiny_voxtral)
    config.stt.engine = "auto"
    engine, reason = choose_stt_engine(config)
    assert engine == "voxtral" and str(tiny_voxtral) in reason


def test_auto_with_cuda_but_no_weights_picks_whisper(base_config, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = voxtral_config(base_config, tmp_path)
    config.stt.engine = "auto"
    engine, reason = choose_stt_engine(config)
    assert engine == "whisper"
    assert "huggingface-cli download" in reason and "Whisper" in reason


def test_voxtral_without_weights_names_the_fix(base_config, tmp_path):
    config = voxtral_config(base_config, tmp_path)
    with pytest.raises(MissingModelError) as error:
        load_models(config)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "huggingface-cli download mistralai/Voxtral-Mini-3B-2507" in message
    assert "stt.voxtral.model_path" in message


def test_system_prompt_travels_in_the_first_user_turn():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
    ]
    assert fold_system_prompt(messages) == [
        {"role": "user", "content": "Be brief.\n\nHi."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
    ]
