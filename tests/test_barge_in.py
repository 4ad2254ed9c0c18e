"""The barge-in strategy's decisions, fed the frames the user aggregator would give it."""

import numpy as np

from pipecat.audio.vad.vad_analyzer import VADParams, VADState
from pipecat.audio.vad.vad_controller import VADController
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)

from processors.barge_in import BargeInUserTurnStartStrategy, floor_words
from processors.bot_voice import BotVoice
from processors.kokoro_tts import trim_leading_silence
from processors.speech_onset import OnsetSileroVADAnalyzer
from tests.conftest import silence
from transports.playback_gate import PausePlaybackFrame, ResumePlaybackFrame

BOT_SAID = "The story of a brave little dragon is actually a classic."


def test_backchannels_and_function_words_claim_nothing():
    bot = set(BOT_SAID.lower().replace(".", "").split())
    assert floor_words("Mm-hmm, yeah, right.", bot_words=bot) == []
    assert floor_words("and the", bot_words=bot) == []
    assert floor_words("What time is it?", bot_words=bot) == ["what", "time", "is", "it"]


def test_loud_speech_is_echo_only_when_every_word_is_the_bots():
    bot = set(BOT_SAID.lower().replace(".", "").split())
    # "sorry" is a near miss of "story": quiet speech like this is taken for the echo...
    assert floor_words("Sorry, actually.", bot_words=bot) == []
    # ...but speech louder than the echo could be is the user's.
    assert floor_words("Sorry, actually.", bot_words=bot, loud=True) == ["sorry", "actually"]
    assert floor_words("a brave little dragon", bot_words=bot, loud=True) == []


class Strategy:
    """A strategy with its turn starts and pushed frames recorded."""

    def __init__(self, *, bot_peak: float = 0.3, vad: OnsetSileroVADAnalyzer | None = None):
        self.voice = BotVoice()
        self.voice.add_text(BOT_SAID)
        self.voice.add_playback(bot_peak)
        self.strategy = BargeInUserTurnStartStrategy(bot_voice=self.voice, min_secs=0.0, vad=vad)
        self.started = 0
        self.pushed = []

        async def on_started(strategy, params):
            self.started += 1

        async def on_push(strategy, frame, direction):
            self.pushed.append(frame)

        self.strategy.add_event_handler("on_user_turn_started", on_started)
        self.strategy.add_event_handler("on_push_frame", on_push)

    async def feed(self, *frames):
        for frame in frames:
            await self.strategy.process_frame(frame)

    async def user_speaks_over_the_bot(self, *, level: float):
        samples = np.full(320, int(level * 32767), np.int16).tobytes()
        await self.feed(
            BotStartedSpeakingFrame(),
            InputAudioRawFrame(audio=samples, sample_rate=16000, num_channels=1),
            VADUserStartedSpeakingFrame(start_secs=0.1),
        )


async def hear(s: Strategy, vad: OnsetSileroVADAnalyzer, audio: np.ndarray) -> list[VADState]:
    """Feed audio as the user aggregator does: pipecat's VAD controller first, its events, then the frame.

    Returns the VAD's state at each frame the strategy pushed on an audio frame (not on a VAD event).
    """
    controller = VADController(vad)

    @controller.event_handler("on_speech_started")
    async def started(_):
        await s.feed(VADUserStartedSpeakingFrame(start_secs=0.2))

    @controller.event_handler("on_speech_stopped")
    async def stopped(_):
        await s.feed(VADUserStoppedSpeakingFrame(stop_secs=0.2))

    at_push = []
    for i in range(0, len(audio), 320):
        frame = InputAudioRawFrame(audio=audio[i : i + 320].tobytes(), sample_rate=16000, num_channels=1)
        await controller.process_frame(frame)
        pushed = len(s.pushed)
        await s.feed(frame)
        at_push += [vad.state] * (len(s.pushed) - pushed)
    return at_push


def spoken(speaker, text: str, *, secs: float | None = None) -> np.ndarray:
    """``text`` spoken from its first sound (for ``secs``, or all of it), with room before and after."""
    words = trim_leading_silence(speaker(text) / 32767, sample_rate=16000)
    words = words if secs is None else words[: int(secs * 16000)]
    return np.concatenate([silence(0.3), (words * 32767).astype(np.int16), silence(0.6)])


def onset_vad() -> OnsetSileroVADAnalyzer:
    vad = OnsetSileroVADAnalyzer(params=VADParams(start_secs=0.2))
    vad.set_sample_rate(16000)
    return vad


async def test_a_reply_about_to_start_waits_from_the_first_frame_of_speech(speaker):
    """The user goes on after a pause while the bot thinks: the reply waits before the VAD's start event."""
    vad = onset_vad()
    s = Strategy(vad=vad)
    await s.strategy.handle_user_turn_stopped()  # the bot has the floor: it is thinking
    states = await hear(s, vad, spoken(speaker, "a table for two"))
    assert isinstance(s.pushed[0], PausePlaybackFrame)
    assert states == [VADState.STARTING]  # pushed on an audio frame before pipecat reported the speech
    # The speech's own pause follows, and the VAD's stop ends it: no resume at the onset's end.
    assert [type(f) for f in s.pushed[1:]] == [PausePlaybackFrame, ResumePlaybackFrame]
    assert s.pushed[-1].after_secs > 0


async def test_a_blip_too_short_to_be_speech_lets_the_reply_go_at_once(speaker):
    vad = onset_vad()
    s = Strategy(vad=vad)
    await s.strategy.handle_user_turn_stopped()
    # A quarter of a second of "Yes." is heard as speech starting, too short to be speech.
    states = await hear(s, vad, spoken(speaker, "Yes.", secs=0.25))
    assert [type(f) for f in s.pushed] == [PausePlaybackFrame, ResumePlaybackFrame]
    assert s.pushed[1].after_secs == 0 and states == [VADState.STARTING, VADState.QUIET]
    assert s.started == 0


async def test_speech_starting_over_the_bots_voice_waits_for_the_vad_and_the_echo_check(speaker):
    """Its echo starts the VAD too: over the bot's voice only speech louder than the echo pauses it."""
    vad = onset_vad()
    s = Strategy(bot_peak=0.9, vad=vad)
    await s.feed(BotStartedSpeakingFrame())
    await hear(s, vad, (spoken(speaker, "a table for two") * 0.2).astype(np.int16))
    assert s.pushed == []


def interim(text: str) -> InterimTranscriptionFrame:
    return InterimTranscriptionFrame(text, "user", "now")


async def test_speech_over_the_bot_pauses_it_and_a_backchannel_resumes_it():
    s = Strategy()
    await s.user_speaks_over_the_bot(level=0.5)
    assert [type(f) for f in s.pushed] == [PausePlaybackFrame]

    await s.feed(VADUserStoppedSpeakingFrame(stop_secs=0.2))
    await s.feed(TranscriptionFrame("Mhm, okay.", "user", "now"))
    assert s.started == 0
    resumes = [f for f in s.pushed if isinstance(f, ResumePlaybackFrame)]
    assert resumes[-1].after_secs == 0  # the final transcript says: play on now


async def test_speech_no_louder_than_the_echo_does_not_pause():
    s = Strategy(bot_peak=0.9)
    await s.user_speaks_over_the_bot(level=0.2)
    assert s.pushed == []


async def test_speech_begun_at_echo_level_is_no_turn_even_once_the_bot_has_stopped():
    """The tail of the bot's echo, transcribed after its reply ended, garbled past recognition."""
    s = Strategy(bot_peak=0.9)
    await s.user_speaks_over_the_bot(level=0.2)
    await s.feed(BotStoppedSpeakingFrame(), VADUserStoppedSpeakingFrame(stop_secs=0.2))
    await s.feed(TranscriptionFrame("Father Shulie, father.", "user", "now"))
    assert s.started == 0
    # The same words spoken up, over the bot, take the floor.
    await s.user_speaks_over_the_bot(level=0.8)
    await s.feed(VADUserStoppedSpeakingFrame(stop_secs=0.2), TranscriptionFrame("Father Shulie, father.", "user", "now"))
    assert s.started == 1


async def test_an_interim_word_counts_once_two_passes_agree_on_it():
    s = Strategy()
    await s.user_speaks_over_the_bot(level=0.5)
    # A half-heard "yeah, right" comes out as a word nobody said; the next pass disagrees.
    await s.feed(interim("Yehirite"), interim("Yeah, right"))
    assert s.started == 0
    await s.feed(interim("What time"), interim("What time is it"))
    assert s.started == 1


async def test_a_gap_in_the_bots_voice_does_not_hand_the_floor_to_a_backchannel():
    """pipecat reports the bot stopped in a gap of its voice; the reply still playing keeps the floor."""
    s = Strategy()
    s.voice.reply_playing = True
    await s.feed(BotStartedSpeakingFrame(), BotStoppedSpeakingFrame())
    await s.feed(VADUserStartedSpeakingFrame(start_secs=0.1), VADUserStoppedSpeakingFrame(stop_secs=0.2))
    await s.feed(TranscriptionFrame("Mhm.", "user", "now"))
    assert s.started == 0

    # Once the reply is over, the same speech takes the floor at once.
    s.voice.reply_playing = False
    await s.feed(VADUserStartedSpeakingFrame(start_secs=0.1))
    assert s.started == 1


async def test_a_final_transcript_heard_while_the_user_goes_on_counts_all_their_speech(monkeypatch):
    """"Sorry, actually, what time is it?": the first segment's transcript lands as the second begins.

    Measured by the new segment alone it is too short to be a barge-in; it is the
    speech that ended (and the user is still talking), so it stops the bot.
    """
    clock = [100.0]
    monkeypatch.setattr("processors.barge_in.time.monotonic", lambda: clock[0])
    s = Strategy()
    s.strategy._min_secs = 0.6
    await s.user_speaks_over_the_bot(level=0.5)
    clock[0] += 0.9
    await s.feed(VADUserStoppedSpeakingFrame(stop_secs=0.2))  # "Sorry, actually," was 0.8 s
    clock[0] += 0.1
    await s.feed(VADUserStartedSpeakingFrame(start_secs=0.1))  # "what time is it?" begins
    clock[0] += 0.1
    await s.feed(TranscriptionFrame("Sorry, actually.", "user", "now"))
    assert s.started == 1


async def test_a_backchannel_transcript_does_not_resume_the_bot_while_the_user_talks_on():
    s = Strategy()
    await s.user_speaks_over_the_bot(level=0.5)
    await s.feed(VADUserStoppedSpeakingFrame(stop_secs=0.2), VADUserStartedSpeakingFrame(start_secs=0.1))
    await s.feed(TranscriptionFrame("Mhm.", "user", "now"))
    assert s.started == 0
    assert not any(isinstance(f, ResumePlaybackFrame) and f.after_secs == 0 for f in s.pushed)


async def test_stop_takes_the_floor_however_briefly_it_is_said(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("processors.barge_in.time.monotonic", lambda: clock[0])
    s = Strategy()
    s.strategy._min_secs = 0.6
    await s.user_speaks_over_the_bot(level=0.5)
    clock[0] += 0.4
    await s.feed(VADUserStoppedSpeakingFrame(stop_secs=0.2))  # 0.3 s of speech
    await s.feed(TranscriptionFrame("Time.", "user", "now"))
    assert s.started == 0  # a short word that could be a misheard hum
    await s.user_speaks_over_the_bot(level=0.5)
    clock[0] += 0.4
    await s.feed(VADUserStoppedSpeakingFrame(stop_secs=0.2))
    await s.feed(TranscriptionFrame("Wait, stop.", "user", "now"))
    assert s.started == 1
