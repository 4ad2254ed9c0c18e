"""Per-turn latency traces: one JSON line per turn, a log summary, and /status figures.

Times are milliseconds since the session's pipeline clock started.
"""

from __future__ import annotations

import json
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loguru import logger

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    CancelFrame,
    EagerEndOfTurnCancelFrame,
    EndFrame,
    InputAudioRawFrame,
    InterruptionFrame,
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
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transports.base_output import BaseOutputTransport

from processors.audio_level import pcm_peak
from processors.preemptive import PreemptionWasteFrame, SpeculativeReplyFrame

# Stage name -> (from event, to event); each is a duration in the trace.
STAGES = {
    "endpointing_ms": ("user_speech_end_ms", "transcript_ms"),
    "llm_wait_ms": ("transcript_ms", "generation_start_ms"),
    "llm_first_token_ms": ("generation_start_ms", "first_token_ms"),
    "tts_first_audio_ms": ("tts_start_ms", "first_tts_audio_ms"),
    "output_ms": ("first_tts_audio_ms", "first_audio_out_ms"),
}

# Audio whose peak stays under this (about -50 dBFS) is silence.
_SILENCE_PEAK = 100 / 32768
# A frame this many times louder than the quiet the VAD confirmed is still speech.
_SPEECH_OVER_QUIET = 4.0
# How far before the VAD's own bound the onset of speech is looked for.
_ONSET_LOOKBACK_MS = 400.0
# Input frame levels kept to find the speech end (a few seconds of audio).
# A barge-in turn opens this soon after the transcript that decided it.
_BARGE_IN_WORDS_MS = 500.0
_LEVELS_KEPT = 200


def _speech_level(quiet: list[float]) -> float:
    """A frame louder than this stands out from the ``quiet`` around it as speech."""
    return max(_SILENCE_PEAK, statistics.median(quiet) * _SPEECH_OVER_QUIET) if quiet else _SILENCE_PEAK


@dataclass
class TurnTrace:
    """One user turn and the bot's answer, as it happened."""

    session_id: str
    turn: int
    user_speech_start_ms: float | None = None
    vad_stop_ms: float | None = None
    # True end of speech: the last loud input frame before the VAD stop (at most
    # vad_stop_ms - stop_secs, which is all that is known when noise hides it).
    user_speech_end_ms: float | None = None
    transcript_ms: float | None = None
    generation_start_ms: float | None = None
    first_token_ms: float | None = None
    tts_start_ms: float | None = None
    first_tts_audio_ms: float | None = None
    first_audio_out_ms: float | None = None
    bot_end_ms: float | None = None
    interrupted: bool = False
    # Interrupted turns: from the onset of the user's barge-in speech (found in the
    # input audio before the VAD start) to the end of the bot's last audio frame sent.
    barge_in_stop_ms: float | None = None
    user_text: str = ""
    # What the bot was heard saying (words leave the output as their audio plays),
    # and what the model generated; they differ when the user interrupts.
    bot_text: str = ""
    generated_text: str = ""
    stages: dict[str, float] = field(default_factory=dict)
    voice_to_voice_ms: float | None = None
    # Preemptive replies started on the words heard early; whether the one played was
    # one of them (then generation began before the transcript); what the others cost.
    preemptive_attempts: int = 0
    preemptive_adopted: bool = False
    preemptive_wasted_tokens: int = 0
    preemptive_wasted_synthesis_ms: float = 0.0

    def finish(self) -> None:
        for name, (a, b) in STAGES.items():
            start, end = getattr(self, a), getattr(self, b)
            if start is not None and end is not None:
                self.stages[name] = round(end - start, 1)
        if self.user_speech_end_ms is not None and self.first_audio_out_ms is not None:
            self.voice_to_voice_ms = round(self.first_audio_out_ms - self.user_speech_end_ms, 1)
        self.user_text = self.user_text.strip()
        self.bot_text = " ".join(self.bot_text.split())
        self.generated_text = self.generated_text.strip()


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between samples; None when empty."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


class LatencyTracer(BaseObserver):
    """Watches a session's frames and records each turn's stage timings.

    A turn opens when the user starts speaking (as decided by the turn strategies)
    and closes when the bot finishes or is interrupted.
    """

    def __init__(
        self,
        *,
        session_id: str,
        vad_stop_secs: float,
        vad_start_secs: float = 0.2,
        log_dir: Path | None = None,
        on_turn: Callable[[TurnTrace], None] | None = None,
    ):
        """Initialize the tracer.

        Args:
            session_id: Names the JSONL file and every record.
            vad_stop_secs: The VAD's stop delay: the speech ended at least this long
                before the VAD says so.
            vad_start_secs: The VAD's start delay: the speech began this long before it says so.
            log_dir: Where ``<session_id>.jsonl`` is written; None keeps traces in memory only.
            on_turn: Optional callback receiving each finished :class:`TurnTrace`.
        """
        super().__init__()
        self.session_id = session_id
        self.turns: list[TurnTrace] = []
        self._vad_stop_secs = vad_stop_secs
        self._vad_start_secs = vad_start_secs
        self._path = Path(log_dir) / f"{session_id}.jsonl" if log_dir else None
        if self._path:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        self._on_turn = on_turn
        self._current: TurnTrace | None = None
        self._speech_start_ms: float | None = None
        # When the last audible bot audio frame left the output transport.
        self._last_audio_out_ms: float | None = None
        # (push time in ms, peak level) of recent input audio frames.
        self._levels: deque[tuple[float, float]] = deque(maxlen=_LEVELS_KEPT)
        # (time in ms, text) of a transcript no turn took: the words that start a barge-in.
        self._unclaimed: tuple[float, str] | None = None
        # The preemptive reply in flight: its generation start, first token and text,
        # the turn's once the turn is confirmed.
        self._preemptive: TurnTrace | None = None

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def open_turn(self) -> TurnTrace | None:
        """The turn in progress, if any."""
        return self._current

    async def on_push_frame(self, data: FramePushed):
        frame, t = data.frame, data.timestamp / 1e6
        if isinstance(frame, TTSTextFrame):
            # Words leave the output transport as their audio plays: what was heard.
            if self._current and isinstance(data.source, BaseOutputTransport):
                self._current.bot_text += " " + frame.text
            return
        if isinstance(frame, OutputAudioRawFrame) and isinstance(data.source, BaseOutputTransport):
            if pcm_peak(frame.audio) > _SILENCE_PEAK:
                # The frame is pushed on once written: its audio ends about now.
                self._last_audio_out_ms = t
            return
        if isinstance(frame, TTSStoppedFrame) and isinstance(data.source, BaseOutputTransport):
            # Pushed on once the reply's last audio was written: the reply is over. (pipecat
            # also reports the bot stopped after a few seconds' gap in its voice; the reply goes on.)
            if self._current and self._current.first_audio_out_ms is not None:
                self._current.bot_end_ms = t
                self._close_turn()
            return
        # Turn frames are broadcast both ways; the downstream copy is the one to count.
        if not data.first_push or data.direction != FrameDirection.DOWNSTREAM:
            return

        if isinstance(frame, InputAudioRawFrame):
            self._levels.append((t, pcm_peak(frame.audio)))
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._speech_start_ms = t
        elif isinstance(frame, UserStartedSpeakingFrame):
            await self._open_turn(t)
        elif isinstance(frame, (InterruptionFrame, CancelFrame, EndFrame)):
            if self._current and self._heard(self._current):
                # The session ending under the bot is no interruption by the user.
                if isinstance(frame, InterruptionFrame):
                    self._cut(self._current, t)
                else:
                    self._current.bot_end_ms = t
                self._close_turn()
            return

        turn = self._current
        if turn is not None and self._trace_preemptive(frame, t, turn):
            return
        if isinstance(frame, TranscriptionFrame) and (turn is None or turn.generation_start_ms is not None):
            # Words heard over the bot: when they barge in, the new turn opens right after them.
            self._unclaimed = (t, frame.text)
            return
        if turn is None:
            return
        if isinstance(frame, VADUserStoppedSpeakingFrame) and turn.generation_start_ms is None:
            turn.vad_stop_ms = t
            turn.user_speech_end_ms = round(self._speech_end_ms(vad_stop_ms=t), 1)
        elif isinstance(frame, TranscriptionFrame) and turn.generation_start_ms is None:
            turn.transcript_ms = t
            turn.user_text += " " + frame.text
        elif isinstance(frame, LLMFullResponseStartFrame) and turn.generation_start_ms is None:
            turn.generation_start_ms = t
        elif isinstance(frame, LLMTextFrame) and turn.generation_start_ms is not None:
            turn.first_token_ms = turn.first_token_ms or t
            turn.generated_text += frame.text
        elif isinstance(frame, BotStartedSpeakingFrame):
            if turn.generation_start_ms is not None:
                turn.first_audio_out_ms = turn.first_audio_out_ms or t
        elif turn.generation_start_ms is None:
            return  # the end of an earlier, cancelled reply: not this turn's
        elif isinstance(frame, TTSStartedFrame):
            turn.tts_start_ms = turn.tts_start_ms or t
        elif isinstance(frame, TTSAudioRawFrame):
            turn.first_tts_audio_ms = turn.first_tts_audio_ms or t

    def _trace_preemptive(self, frame, t: float, turn: TurnTrace) -> bool:
        """Follow a preemptive reply; True when the frame was its and is accounted for."""
        if isinstance(frame, SpeculativeReplyFrame):
            turn.preemptive_attempts += 1
            self._preemptive = TurnTrace(session_id=self.session_id, turn=turn.turn, generation_start_ms=t)
            return True
        if isinstance(frame, PreemptionWasteFrame):
            turn.preemptive_wasted_tokens += frame.tokens
            turn.preemptive_wasted_synthesis_ms += round(frame.synthesis_secs * 1000, 1)
            return True
        early = self._preemptive
        if early is None:
            return False
        if isinstance(frame, EagerEndOfTurnCancelFrame):
            self._preemptive = None
            return True
        if isinstance(frame, UserStoppedSpeakingFrame):
            # The turn ended with the words it answers: it is the reply.
            self._preemptive = None
            turn.preemptive_adopted = True
            turn.generation_start_ms, turn.first_token_ms = early.generation_start_ms, early.first_token_ms
            turn.generated_text = early.generated_text
            return False
        if isinstance(frame, LLMFullResponseStartFrame):
            return True
        if isinstance(frame, LLMTextFrame):
            early.first_token_ms = early.first_token_ms or t
            early.generated_text += frame.text
            return True
        return False

    def _speech_end_ms(self, *, vad_stop_ms: float) -> float:
        """When the user stopped speaking, judged on the audio the bot received.

        ``vad_stop_ms - stop_secs`` is only a bound: the VAD's quiet count starts
        at its first quiet window, which trails the speech by up to a window plus
        the model's lag and any queueing (30-50 ms here), and that much latency
        would go unseen. A live transport pushes a frame once its audio is
        captured, so the last frame clearly louder than the quiet the VAD
        confirmed ends the speech. Where noise hides it, the bound stands.
        """
        bound = vad_stop_ms - self._vad_stop_secs * 1000
        quiet = [peak for t, peak in self._levels if t > bound]
        if not quiet:
            return bound
        threshold = _speech_level(quiet)
        since = self._speech_start_ms if self._speech_start_ms is not None else bound
        for t, peak in reversed(self._levels):
            if t < since:
                break
            if peak > threshold:
                return min(t, bound)
        return bound

    async def _open_turn(self, t: float):
        if self._current is not None:
            # A reply that sounded and has not ended is cut, even paused or in a gap (a
            # paused reply soon reads as "bot stopped speaking" to pipecat).
            if self._heard(self._current) and self._current.bot_end_ms is None:
                self._cut(self._current, t)
            self._current.bot_end_ms = self._current.bot_end_ms or t
            self._close_turn()
        self._preemptive = None
        self._current = TurnTrace(
            session_id=self.session_id,
            turn=len(self.turns),
            user_speech_start_ms=self._speech_start_ms if self._speech_start_ms is not None else t,
        )
        if self._unclaimed is not None and t - self._unclaimed[0] <= _BARGE_IN_WORDS_MS:
            self._current.transcript_ms, self._current.user_text = self._unclaimed
        self._unclaimed = None

    def _heard(self, turn: TurnTrace) -> bool:
        """Whether the turn's reply was heard: the output wrote some of its audio.

        pipecat reports the bot started speaking as the output takes the first audio,
        even when it then holds it (the user went on in a pause) and none is played:
        such a turn is given no reply (its first audio out is forgotten).
        """
        heard = (
            turn.first_audio_out_ms is not None
            and self._last_audio_out_ms is not None
            and self._last_audio_out_ms >= turn.first_audio_out_ms
        )
        if not heard:
            turn.first_audio_out_ms = None
        return heard

    def _cut(self, turn: TurnTrace, t: float) -> None:
        """The user barged in: the bot's speech ended with the last audio it sent."""
        turn.interrupted = True
        turn.bot_end_ms = self._last_audio_out_ms if self._last_audio_out_ms is not None else t
        if self._speech_start_ms is not None:
            onset = self._speech_onset_ms(vad_start_ms=self._speech_start_ms)
            turn.barge_in_stop_ms = round(max(0.0, turn.bot_end_ms - onset), 1)

    def _speech_onset_ms(self, *, vad_start_ms: float) -> float:
        """When the user began to speak, judged on the audio the bot received.

        The VAD reports speech ``start_secs`` after it is sure, later still while
        its smoothed volume rises: the onset is where the run of frames clearly
        louder than the quiet before it begins, at most ``_ONSET_LOOKBACK_MS``
        before that bound.
        """
        bound = vad_start_ms - self._vad_start_secs * 1000
        earliest = bound - _ONSET_LOOKBACK_MS
        quiet = [peak for t, peak in self._levels if t < earliest]
        threshold = _speech_level(quiet)
        onset = bound
        for t, peak in reversed(self._levels):
            if t > vad_start_ms:
                continue
            if t < earliest or peak <= threshold:
                break
            onset = min(onset, t)
        return onset

    def _close_turn(self):
        turn, self._current = self._current, None
        if turn is None:
            return
        turn.finish()
        self.turns.append(turn)
        logger.info(
            f"[{turn.session_id}] turn {turn.turn}: voice-to-voice {turn.voice_to_voice_ms} ms "
            f"{turn.stages} interrupted={turn.interrupted} user={turn.user_text!r} bot={turn.bot_text!r}"
        )
        if self._path:
            with open(self._path, "a") as f:
                f.write(json.dumps(asdict(turn)) + "\n")
        if self._on_turn:
            self._on_turn(turn)
