"""Deciding whether the user really took the floor while the bot holds it.

The bot holds the floor from the end of a user turn (it is thinking) until it
stops speaking. While it is free, speech starts a user turn at once (as
pipecat's VAD strategy does). While the bot holds it, the user's interim words
decide: a backchannel ("mhm", "okay"), a noise or breath that yields no words,
or the bot's own voice coming back through an open microphone (its words match
what the bot just said) leave the bot alone. Other words are a barge-in once the
user has spoken for ``min_secs``: Whisper tiny hears a hummed "mhm" as words
("I made"), but a backchannel is short. "Wait" or "stop" is short too, and always
takes the floor. An interim transcript of speech still
going on ends in half-heard words ("Yehirite" for "yeah, right"), so only words
that two passes in a row agree on count; a final transcript counts as it is.

Words take the better part of a second to hear, and a bot that talks on over
the user for that long feels broken. So playback pauses as soon as the VAD
hears the user while the bot holds the floor (unless the sound is no louder than
the bot's own echo), and resumes if the words do not claim the floor: a reply
about to start waits too, so a user going on after a pause mid-sentence is not
answered after two words. While the bot is only thinking it cannot be drowned
out nor echoed, so a reply about to start waits from the speech's first frame,
before the VAD's start delay is over.
"""

from __future__ import annotations

import difflib
import re
import time
from collections import deque
from typing import TYPE_CHECKING

from loguru import logger

from pipecat.audio.vad.vad_analyzer import VADState
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.turns.types import ProcessFrameResult
from pipecat.turns.user_start.base_user_turn_start_strategy import BaseUserTurnStartStrategy

from processors.audio_level import pcm_peak
from transports.playback_gate import PausePlaybackFrame, ResumePlaybackFrame

if TYPE_CHECKING:
    from processors.bot_voice import BotVoice
    from processors.speech_onset import OnsetSileroVADAnalyzer

BACKCHANNELS = frozenset(
    "mhm mm mmm hmm hm mmhmm mmhm uh huh uhhuh mhmm ok okay yeah yes yep yup right sure alright "
    "aha ah oh cool nice wow great".split()
)


# Words that ask the bot to stop: they take the floor however briefly they are said.
STOP_WORDS = frozenset("stop wait hold pause quiet".split())


FUNCTION_WORDS = frozenset(
    "a an the and or but of to in on at for with by from as is are was were be been it its "
    "this that these those he she they we you i me my your his her their our us them there "
    "what who how why when where which do does did so not no".split()
)


def words_of(text: str) -> list[str]:
    """Lowercase words without punctuation; "uh-huh" and "M-H-M" become one word each."""
    text = re.sub(r"(?<=\w)-(?=\w)", "", text.lower())
    return re.findall(r"[a-z0-9']+", text)


class Floor:
    """Who holds the conversational floor, read from the turn frames both ways.

    A reply that is playing holds it to its last audio (``BotVoice.reply_playing``),
    even where pipecat reports the bot stopped speaking in a gap of its voice.
    """

    def __init__(self, *, bot_voice: BotVoice | None = None):
        self._bot_voice = bot_voice
        self._has_it = False  # thinking or speaking
        self._speaking = False

    @property
    def bot_has_it(self) -> bool:
        return self._has_it or self._reply_playing()

    @property
    def bot_speaking(self) -> bool:
        return self._speaking or self._reply_playing()

    def _reply_playing(self) -> bool:
        return self._bot_voice is not None and self._bot_voice.reply_playing

    def update(self, frame: Frame) -> None:
        if isinstance(frame, UserStoppedSpeakingFrame):
            self._has_it = True
        elif isinstance(frame, BotStartedSpeakingFrame):
            self._has_it = self._speaking = True
        elif isinstance(frame, (UserStartedSpeakingFrame, BotStoppedSpeakingFrame)):
            self._has_it = self._speaking = False


def _said_by_bot(word: str, bot_words: set[str]) -> bool:
    # Long words come back misheard: "dragons" for "dragon", "classification" for "classic".
    if word in bot_words:
        return True
    if len(word) < 5:
        return False
    return any(w[:5] == word[:5] for w in bot_words) or bool(
        difflib.get_close_matches(word, bot_words, n=1, cutoff=0.7)
    )


def floor_words(
    text: str, *, bot_words: set[str], backchannels: frozenset[str] = BACKCHANNELS, loud: bool = False
) -> list[str]:
    """The words that claim the floor: none when it is a backchannel or the bot's own echo.

    An echo is heard imperfectly ("brave" as "brain"), so a transcript counts as
    echo when at least half of its content words are words the bot just said.
    Speech ``loud``er than the bot's echo could be is the user's own, and a
    user's words sound like the bot's often enough ("sorry" like "story") that
    only a transcript made wholly of the bot's exact words is taken for echo.
    Function words ("the", "with") are in every sentence: alone they claim nothing.
    """
    words = [w for w in words_of(text) if w not in backchannels]
    content = [w for w in words if w not in FUNCTION_WORDS]
    if loud:
        echo = all(w in bot_words for w in content)
    else:
        echo = len([w for w in content if _said_by_bot(w, bot_words)]) >= len(content) / 2
    if not content or echo:
        return []
    return words


class BargeInUserTurnStartStrategy(BaseUserTurnStartStrategy):
    """Starts the user turn on speech when the floor is free, on real words when the bot has it."""

    def __init__(
        self,
        *,
        bot_voice: BotVoice,
        min_words: int = 1,
        min_secs: float = 0.6,
        vad_start_secs: float = 0.2,
        backchannels: frozenset[str] = BACKCHANNELS,
        pause_playback: bool = True,
        resume_after_secs: float = 0.5,
        max_pause_secs: float = 2.0,
        echo_gate: float = 0.5,
        vad: OnsetSileroVADAnalyzer | None = None,
        **kwargs,
    ):
        """Initialize the strategy.

        Args:
            bot_voice: What the bot said lately, to recognize its echo.
            min_words: Floor-claiming words needed to interrupt the bot.
            min_secs: Speech needed to interrupt the bot while it speaks, from its onset.
            vad_start_secs: The VAD's start delay: speech began this long before it reports.
            backchannels: Words that acknowledge without taking the floor.
            pause_playback: Hold the bot's audio from the moment the user's speech is
                heard until its words decide, instead of talking over the user meanwhile.
            resume_after_secs: After the user's speech ends without claiming the
                floor, play on this much later (a final transcript that claims
                nothing resumes at once).
            max_pause_secs: Play on after this long paused, whatever happens.
            echo_gate: Speech no louder than this share of the bot's playback may be
                its echo: it does not pause the bot (0 pauses on any speech).
            vad: The session's VAD analyzer, read for speech that may be starting:
                a reply about to start waits from then, not from the start event.
            **kwargs: Passed to ``BaseUserTurnStartStrategy``.
        """
        super().__init__(**kwargs)
        self._bot_voice = bot_voice
        self._min_words = min_words
        self._backchannels = backchannels
        self._min_secs = min_secs
        self._vad_start_secs = vad_start_secs
        self._floor = Floor(bot_voice=bot_voice)
        self._in_turn = False
        self._speech_onset: float | None = None
        self._last_speech_secs = 0.0
        self._pause_playback = pause_playback
        self._resume_after_secs = resume_after_secs
        self._max_pause_secs = max_pause_secs
        self._echo_gate = echo_gate
        self._vad = vad
        self._paused = False
        self._held_at_onset = False  # a reply about to start waits: speech may be starting
        self._loud = False  # the speech is louder than the bot's echo could be
        self._echo_level = False  # the speech began over the bot's voice no louder than its echo
        self._mic_peaks: deque[tuple[float, float]] = deque(maxlen=50)
        self._previous_interim: set[str] = set()

    async def handle_user_turn_started(self):
        await super().handle_user_turn_started()
        self._in_turn = True
        self._paused = self._held_at_onset = False  # the interruption that comes with the turn ends the pause
        self._floor.update(UserStartedSpeakingFrame())

    async def handle_user_turn_stopped(self):
        await super().handle_user_turn_stopped()
        self._in_turn = False
        # The aggregator emits this frame itself, so its strategies never see it go by.
        self._floor.update(UserStoppedSpeakingFrame())

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        self._floor.update(frame)
        if isinstance(frame, InputAudioRawFrame):
            self._mic_peaks.append((time.monotonic(), pcm_peak(frame.audio)))
            await self._hold_at_onset()
        elif isinstance(frame, VADUserStoppedSpeakingFrame) and self._speech_onset is not None:
            self._last_speech_secs = time.monotonic() - frame.stop_secs - self._speech_onset
            self._speech_onset = None
            await self._resume(after_secs=self._resume_after_secs)
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._speech_onset = time.monotonic() - self._vad_start_secs
            if self._held_at_onset:
                self._held_at_onset, self._paused = False, True  # the speech's pause now: the VAD stop ends it
            self._previous_interim = set()
            self._echo_level = False
            if not self._floor.bot_has_it:
                await self.trigger_user_turn_started()
                return ProcessFrameResult.STOP
            await self._maybe_pause()
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._paused = False
        elif isinstance(frame, (InterimTranscriptionFrame, TranscriptionFrame)) and not self._in_turn:
            return await self._handle_words(frame)
        return ProcessFrameResult.CONTINUE

    async def _hold_at_onset(self):
        """Hold a reply about to start from the first frame of speech, and let it go if that was all.

        A reply held for the statement wait (0.8 s after the speech) met a user going on
        after a 0.6 s pause, whom the VAD reported 0.806 s after the speech: 6 ms of the
        reply had already left.
        """
        if self._vad is None or not (self._pause_playback and self._enable_interruptions):
            return
        if self._held_at_onset and self._vad.state == VADState.QUIET:
            self._held_at_onset = False
            logger.debug(f"{self}: too short for speech: the reply may start")
            await self.push_frame(ResumePlaybackFrame(after_secs=0))
        elif (
            self._vad.state == VADState.STARTING
            and not self._held_at_onset
            and self._speech_onset is None
            and self._floor.bot_has_it
            and not self._floor.bot_speaking
        ):
            self._held_at_onset = True
            logger.debug(f"{self}: speech may be starting: the reply about to start waits")
            await self.push_frame(PausePlaybackFrame(max_secs=self._max_pause_secs))

    async def _maybe_pause(self):
        """Stop talking over the user, or hold a reply about to start, while their words are heard out.

        A user who goes on after a pause mid-sentence is heard before the words say
        so; a reply that started meanwhile would be cut after its first words.
        """
        horizon = time.monotonic() - 0.3
        mic_peak = max((p for t, p in self._mic_peaks if t >= horizon), default=0.0)
        maybe_echo = self._bot_voice.could_be_echo(mic_peak, gate=self._echo_gate)
        self._loud = self._echo_gate > 0 and not maybe_echo
        self._echo_level = self._echo_gate > 0 and maybe_echo
        if not (self._pause_playback and self._enable_interruptions):
            return
        if maybe_echo:
            logger.debug(f"{self}: speech at {mic_peak:.2f} may be the bot's echo: playing on")
            return
        logger.debug(f"{self}: pausing playback while the user's words are heard")
        self._paused = True
        await self.push_frame(PausePlaybackFrame(max_secs=self._max_pause_secs))

    async def _resume(self, *, after_secs: float):
        if self._paused:
            logger.debug(f"{self}: not a barge-in: resuming playback in {after_secs}s")
            await self.push_frame(ResumePlaybackFrame(after_secs=after_secs))
            if after_secs == 0:
                self._paused = False

    def _speech_secs(self) -> float:
        """How long the user has been talking (or talked, once the VAD stopped)."""
        if self._speech_onset is not None:
            return time.monotonic() - self._speech_onset
        return self._last_speech_secs

    async def _handle_words(self, frame: InterimTranscriptionFrame | TranscriptionFrame) -> ProcessFrameResult:
        text = frame.text
        if isinstance(frame, InterimTranscriptionFrame):
            heard = words_of(text)
            text = " ".join(w for w in heard if w in self._previous_interim)
            self._previous_interim = set(heard)
        # Speech that began over the bot no louder than its echo is the echo, however Whisper
        # garbles it, also when its transcript comes after the reply has ended.
        claimed = [] if self._echo_level else floor_words(
            text, bot_words=self._bot_voice.words(), backchannels=self._backchannels, loud=self._loud
        )
        speech_secs = self._speech_secs()
        if isinstance(frame, TranscriptionFrame) and self._speech_onset is not None:
            # A final transcript is of the speech that ended, heard while the user goes on.
            speech_secs += self._last_speech_secs
        # While the bot is only thinking, nothing it says can be drowned out: words decide.
        long_enough = (
            not self._floor.bot_speaking or speech_secs >= self._min_secs or not STOP_WORDS.isdisjoint(claimed)
        )
        if len(claimed) >= self._min_words and long_enough:
            logger.debug(f"{self}: barge-in on {claimed} in {frame.text!r}")
            await self.trigger_user_turn_started()
            return ProcessFrameResult.STOP
        if isinstance(frame, TranscriptionFrame):
            # A backchannel or an echo: keep it out of the next user message.
            logger.debug(f"{self}: not a turn: {frame.text!r}")
            await self.trigger_reset_aggregation()
            if self._speech_onset is None:  # else the user is still talking: the VAD stop resumes
                await self._resume(after_secs=0)
        return ProcessFrameResult.CONTINUE
