"""The measuring instruments: BotRecording's helpers and speech_segments, on synthetic signals.

Voice-to-voice latency is read off these, so they must be exact to the sample.
"""

import numpy as np
import pytest

from bot.conversation import speech_segments
from transports.scripted import BotRecording

SR = 24000


def loud(seconds: float, *, sample_rate: int = SR, level: int = 5000) -> np.ndarray:
    """A square wave: every sample is loud, so onsets and ends are sample-exact."""
    n = int(round(seconds * sample_rate))
    return np.where((np.arange(n) // 12) % 2, level, -level).astype(np.int16)


def quiet(seconds: float, *, sample_rate: int = SR) -> np.ndarray:
    return np.zeros(int(round(seconds * sample_rate)), dtype=np.int16)


def tone(seconds: float, freq: float, *, sample_rate: int = SR, level: int = 8000) -> np.ndarray:
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (level * np.sin(2 * np.pi * freq * t)).astype(np.int16)


@pytest.fixture
def recording() -> BotRecording:
    """Two replies: at 0.0 s (50 ms silence, then 50 ms sound) and at 1.0 s (20 ms, then 100 ms)."""
    rec = BotRecording(sample_rate=SR)
    rec.add(0.0, np.concatenate([quiet(0.05), loud(0.05)]))
    rec.add(1.0, np.concatenate([quiet(0.02), loud(0.1)]))
    return rec


def test_add_tracks_the_end_of_the_last_sound(recording):
    assert recording.last_sound == pytest.approx(1.12)
    recording.add(1.12, quiet(0.2))  # trailing silence does not move it
    assert recording.last_sound == pytest.approx(1.12)


def test_timeline_places_chunks_at_their_start_times(recording):
    line = recording.timeline()

    assert len(line) == int(1.12 * SR) + 1
    assert np.all(line[: int(0.05 * SR)] == 0)
    np.testing.assert_array_equal(line[int(0.05 * SR) : int(0.1 * SR)], loud(0.05))
    assert np.all(line[int(0.1 * SR) : int(1.02 * SR)] == 0)
    np.testing.assert_array_equal(line[int(1.02 * SR) : int(1.12 * SR)], loud(0.1))
    longer = recording.timeline(duration=2.0)
    assert len(longer) == 2 * SR + 1 and np.all(longer[len(line) :] == 0)


def test_timeline_mixes_overlapping_chunks_without_wrapping():
    rec = BotRecording(sample_rate=SR)
    rec.add(0.0, np.full(100, 30000, np.int16))
    rec.add(50 / SR, np.full(100, 30000, np.int16))
    line = rec.timeline()
    assert line[25] == 30000 and line[75] == 32767 and line[125] == 30000


def test_first_sound_after(recording):
    assert recording.first_sound_after(0.0) == pytest.approx(0.05)
    assert recording.first_sound_after(0.07) == pytest.approx(0.07, abs=1 / SR)
    assert recording.first_sound_after(0.1) == pytest.approx(1.02)
    assert recording.first_sound_after(0.5) == pytest.approx(1.02)
    assert recording.first_sound_after(1.2) is None


def test_first_sound_after_ignores_quiet_hiss():
    """Below about -50 dBFS is silence to the listener, not the start of the reply."""
    rec = BotRecording(sample_rate=SR)
    hiss = np.random.default_rng(0).integers(-90, 90, SR // 10).astype(np.int16)
    rec.add(0.0, np.concatenate([hiss, loud(0.05)]))
    assert rec.first_sound_after(0.0) == pytest.approx(0.1)


def test_last_sound_between(recording):
    assert recording.last_sound_between(0.0, 0.5) == pytest.approx(0.1)
    assert recording.last_sound_between(0.0, 2.0) == pytest.approx(1.12)
    assert recording.last_sound_between(1.05, 1.07) == pytest.approx(1.07, abs=1 / SR)
    assert recording.last_sound_between(0.2, 0.9) is None


def test_samples_between_matches_the_timeline(recording):
    """What the speaker played in a window, across a gap and two chunks, as float32."""
    t0, t1 = 0.04, 1.05
    window = recording.samples_between(t0, t1, sample_rate=SR)
    expected = recording.timeline()[int(round(t0 * SR)) : int(round(t1 * SR))].astype(np.float32) / 32768

    assert window.dtype == np.float32
    np.testing.assert_array_equal(window, expected)


def test_samples_between_before_the_start_and_after_the_end_is_silence(recording):
    """The echo path asks for the 20 ms before t=0 on its first frame."""
    before = recording.samples_between(-0.02, 0.0, sample_rate=SR)
    assert len(before) == int(0.02 * SR) and not before.any()
    after = recording.samples_between(1.5, 1.6, sample_rate=SR)
    assert len(after) == int(0.1 * SR) and not after.any()


def test_samples_between_resamples_to_the_input_rate():
    """The echo fed to a 16 kHz microphone keeps its pitch and duration."""
    rec = BotRecording(sample_rate=SR)
    rec.add(0.0, tone(0.5, 1000))
    echo = rec.samples_between(0.1, 0.3, sample_rate=16000)

    assert abs(len(echo) - int(0.2 * 16000)) <= 1
    spectrum = np.abs(np.fft.rfft(echo * np.hanning(len(echo))))
    assert np.fft.rfftfreq(len(echo), 1 / 16000)[np.argmax(spectrum)] == pytest.approx(1000, abs=10)
    assert np.max(np.abs(echo)) == pytest.approx(8000 / 32768, rel=0.05)


# --- speech_segments -----------------------------------------------------------------


def test_speech_segments_join_short_pauses_and_split_long_ones():
    """Utterances come out to the 20 ms frame; a 0.3 s pause is within one utterance."""
    rate = 16000
    audio = np.concatenate(
        [
            quiet(0.5, sample_rate=rate),
            tone(1.0, 300, sample_rate=rate),
            quiet(0.3, sample_rate=rate),
            tone(0.5, 300, sample_rate=rate),
            quiet(1.0, sample_rate=rate),
            tone(0.4, 300, sample_rate=rate),
            quiet(0.5, sample_rate=rate),
        ]
    )

    segments = speech_segments(audio, sample_rate=rate)

    assert segments == [pytest.approx((0.5, 2.3), abs=0.021), pytest.approx((3.3, 3.7), abs=0.021)]
    split = speech_segments(audio, sample_rate=rate, max_gap=0.2)
    assert len(split) == 3


def test_speech_segments_of_unaligned_speech_cover_it():
    """Speech that starts and ends mid-frame lies within its segment, off by < one frame."""
    rate = 8000
    audio = np.concatenate([quiet(0.513, sample_rate=rate), tone(0.777, 200, sample_rate=rate), quiet(0.3, sample_rate=rate)])
    (start, end), = speech_segments(audio, sample_rate=rate)
    assert 0.513 - 0.02 < start <= 0.513
    assert 1.29 <= end < 1.29 + 0.02


def test_speech_segments_ignore_hiss_and_short_input():
    hiss = np.random.default_rng(1).normal(0, 100, 16000).astype(np.int16)  # about -50 dBFS
    assert speech_segments(hiss, sample_rate=16000) == []
    assert speech_segments(quiet(0.01, sample_rate=16000), sample_rate=16000) == []
    assert speech_segments(np.zeros(0, np.int16), sample_rate=16000) == []
