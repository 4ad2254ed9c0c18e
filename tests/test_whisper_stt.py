"""WhisperSTTService on the real bundled Whisper tiny.en, driven like the pipeline drives it."""

import asyncio
import time

import jiwer
import numpy as np
import pytest

from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import run_test

from bot.pipeline import build_stt
from processors.bot_voice import BotVoice
from processors.whisper_stt import WhisperSTTService
from tests.conftest import silence
from tests.live_pipeline import running

SENTENCE = "The quick brown fox jumps over the lazy dog."
FRAME_SECS = 0.02
# Silero confirms speech this long after it starts and silence this long after it ends
# (config vad.start_secs / vad.stop_secs): the service must cope with both delays.
VAD_START_DELAY = 0.2
VAD_STOP_DELAY = 0.2


def _normalize(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def _vad_frames(audio: np.ndarray, *, sample_rate: int, speech: tuple[float, float]) -> list:
    """20 ms input frames with the VAD events where Silero would send them."""
    step = int(sample_rate * FRAME_SECS)
    start = int((speech[0] + VAD_START_DELAY) * sample_rate) // step * step
    stop = int((speech[1] + VAD_STOP_DELAY) * sample_rate) // step * step
    frames = []
    for i in range(0, min(len(audio), stop), step):
        if i == start:
            frames.append(VADUserStartedSpeakingFrame(start_secs=VAD_START_DELAY))
        frames.append(
            InputAudioRawFrame(audio=audio[i : i + step].tobytes(), sample_rate=sample_rate, num_channels=1)
        )
    frames.append(VADUserStoppedSpeakingFrame(stop_secs=VAD_STOP_DELAY))
    return frames


async def _transcribe(stt, audio: np.ndarray, *, sample_rate: int, speech: tuple[float, float]):
    down, up = await run_test(
        stt,
        frames_to_send=_vad_frames(audio, sample_rate=sample_rate, speech=speech),
        pipeline_params=PipelineParams(audio_in_sample_rate=sample_rate),
    )
    errors = [f for f in [*down, *up] if isinstance(f, ErrorFrame)]
    assert not errors, [f.error for f in errors]
    return [f for f in down if isinstance(f, TranscriptionFrame)]


def _utterance(speech: np.ndarray, *, sample_rate: int) -> tuple[np.ndarray, tuple[float, float]]:
    lead = silence(0.3, sample_rate=sample_rate)
    audio = np.concatenate([lead, speech, silence(0.4, sample_rate=sample_rate)])
    return audio, (len(lead) / sample_rate, (len(lead) + len(speech)) / sample_rate)


async def test_spoken_sentence_is_transcribed_exactly(base_config, models, speaker):
    """The pipeline's STT hears a whole sentence, first word included (VAD fires 0.2 s late)."""
    audio, speech = _utterance(speaker(SENTENCE), sample_rate=16000)
    stt = build_stt(base_config, models, bot_voice=BotVoice())

    frames = await _transcribe(stt, audio, sample_rate=16000, speech=speech)

    assert len(frames) == 1, frames
    assert jiwer.wer(_normalize(SENTENCE), _normalize(frames[0].text)) == 0, frames[0].text
    assert frames[0].language == "en"
    assert frames[0].finalized


async def test_8khz_input_is_resampled_and_transcribed(base_config, models, speaker):
    """Phone audio arrives at 8 kHz; Whisper only understands 16 kHz."""
    audio, speech = _utterance(speaker(SENTENCE, sample_rate=8000), sample_rate=8000)
    stt = build_stt(base_config, models, bot_voice=BotVoice())

    frames = await _transcribe(stt, audio, sample_rate=8000, speech=speech)

    assert len(frames) == 1, frames
    assert jiwer.wer(_normalize(SENTENCE), _normalize(frames[0].text)) == 0, frames[0].text


@pytest.mark.parametrize("kind", ["silence", "noise"])
async def test_no_speech_yields_no_transcription(base_config, models, kind):
    """A false VAD trigger on silence or hiss must not become a hallucinated user turn."""
    rng = np.random.default_rng(7)
    seconds = 1.5
    if kind == "silence":
        audio = silence(seconds)
    else:  # broadband hiss at about -30 dBFS
        audio = np.clip(rng.normal(0, 1000, int(seconds * 16000)), -32768, 32767).astype(np.int16)
    stt = build_stt(base_config, models, bot_voice=BotVoice())

    frames = await _transcribe(stt, audio, sample_rate=16000, speech=(0.1, seconds - 0.3))

    assert frames == []


async def test_detected_language_is_reported_when_none_is_configured(models, speaker):
    """stt.language: null lets Whisper detect it; the transcript should carry what it found."""
    audio, speech = _utterance(speaker(SENTENCE), sample_rate=16000)
    stt = WhisperSTTService(model=models.whisper, language=None, trailing_silence_secs=0.1)

    frames = await _transcribe(stt, audio, sample_rate=16000, speech=speech)

    assert len(frames) == 1, frames
    assert frames[0].language == "en"


class _Transcripts(FrameProcessor):
    def __init__(self):
        super().__init__()
        self.frames: list[TranscriptionFrame] = []
        self.vad_stopped_at = 0.0

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame):
            self.frames.append(frame)
        await self.push_frame(frame, direction)


async def _transcribe_live(stt, audio: np.ndarray, *, sample_rate: int, speech: tuple[float, float]):
    """Like :func:`_transcribe`, with the frames coming at the pace a microphone sends them."""
    transcripts = _Transcripts()
    async with running([stt, transcripts], params=PipelineParams(audio_in_sample_rate=sample_rate)) as worker:
        t0 = time.monotonic()
        fed = 0.0
        for frame in _vad_frames(audio, sample_rate=sample_rate, speech=speech):
            if isinstance(frame, VADUserStoppedSpeakingFrame):
                transcripts.vad_stopped_at = time.monotonic()
            await worker.queue_frame(frame)
            if isinstance(frame, InputAudioRawFrame):
                fed += len(frame.audio) / 2 / sample_rate
                await asyncio.sleep(max(0.0, t0 + fed - time.monotonic()))
        for _ in range(100):
            if transcripts.frames:
                break
            await asyncio.sleep(0.05)
    return transcripts


def _count_passes(stt) -> list[float]:
    """Spy on the service's transcription passes: when each one started."""
    heard: list[float] = []
    transcribe = stt._transcribe

    def counting(samples):
        heard.append(time.monotonic())
        return transcribe(samples)

    stt._transcribe = counting
    return heard


async def test_a_turn_is_transcribed_while_the_vad_confirms_its_end(base_config, models, speaker):
    """The quiet after the speech starts the last transcription: the VAD's stop only collects it."""
    audio, speech = _utterance(speaker(SENTENCE), sample_rate=16000)
    stt = build_stt(base_config, models, bot_voice=BotVoice())
    passes = _count_passes(stt)

    heard = await _transcribe_live(stt, audio, sample_rate=16000, speech=speech)

    assert passes[-1] < heard.vad_stopped_at, "the last pass started before the VAD stopped"
    [frame] = heard.frames
    assert jiwer.wer(_normalize(SENTENCE), _normalize(frame.text)) == 0, frame.text


async def test_speech_after_a_short_pause_discards_the_early_transcript(base_config, models, speaker):
    """A pause shorter than the VAD's stop starts a transcription; the words after it must count."""
    first, rest = "I would like to book", "a table for two."
    pause = silence(0.15, sample_rate=16000)
    audio, speech = _utterance(np.concatenate([speaker(first), pause, speaker(rest)]), sample_rate=16000)
    stt = build_stt(base_config, models, bot_voice=BotVoice())
    passes = _count_passes(stt)

    heard = await _transcribe_live(stt, audio, sample_rate=16000, speech=speech)

    assert len(passes) >= 2, passes  # the early one, then the whole turn
    [frame] = heard.frames
    assert _normalize(frame.text).endswith("table for two"), frame.text
