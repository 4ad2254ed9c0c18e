"""Scripted conversations (tests/scenarios/*.yaml): what the user says, and when.

A scenario is a list of user turns. Each is speech made from text by Kokoro (in a
voice other than the bot's), a WAV file, or a cough-like noise burst, and is
played at a fixed time, after a pause, or a set time after the bot starts
answering (to barge in whatever the bot's speed). ``expect`` holds what the
scenario checks; tests read it, the benchmark ignores it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import yaml
from pydantic import BaseModel, ConfigDict, model_validator

from transports.scripted import SILENCE_LEVEL, Cue

DEFAULT_SCENARIOS = Path(__file__).resolve().parent.parent / "tests" / "scenarios"
USER_VOICE = "jm_kumo"


class ScenarioTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    say: str | None = None
    wav: Path | None = None
    noise_secs: float | None = None
    hum: bool = False
    voice: str = USER_VOICE
    gain: float = 1.0
    # Triggers (see transports.scripted.Cue): one of these.
    at: float | None = None
    after_bot_starts: float | None = None
    after_bot_done: float | None = None
    after_previous: float = 0.0
    # Splits ``say`` at "..." into pieces with a pause of this many seconds between.
    pause_secs: float = 0.0

    @model_validator(mode="after")
    def _one_source(self):
        if sum(x is not None for x in (self.say, self.wav, self.noise_secs)) + self.hum != 1:
            raise ValueError("a turn needs exactly one of say, wav, noise_secs, hum")
        return self


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    turns: list[ScenarioTurn]
    echo_gain: float = 0.0
    config: dict[str, Any] = {}
    expect: dict[str, Any] = {}
    path: Path | None = None


def load_scenarios(folder: Path = DEFAULT_SCENARIOS, *, names: list[str] | None = None) -> list[Scenario]:
    """Every scenario in ``folder`` (or those named), sorted by name."""
    scenarios = []
    for path in sorted(Path(folder).glob("*.yaml")):
        scenario = Scenario(**yaml.safe_load(path.read_text()), path=path)
        if not names or scenario.name in names:
            scenarios.append(scenario)
    if names and len(scenarios) != len(set(names)):
        missing = set(names) - {s.name for s in scenarios}
        raise ValueError(f"no scenario named {sorted(missing)} in {folder}")
    return scenarios


def noise_burst(seconds: float, *, sample_rate: int, seed: int = 7) -> np.ndarray:
    """A cough-like burst: loud, broadband, a sharp attack and a quick decay."""
    n = int(seconds * sample_rate)
    rng = np.random.default_rng(seed)
    envelope = np.exp(-np.linspace(0, 5, n)) * np.minimum(1, np.linspace(0, 20, n))
    return (rng.standard_normal(n) * envelope * 0.5).astype(np.float32)


def hum(*, sample_rate: int) -> np.ndarray:
    """A hummed "mm-hmm": two nasal syllables, the second higher, about 0.45 s.

    TTS cannot hum (Kokoro spells "Mhm" out as letters), so this backchannel is
    made the way a voice makes it: a closed-mouth voiced tone with a pitch rise.
    """
    def syllable(seconds: float, f0: tuple[float, float]) -> np.ndarray:
        n = int(seconds * sample_rate)
        pitch = np.linspace(*f0, n)
        phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
        # A nasal murmur: strong fundamental, weak upper harmonics.
        tone = sum(np.sin(k * phase) / k**2 for k in range(1, 8))
        envelope = np.sin(np.linspace(0, np.pi, n)) ** 0.5
        return tone * envelope

    gap = np.zeros(int(0.06 * sample_rate))
    audio = np.concatenate([syllable(0.17, (120, 115)), gap, syllable(0.22, (125, 170))])
    return (0.5 * audio / np.max(np.abs(audio))).astype(np.float32)


class Speaker:
    """Speech for scenario text, by Kokoro, cached: the same text sounds the same each run."""

    def __init__(self, *, kokoro, sample_rate: int):
        self._kokoro = kokoro
        self._rate = sample_rate
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def __call__(self, text: str, *, voice: str = USER_VOICE) -> np.ndarray:
        key = (text, voice)
        if key not in self._cache:
            audio, rate = self._kokoro.create(text, voice, lang="en-us")
            audio = soxr.resample(np.asarray(audio, dtype=np.float32), rate, self._rate)
            self._cache[key] = audio * min(1.0, 0.9 / (float(np.max(np.abs(audio))) or 1.0))
        return self._cache[key]


def build_cues(scenario: Scenario, *, speaker: Speaker, sample_rate: int) -> list[Cue]:
    """The scenario's turns as audio cues for the scripted transport."""
    cues = []
    for turn in scenario.turns:
        if turn.say is not None:
            pieces = [p.strip() for p in turn.say.split("...") if p.strip()]
            gap = np.zeros(int(turn.pause_secs * sample_rate), np.float32)
            parts = []
            for i, piece in enumerate(pieces):
                parts += [gap] * (i > 0) + [speaker(piece, voice=turn.voice)]
            audio = np.concatenate(parts)
            text = " ".join(pieces)
        elif turn.wav is not None:
            wav = turn.wav if turn.wav.is_absolute() else (scenario.path.parent / turn.wav)
            audio, rate = sf.read(str(wav), dtype="float32", always_2d=True)
            audio = soxr.resample(audio.mean(axis=1), rate, sample_rate)
            text = ""
        elif turn.hum:
            audio, text = hum(sample_rate=sample_rate), ""
        else:
            audio, text = noise_burst(turn.noise_secs, sample_rate=sample_rate), ""
        cues.append(
            Cue(
                audio=(np.clip(audio * turn.gain, -1, 1) * 32767).astype(np.int16),
                text=text,
                at=turn.at,
                after_bot_starts=turn.after_bot_starts,
                after_bot_done=turn.after_bot_done,
                after_previous=turn.after_previous,
            )
        )
    return cues


def speech_onset(cue: Cue, *, sample_rate: int) -> float:
    """When the cue's first non-silent sample was played (s from transport start)."""
    loud = np.flatnonzero(np.abs(cue.audio.astype(np.int32)) > SILENCE_LEVEL)
    return cue.started + (loud[0] / sample_rate if loud.size else 0.0)


def barge_in_stop_ms(result, index: int, *, sample_rate: int) -> float | None:
    """From the onset of cue ``index`` to the bot's last audio during it; None if not played.

    The bot cannot answer before the user finishes, so any bot audio while the
    user is still talking is the old reply not yet stopped.
    """
    cue = result.cues[index]
    if cue.started is None:
        return None
    onset = speech_onset(cue, sample_rate=sample_rate)
    last = result.recording.last_sound_between(onset, cue.speech_end)
    return round(max(0.0, (last or onset) - onset) * 1000, 1)


def kept_talking(result, index: int, *, after_secs: float = 1.0) -> bool:
    """Whether the bot was still speaking ``after_secs`` after cue ``index`` ended."""
    cue = result.cues[index]
    if cue.speech_end is None:
        return False
    return result.recording.last_sound_between(cue.speech_end + after_secs, cue.speech_end + after_secs + 1.0) is not None
