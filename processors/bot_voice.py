"""The bot's own voice, as a reference for recognizing its echo in the user's microphone."""

from __future__ import annotations

import time
from collections import deque

from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from processors.audio_level import pcm_peak
from processors.barge_in import words_of


class BotVoice:
    """What the bot said lately and how loud it played; one per session.

    A :class:`PlaybackMonitor` after the output transport adds each word and the
    level of each chunk as they play (a reply can be synthesized long before), and
    the STT and the barge-in strategy read them.
    """

    def __init__(self, *, window_secs: float = 30.0):
        """Initialize the reference.

        Args:
            window_secs: How long words are remembered after they were played.
        """
        self._window = window_secs
        self._words: deque[tuple[float, list[str]]] = deque()
        self._levels: deque[tuple[float, float]] = deque(maxlen=200)
        # From a reply's first audio played to its last: the bot holds the floor
        # throughout, across any gap in its voice.
        self.reply_playing = False

    def add_text(self, text: str) -> None:
        self._words.append((time.monotonic(), words_of(text)))

    def words(self) -> set[str]:
        horizon = time.monotonic() - self._window
        while self._words and self._words[0][0] < horizon:
            self._words.popleft()
        return {w for _, ws in self._words for w in ws}

    def add_playback(self, peak: float) -> None:
        self._levels.append((time.monotonic(), peak))

    def playback_peak(self, *, within_secs: float) -> float:
        """The loudest the bot played lately (0..1 of full scale)."""
        horizon = time.monotonic() - within_secs
        return max((p for t, p in self._levels if t >= horizon), default=0.0)

    def could_be_echo(self, mic_peak: float, *, gate: float) -> bool:
        """Whether the microphone at ``mic_peak`` may be only the bot's voice coming back.

        The Geigel double-talk test: an echo is quieter than what was played by
        the room's loss, so speech louder than ``gate`` times the bot's recent
        peak is the user's. ``gate`` 0 disables the test.
        """
        return gate > 0 and mic_peak < gate * self.playback_peak(within_secs=0.5)


class PlaybackMonitor(FrameProcessor):
    """Notes the level of every audio chunk the output transport has played, and the reply's span.

    The output transport pushes each chunk on once it has been sent at playback
    pace, and the TTS start and stop frames in order with the audio, so this is
    the bot's voice as the user's speaker plays it. pipecat reports the bot
    stopped speaking after a few seconds without audio; a reply whose synthesis
    fell behind still has the floor until its stop frame has played.
    """

    def __init__(self, *, bot_voice: BotVoice, **kwargs):
        super().__init__(**kwargs)
        self._bot_voice = bot_voice
        self._reply_open = False

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputAudioRawFrame) and frame.audio:
            self._bot_voice.add_playback(pcm_peak(frame.audio))
            self._bot_voice.reply_playing = self._reply_open
        elif isinstance(frame, TTSTextFrame):
            self._bot_voice.add_text(frame.text)  # passed on by the output as its audio plays
        elif isinstance(frame, TTSStartedFrame):
            self._reply_open = True
        elif isinstance(frame, (TTSStoppedFrame, InterruptionFrame, EndFrame, CancelFrame)):
            self._reply_open = self._bot_voice.reply_playing = False
        await self.push_frame(frame, direction)
