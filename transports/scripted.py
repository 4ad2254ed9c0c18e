"""An in-memory transport: plays a scripted user in real time and records the bot.

The user is a list of cues (pieces of int16 audio), each played when its trigger
fires: a fixed time, a gap after the previous cue, or some time after the bot's
reply becomes audible (to barge in mid-sentence whatever the bot's speed). The
channel is fed in 20 ms frames at real-time pace, and each cue's true start and
end of speech are recorded. Every bot audio frame is recorded with the time it
starts playing, paced like a real speaker, so interruptions and latency behave as
with a person. Optionally the bot's own audio leaks back into the user channel
(``echo_gain``), as through an open microphone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import soxr

from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams

from transports.playback_gate import PausableOutputMixin

FRAME_SECS = 0.02
# Samples quieter than this (about -50 dBFS) are silence to the listener.
SILENCE_LEVEL = 100


@dataclass
class Cue:
    """A piece of the user's audio and when to play it.

    Exactly one trigger applies: ``at`` (seconds from the start), else ``when``
    (as soon as it returns True: an event a test waits for), else
    ``after_bot_starts`` (seconds after the bot's next reply becomes audible),
    else ``after_bot_done`` (seconds of bot silence after that reply), else
    ``after_previous`` (seconds after the previous cue ends; default 0).
    """

    audio: np.ndarray
    text: str = ""
    at: float | None = None
    when: Callable[[], bool] | None = None
    after_bot_starts: float | None = None
    after_bot_done: float | None = None
    after_previous: float = 0.0
    started: float | None = None
    speech_end: float | None = None

    def speech_end_offset(self, sample_rate: int) -> float:
        """Seconds from the cue's start to its last non-silent sample."""
        loud = np.flatnonzero(np.abs(self.audio.astype(np.int32)) > SILENCE_LEVEL)
        return (loud[-1] + 1) / sample_rate if loud.size else 0.0


@dataclass
class BotRecording:
    """Bot audio as it left the transport: (start time in s, int16 samples) chunks.

    ``holes`` are the gaps inside a reply where the speaker ran dry, as (time the
    audio resumed, seconds of silence): synthesis fell behind playback.
    """

    sample_rate: int
    chunks: list[tuple[float, np.ndarray]] = field(default_factory=list)
    last_sound: float | None = None
    holes: list[tuple[float, float]] = field(default_factory=list)

    def holes_between(self, t0: float, t1: float) -> list[float]:
        """Lengths (s) of the holes in replies between ``t0`` and ``t1``."""
        return [gap for t, gap in self.holes if t0 <= t <= t1]

    def add(self, start: float, audio: np.ndarray) -> None:
        self.chunks.append((start, audio))
        loud = np.flatnonzero(np.abs(audio.astype(np.int32)) > SILENCE_LEVEL)
        if loud.size:
            self.last_sound = start + (loud[-1] + 1) / self.sample_rate

    def timeline(self, *, duration: float | None = None) -> np.ndarray:
        """All bot audio on one timeline from transport start, silence in the gaps."""
        end = max((t + len(a) / self.sample_rate for t, a in self.chunks), default=0.0)
        out = np.zeros(int((duration or end) * self.sample_rate) + 1, dtype=np.int32)
        for t, a in self.chunks:
            i = int(round(t * self.sample_rate))
            seg = a[: max(0, len(out) - i)]
            out[i : i + len(seg)] += seg
        return np.clip(out, -32768, 32767).astype(np.int16)

    def first_sound_after(self, t: float) -> float | None:
        """Time of the first non-silent bot sample at or after ``t``."""
        for start, audio in self.chunks:
            if start + len(audio) / self.sample_rate < t:
                continue
            loud = np.flatnonzero(np.abs(audio.astype(np.int32)) > SILENCE_LEVEL)
            times = start + loud / self.sample_rate
            times = times[times >= t]
            if times.size:
                return float(times[0])
        return None

    def last_sound_between(self, t0: float, t1: float) -> float | None:
        """End time of the last non-silent bot sample in [t0, t1]."""
        last = None
        for start, audio in self.chunks:
            loud = np.flatnonzero(np.abs(audio.astype(np.int32)) > SILENCE_LEVEL)
            if loud.size == 0:
                continue
            times = start + (loud + 1) / self.sample_rate
            times = times[(times >= t0) & (times <= t1)]
            if times.size:
                last = float(times[-1])
        return last

    def samples_between(self, t0: float, t1: float, *, sample_rate: int) -> np.ndarray:
        """What the speaker played in [t0, t1), resampled to ``sample_rate`` (float32)."""
        n = int(round((t1 - t0) * self.sample_rate))
        out = np.zeros(n, dtype=np.float32)
        for start, audio in reversed(self.chunks):
            end = start + len(audio) / self.sample_rate
            if end <= t0:
                break
            if start >= t1:
                continue
            a0 = max(0, int(round((t0 - start) * self.sample_rate)))
            o0 = max(0, int(round((start - t0) * self.sample_rate)))
            seg = audio[a0 : a0 + n - o0].astype(np.float32) / 32768.0
            out[o0 : o0 + len(seg)] += seg
        if sample_rate != self.sample_rate and n:
            out = soxr.resample(out, self.sample_rate, sample_rate)
        return out


class _Clock:
    """The transport's own time origin, shared by input and output."""

    def __init__(self):
        self.t0: float | None = None

    def now(self) -> float:
        if self.t0 is None:
            self.t0 = time.monotonic()
        return time.monotonic() - self.t0


class ScriptedInputTransport(BaseInputTransport):
    """Plays the cues into the user channel, silence in between, in real time."""

    def __init__(
        self,
        *,
        cues: list[Cue],
        clock: _Clock,
        recording: BotRecording,
        echo_gain: float,
        params: TransportParams,
        **kwargs,
    ):
        super().__init__(params, **kwargs)
        self.cues = cues
        self._clock = clock
        self._recording = recording
        self._echo_gain = echo_gain
        self._feeder: asyncio.Task | None = None
        self.finished = asyncio.Event()
        # Pipeline clock time (ms) at this transport's time zero, to align traces.
        self.pipeline_offset_ms = 0.0

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)
        if self._feeder is None:
            self._feeder = self.create_task(self._feed())

    async def cleanup(self):
        if self._feeder:
            await self.cancel_task(self._feeder)
            self._feeder = None
        await super().cleanup()

    def _due(self, cue: Cue, t: float, previous_end: float) -> bool:
        if cue.at is not None:
            return t >= cue.at
        if cue.when is not None:
            return cue.when()
        if cue.after_bot_starts is not None or cue.after_bot_done is not None:
            onset = self._recording.first_sound_after(previous_end)
            if onset is None:
                return False
            if cue.after_bot_starts is not None:
                return t >= onset + cue.after_bot_starts
            return t >= self._recording.last_sound + cue.after_bot_done
        return t >= previous_end + cue.after_previous

    async def _feed(self):
        rate = self.sample_rate
        step = int(rate * FRAME_SECS)
        self._clock.now()
        self.pipeline_offset_ms = self.get_clock().get_time() / 1e6
        pending = list(self.cues)
        playing: tuple[Cue, int] | None = None  # the cue and how far it has played
        previous_end = 0.0
        n = 0
        while True:
            t = n * step / rate
            chunk = np.zeros(step, dtype=np.float32)
            if playing is None and pending and self._due(pending[0], t, previous_end):
                cue = pending.pop(0)
                cue.started = t
                cue.speech_end = t + cue.speech_end_offset(rate)
                playing = (cue, 0)
            if playing is not None:
                cue, pos = playing
                piece = cue.audio[pos : pos + step].astype(np.float32)
                chunk[: len(piece)] += piece
                pos += step
                playing = (cue, pos) if pos < len(cue.audio) else None
                if playing is None:
                    previous_end = t + len(piece) / rate
                    if not pending:
                        self.finished.set()
            if self._echo_gain > 0:
                echo = self._recording.samples_between(t - FRAME_SECS, t, sample_rate=rate)[:step]
                chunk[: len(echo)] += self._echo_gain * 32767 * echo
            await self.push_audio_frame(
                InputAudioRawFrame(
                    audio=np.clip(chunk, -32768, 32767).astype(np.int16).tobytes(),
                    sample_rate=rate,
                    num_channels=1,
                )
            )
            n += 1
            # Pace to the wall clock, not to the sleeps, so frames never drift.
            await asyncio.sleep(max(0.0, n * step / rate - self._clock.now()))


class ScriptedOutputTransport(PausableOutputMixin, BaseOutputTransport):
    """Records each bot audio frame at the moment it would start to play."""

    def __init__(self, *, clock: _Clock, recording: BotRecording, params: TransportParams, **kwargs):
        super().__init__(params, **kwargs)
        self._clock = clock
        self._recording = recording
        self._next_play = 0.0

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame):
            self._next_play = 0.0  # the reply was cut: the gap that follows is no hole

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM):
        if isinstance(frame, TTSStoppedFrame):
            # Pushed on once all the reply's audio before it was written: the reply is over.
            self._next_play = 0.0
        await super().push_frame(frame, direction)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        if self.playback_gate.paused:
            if not await self.playback_gate.admit():
                return False
            self._next_play = 0.0  # held on purpose: the gap is no hole
        now = self._clock.now()
        gap = now - self._next_play
        if self._next_play and gap > FRAME_SECS:
            self._recording.holes.append((now, gap))
        start = max(now, self._next_play)
        audio = np.frombuffer(frame.audio, dtype=np.int16).copy()
        self._recording.add(start, audio)
        self._next_play = start + len(audio) / frame.sample_rate
        # Like a speaker's buffer: hand over the next chunk just as this one plays out.
        await asyncio.sleep(max(0.0, self._next_play - self._clock.now() - FRAME_SECS))
        return True


class ScriptedTransport(BaseTransport):
    """A transport for tests and benchmarks: scripted user audio in, recorded bot audio out."""

    def __init__(
        self,
        *,
        cues: list[Cue],
        in_sample_rate: int = 16000,
        out_sample_rate: int = 24000,
        echo_gain: float = 0.0,
    ):
        """Initialize the transport.

        Args:
            cues: The user's audio, int16 mono at ``in_sample_rate``, and when to play it.
            in_sample_rate: Sample rate of ``audio``.
            out_sample_rate: Sample rate the bot speaks at.
            echo_gain: How much of the bot's audio leaks into the user channel (0 = none).
        """
        super().__init__()
        self._params = TransportParams(
            audio_in_enabled=True,
            audio_in_sample_rate=in_sample_rate,
            audio_out_enabled=True,
            audio_out_sample_rate=out_sample_rate,
            audio_out_end_silence_secs=0,
            # 20 ms to the speaker at a time, like WebRTC and telephony frames (pipecat: 40).
            audio_out_10ms_chunks=2,
        )
        self.clock = _Clock()
        self.recording = BotRecording(sample_rate=out_sample_rate)
        self._input = ScriptedInputTransport(
            cues=cues,
            clock=self.clock,
            recording=self.recording,
            echo_gain=echo_gain,
            params=self._params,
        )
        self._output = ScriptedOutputTransport(
            clock=self.clock, recording=self.recording, params=self._params
        )

    def input(self) -> ScriptedInputTransport:
        return self._input

    def output(self) -> FrameProcessor:
        return self._output
