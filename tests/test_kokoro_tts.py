"""KokoroTTSService on the real Kokoro-82M, and its pure helpers."""

import asyncio

import jiwer
import numpy as np
import pytest
import soxr

from pipecat.frames.frames import (
    ErrorFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import run_test

from processors.kokoro_tts import KOKORO_SAMPLE_RATE, KokoroTTSService, trim_leading_silence, word_times
from tests.conftest import SLOW_FACTOR
from tests.live_pipeline import running
from tests.slow_synthesis import slowed
from transports.scripted import BotRecording, ScriptedTransport

SENTENCE = "The weather today is sunny and warm."
# Quieter than this (about -50 dBFS, as the scripted transport judges it) is silence.
SILENCE_LEVEL = 100


def _normalize(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


async def _speak(
    models, text: str, *, voice: str = "jf_alpha", sample_rate: int = 24000, peak_limit: float = 0.95, **kwargs
):
    """Run one TTSSpeakFrame through the service; (int16 audio, audio frames, all down frames)."""
    tts = KokoroTTSService(
        kokoro=models.kokoro_stream,
        budget=models.budget,
        speed_model=models.synthesis_speed,
        voice=voice,
        peak_limit=peak_limit,
        **kwargs,
    )
    down, up = await run_test(
        tts,
        frames_to_send=[TTSSpeakFrame(text)],
        pipeline_params=PipelineParams(audio_out_sample_rate=sample_rate),
    )
    errors = [f for f in [*down, *up] if isinstance(f, ErrorFrame)]
    assert not errors, [f.error for f in errors]
    frames = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    audio = np.frombuffer(b"".join(f.audio for f in frames), dtype=np.int16)
    return audio, frames, down


def _heard(whisper, audio: np.ndarray, sample_rate: int) -> str:
    samples = audio.astype(np.float32) / 32768
    if sample_rate != 16000:
        samples = soxr.resample(samples, sample_rate, 16000)
    segments, _ = whisper.transcribe(samples, language="en", beam_size=1)
    return " ".join(s.text for s in segments)


def _first_sound(audio: np.ndarray, sample_rate: int) -> float:
    loud = np.flatnonzero(np.abs(audio.astype(np.int32)) > SILENCE_LEVEL)
    assert loud.size, "all silent"
    return loud[0] / sample_rate


async def test_sentence_is_spoken_at_24k_trimmed_and_intelligible(models):
    """Native rate: speech starts at once (leading silence is latency) and says the text."""
    audio, frames, down = await _speak(models, SENTENCE)

    assert frames and {(f.sample_rate, f.num_channels) for f in frames} == {(24000, 1)}
    kinds = [type(f) for f in down]
    assert kinds.index(TTSStartedFrame) < kinds.index(TTSAudioRawFrame)
    assert max(i for i, k in enumerate(kinds) if k is TTSAudioRawFrame) < kinds.index(TTSStoppedFrame)
    assert 1.0 < len(audio) / 24000 < 5.0
    assert np.sqrt(np.mean(audio.astype(np.float64) ** 2)) > 500, "speech should be clearly audible"
    assert _first_sound(audio, 24000) <= 0.03
    heard = _heard(models.whisper, audio, 24000)
    assert jiwer.wer(_normalize(SENTENCE), _normalize(heard)) < 0.25, heard


async def test_sentence_is_resampled_to_16k(models):
    """A 16 kHz output transport gets 16 kHz frames of the same speech, not sped-up audio."""
    audio, frames, _ = await _speak(models, SENTENCE, sample_rate=16000)

    assert frames and {f.sample_rate for f in frames} == {16000}
    native, rate, _ = models.kokoro.create_timed(SENTENCE, "jf_alpha", lang="en-us")
    # Same duration in seconds (less the trimmed leading silence, at most 0.3 s).
    assert 0 <= len(native) / rate - len(audio) / 16000 < 0.3
    assert _first_sound(audio, 16000) <= 0.03
    heard = _heard(models.whisper, audio, 16000)
    assert jiwer.wer(_normalize(SENTENCE), _normalize(heard)) < 0.25, heard


async def test_loud_voice_peaks_are_limited(models):
    """jm_kumo peaks past full scale; the service scales it down to peak_limit, not below."""
    limit = 0.95
    raw, _, _ = models.kokoro.create_timed(SENTENCE, "jm_kumo", lang="en-us")
    assert np.max(np.abs(raw)) > limit, "precondition: this voice really is too loud"

    audio, _, _ = await _speak(models, SENTENCE, voice="jm_kumo", peak_limit=limit)

    peak = np.max(np.abs(audio.astype(np.int32))) / 32767
    assert limit - 0.01 <= peak <= limit + 1 / 32767, peak


async def test_synthesis_slower_than_the_context_timeout_still_plays(models):
    """pipecat drops an audio context that stays quiet for stop_frame_timeout_s (3 s); a long
    sentence or a busy CPU synthesizes slower than that. Shrinking the timeout below one
    sentence's synthesis time shows the service keeps its context alive meanwhile."""
    audio, frames, down = await _speak(models, SENTENCE, stop_frame_timeout_s=0.2)

    assert len(audio) / 24000 > 1.0
    kinds = [type(f) for f in down]
    assert kinds.count(TTSStartedFrame) == kinds.count(TTSStoppedFrame) == 1
    assert kinds.index(TTSStoppedFrame) > max(i for i, k in enumerate(kinds) if k is TTSAudioRawFrame)


async def test_a_reply_queued_behind_a_long_one_keeps_its_context(models):
    """The second of two replies waits while the first is synthesized: longer than pipecat's
    context timeout (shrunk here to 0.2 s). It is still spoken, after the first."""
    tts = KokoroTTSService(
        kokoro=models.kokoro_stream,
        budget=models.budget,
        speed_model=models.synthesis_speed,
        voice="jf_alpha",
        stop_frame_timeout_s=0.2,
    )
    down, _ = await run_test(tts, frames_to_send=[TTSSpeakFrame(SENTENCE), TTSSpeakFrame("And that is all.")])

    kinds = [type(f) for f in down]
    assert kinds.count(TTSStartedFrame) == kinds.count(TTSStoppedFrame) == 2
    second = [i for i, k in enumerate(kinds) if k is TTSStartedFrame][1]
    assert TTSAudioRawFrame in kinds[second:]


def test_unknown_voice_names_the_choices(models):
    """A typo in tts.voice fails at construction with the voices to choose from."""
    with pytest.raises(ValueError) as err:
        KokoroTTSService(
            kokoro=models.kokoro_stream,
            budget=models.budget,
            speed_model=models.synthesis_speed,
            voice="af_nonexistent",
        )
    message = str(err.value)
    assert "af_nonexistent" in message
    assert all(voice in message for voice in models.kokoro.voices), message


# --- trim_leading_silence -------------------------------------------------------------


def _tone(seconds: float, *, amplitude: float = 0.5, sample_rate: int = KOKORO_SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_trim_keeps_10ms_before_the_onset():
    """Silence and sub-threshold hiss before speech go; a 10 ms lead-in stays."""
    rng = np.random.default_rng(0)
    lead = (rng.normal(0, 0.0005, int(0.25 * KOKORO_SAMPLE_RATE))).astype(np.float32)
    speech = _tone(0.5)
    speech[0] = 0.3  # onset exactly at the first sample of the tone
    audio = np.concatenate([lead, speech])

    trimmed = trim_leading_silence(audio, sample_rate=KOKORO_SAMPLE_RATE)

    assert len(trimmed) == len(speech) + int(0.01 * KOKORO_SAMPLE_RATE)
    np.testing.assert_array_equal(trimmed[-len(speech) :], speech)


def test_trim_leaves_immediate_speech_alone_and_empties_silence():
    speech = _tone(0.2)
    speech[0] = 0.3
    assert np.array_equal(trim_leading_silence(speech, sample_rate=KOKORO_SAMPLE_RATE), speech)
    assert trim_leading_silence(np.zeros(2400, np.float32), sample_rate=KOKORO_SAMPLE_RATE).size == 0
    assert trim_leading_silence(np.zeros(0, np.float32), sample_rate=KOKORO_SAMPLE_RATE).size == 0


# --- word_times -----------------------------------------------------------------------


def test_word_times_are_exact_when_the_model_timed_every_word():
    """Each word starts where the model put it, shifted by the audio already played."""
    assert word_times("hello big world", [0.0, 0.42, 0.71], offset=1.5, duration=1.2) == [
        ("hello", pytest.approx(1.5)),
        ("big", pytest.approx(1.92)),
        ("world", pytest.approx(2.21)),
    ]


def test_word_times_spread_by_length_when_counts_differ():
    """'25' is spoken as two words: fall back to spreading words over the audio by length."""
    text = "it costs 25 dollars"

    result = word_times(text, [0.0, 0.2, 0.6, 0.9, 1.2], offset=2.0, duration=2.0)

    assert [w for w, _ in result] == text.split()
    starts = [t for _, t in result]
    # Each word starts after the previous one in proportion to its letters (+1 for the space).
    total = sum(len(w) + 1 for w in text.split())
    assert starts == pytest.approx([2.0, 2.0 + 2.0 * 3 / total, 2.0 + 2.0 * 9 / total, 2.0 + 2.0 * 12 / total])


def test_word_times_without_timings_and_without_words():
    result = word_times("one two", [], offset=0.0, duration=1.0)
    assert [w for w, _ in result] == ["one", "two"]
    assert result[0][1] == 0.0 and 0 < result[1][1] < 1.0
    assert word_times("   ", [], offset=0.0, duration=1.0) == []


async def test_a_sentences_words_are_timed_by_the_model(models):
    """The split model's durations place each word: the last word starts well inside the audio."""
    utterance = models.kokoro_stream.analyze(SENTENCE, voice="jf_alpha")
    assert len(utterance.word_starts) == len(SENTENCE.split())
    assert utterance.word_starts == sorted(utterance.word_starts)
    assert 0.5 * utterance.seconds < utterance.word_starts[-1] < utterance.seconds


# --- streamed, paced playout ----------------------------------------------------------

REPLY = "The ocean covers most of our planet. It is deep, dark and full of strange life."


async def _play(models, text: str | list[str], **kwargs) -> tuple[BotRecording, float]:
    """Speak ``text`` through the service into a real-time scripted speaker.

    A list is one reply streamed as a language model's pieces of text.

    Returns the recording and when the request was made (transport time, s).
    """
    transport = ScriptedTransport(cues=[])
    tts = KokoroTTSService(
        kokoro=models.kokoro_stream,
        budget=models.budget,
        speed_model=models.synthesis_speed,
        voice="jf_alpha",
        **kwargs,
    )
    rec = transport.recording
    async with running(
        [transport.input(), tts, transport.output()], params=PipelineParams(audio_out_sample_rate=24000)
    ) as worker:
        asked = transport.clock.now()
        if isinstance(text, str):
            await worker.queue_frame(TTSSpeakFrame(text))
        else:
            await worker.queue_frames(
                [LLMFullResponseStartFrame(), *(LLMTextFrame(t) for t in text), LLMFullResponseEndFrame()]
            )
        async with asyncio.timeout(120):
            while rec.last_sound is None or transport.clock.now() - rec.last_sound < 1.0:
                await asyncio.sleep(0.05)
    return rec, asked


async def test_the_first_audio_comes_before_the_sentence_is_decoded_and_never_runs_dry(models):
    """Streamed synthesis: the listener hears the reply before a whole-sentence decode would end.

    How much sooner depends on the CPU: at once where synthesis is much faster than
    real time, after the buffer that real time cannot cover where it is not.
    """
    utterance = models.kokoro_stream.analyze(REPLY, voice="jf_alpha")
    whole = models.synthesis_speed.predict(utterance.frames)

    rec, asked = await _play(models, REPLY)

    first = rec.first_sound_after(asked) - asked
    assert first < 0.8 * whole, (first, whole)
    assert [gap for _, gap in rec.holes if gap > 0.15] == [], rec.holes
    played = sum(len(a) for _, a in rec.chunks) / 24000
    assert played == pytest.approx(utterance.seconds, abs=0.1)


async def test_on_a_cpu_slower_than_real_time_a_reply_waits_then_plays_without_a_hole(models, base_config):
    """Synthesis slowed past real time: the reply starts once its buffer covers the rest, then never runs dry."""
    factor = max(SLOW_FACTOR, 2.0 / models.synthesis_speed.real_time_factor)
    slow = slowed(models, factor=factor, voice=base_config.tts.voice)
    assert slow.synthesis_speed.real_time_factor > 1.3
    utterance = models.kokoro_stream.analyze(REPLY, voice="jf_alpha")

    rec, asked = await _play(slow, REPLY, max_buffer_secs=60)

    assert [gap for _, gap in rec.holes if gap > 0.15] == [], rec.holes
    # It waited for a buffer: at least part of what real time could not cover.
    rtf = slow.synthesis_speed.real_time_factor
    assert rec.first_sound_after(asked) - asked > 0.5 * (rtf - 1) * utterance.seconds


def _longest_pause(rec: BotRecording) -> float:
    """The longest silence (s) between the first and the last sound of the recording."""
    timeline = rec.timeline()
    loud = np.abs(timeline.astype(np.int32)) > SILENCE_LEVEL
    edges = np.flatnonzero(np.diff(loud.astype(np.int8)))
    starts, ends = edges[1::2], edges[2::2]  # a silence begins after sound, ends where sound resumes
    return max(((e - s) / 24000 for s, e in zip(starts, ends)), default=0.0)


async def test_sentences_of_a_reply_are_joined_by_the_pause_kokoro_onnx_puts_between_them(models):
    """A quarter second of silence after a sentence's end, as ``Kokoro.create`` joins sentences.

    Sent before the next sentence is made, it is time to make it in; where the CPU is too
    busy to make it in time, the hole that follows is the planner's (measured apart).
    """
    one, two = "The ocean covers most of our planet.", "Whales sing in the deep sea."
    alone = [_longest_pause((await _play(models, [text]))[0]) for text in (one, two)]
    joined, _ = await _play(models, [f"{one} ", two])

    assert max(alone) < 0.2, alone
    pause = _longest_pause(joined) - sum(gap for _, gap in joined.holes)
    assert 0.25 - 0.05 <= pause < 0.25 + 0.2, (_longest_pause(joined), joined.holes)
