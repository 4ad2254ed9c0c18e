"""Shared fixtures: the real embedded models, loaded once, and speech made by Kokoro."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import soxr
from loguru import logger

from bot.config import Config, load_config
from bot.models import Models, load_kokoro, load_models
from tests.slow_synthesis import slowed

# A voice other than the bot's, so the user and the bot sound different.
USER_VOICE = "jm_kumo"
# A turn trace's moments, in the order they happen.
TURN_EVENTS = [
    "user_speech_start_ms",
    "user_speech_end_ms",
    "vad_stop_ms",
    "transcript_ms",
    "generation_start_ms",
    "first_token_ms",
    "tts_start_ms",
    "first_tts_audio_ms",
    "first_audio_out_ms",
    "bot_end_ms",
]
# How much slower synthesis runs in the slow-machine runs of the timing-sensitive tests.
SLOW_FACTOR = 2.5


@pytest.fixture(scope="session")
def base_config(tmp_path_factory) -> Config:
    """The shipped config.yaml, with traces written to a temp folder, admitting by count only.

    Tests open sessions at will, on machines slow enough that admission by measured load
    (bot/admission.py, tested in tests/test_admission.py) would refuse some.
    """
    config = load_config("config.yaml")
    config.tracing.dir = tmp_path_factory.mktemp("latency")
    config.server.admit_max_voice_to_voice_ms = None
    config.server.admit_max_loop_lag_ms = 60_000
    return config


@pytest.fixture(scope="session")
def models(base_config) -> Models:
    return load_models(base_config)


@pytest.fixture(scope="session")
def slow_models(models, base_config) -> Models:
    """The same models on a CPU that synthesizes SLOW_FACTOR times slower (tests/slow_synthesis.py)."""
    return slowed(models, factor=SLOW_FACTOR, voice=base_config.tts.voice)


@pytest.fixture(scope="session")
def speaker(base_config):
    """speak(text) -> int16 mono speech at ``sample_rate`` (16 kHz default), no padding."""
    return make_speaker(base_config)


def make_speaker(config):
    """The ``speaker`` fixture's ``speak``, for benchmarks outside pytest."""
    kokoro = load_kokoro(config)
    cache: dict = {}

    def speak(text: str, *, voice: str = USER_VOICE, sample_rate: int = 16000) -> np.ndarray:
        key = (text, voice, sample_rate)
        if key not in cache:
            audio, rate = kokoro.create(text, voice, lang="en-us")
            audio = soxr.resample(np.asarray(audio, dtype=np.float32), rate, sample_rate)
            peak = float(np.max(np.abs(audio))) or 1.0
            audio = audio * min(1.0, 0.9 / peak)
            cache[key] = (audio * 32767).astype(np.int16)
        return cache[key].copy()

    return speak


# What the server tests' user asks, and at the rate a browser's AudioContext usually runs
# (the server resamples to 16 kHz).
QUESTION = "What is the capital of France?"
RATE = 48000


@pytest.fixture(scope="session")
def question(speaker) -> np.ndarray:
    """The user asking, as a browser microphone sends it: at 48 kHz, with room around it."""
    return np.concatenate(
        [silence(0.3, sample_rate=RATE), speaker(QUESTION, sample_rate=RATE), silence(1.5, sample_rate=RATE)]
    )


def silence(seconds: float, *, sample_rate: int = 16000) -> np.ndarray:
    return np.zeros(int(seconds * sample_rate), dtype=np.int16)


class CapturedLogs:
    """What loguru logs inside the block (secrets must never be in it)."""

    def __init__(self):
        self.lines: list[str] = []

    def __enter__(self):
        self._id = logger.add(lambda m: self.lines.append(str(m)), level="DEBUG")
        return self

    def __exit__(self, *exc):
        logger.remove(self._id)

    @property
    def text(self) -> str:
        return "".join(self.lines)
