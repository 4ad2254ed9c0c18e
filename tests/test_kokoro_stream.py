"""Kokoro cut at its decoder, decoded in chunks: the same speech, joined without a seam."""

from __future__ import annotations

import copy
import threading
import time

import jiwer
import numpy as np
import onnxruntime as ort
import pytest
import soxr

from bot import assets
from processors.kokoro_stream import (
    ENERGY,
    F0,
    FEATURES,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    ChunkedDecoding,
    KokoroStream,
    load_kokoro_stream,
    split_kokoro_model,
    split_paths,
)
from processors.synthesis_speed import SynthesisSpeed

VOICE = "jf_alpha"
# About 5 s of speech, with a comma pause and soft sounds (s, z, f) that chunking can lose.
SENTENCE = "The weather today is sunny and warm, so we will walk along the river to the old market."
# A first chunk for a waiting listener, another, then the rest in one call.
TYPICAL = [16, 16, None]
IRREGULAR = [12, 8, 20, 9, 30, 8, 17, None]
# Log-mel distance to the whole-sentence audio, in dB, by chunk sequence. Measured: 2.1
# and 3.1; decoding without context or ballast measured 3.2 and 5.5, and skipping two
# frames at each join 9.9.
MAX_DISTANCE_DB = {"typical": 2.8, "irregular": 4.0}
# Quieter than this (about -50 dBFS) is silence.
SILENCE_LEVEL = 100 / 32768


@pytest.fixture(scope="module")
def split(base_config) -> tuple:
    return assets.kokoro_split_paths(assets.kokoro_model_path(base_config.tts.model_path))


@pytest.fixture(scope="module")
def stream(models, split, base_config) -> KokoroStream:
    front, decoder = split
    threads = base_config.tts.threads
    return load_kokoro_stream(kokoro=models.kokoro, front_path=front, decoder_path=decoder, threads=threads)


@pytest.fixture(scope="module")
def sentence(stream):
    return stream.analyze(SENTENCE, voice=VOICE)


@pytest.fixture(scope="module")
def whole(stream, sentence) -> np.ndarray:
    """The sentence decoded in one call: what chunked decoding should sound like."""
    return ChunkedDecoding(stream, sentence).next(None)


def _decode(stream, utterance, sizes: list[int | None]) -> tuple[np.ndarray, list[int]]:
    """Chunked audio, and the sample index of each join."""
    decoding = ChunkedDecoding(stream, utterance)
    chunks = [decoding.next(frames) for frames in sizes]
    assert decoding.done
    return np.concatenate(chunks), list(np.cumsum([len(c) for c in chunks])[:-1])


def _model_audio(kokoro, utterance) -> np.ndarray:
    """The whole model's audio of the utterance, pads and all."""
    tokens = kokoro.tokenizer.tokenize(utterance.phonemes)
    inputs = {
        "tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
        "style": utterance.style,
        "speed": np.array([1.0], dtype=np.float32),
    }
    return kokoro.sess.run(None, inputs)[0]


def _log_mel(audio: np.ndarray) -> np.ndarray:
    """80-band log-mel spectrogram (dB), 10 ms hop: what the ear and Whisper go by."""
    n_fft, hop, bands = 1024, 240, 80
    mel = np.linspace(0, 2595 * np.log10(1 + 8000 / 700), bands + 2)
    edges = 700 * (10 ** (mel / 2595) - 1)
    freqs = np.fft.rfftfreq(n_fft, 1 / SAMPLE_RATE)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bank = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(audio, n_fft // 2), n_fft)[::hop]
    power = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1)) ** 2
    return 10 * np.log10(power @ bank.T + 1e-10)


def _distance_db(reference: np.ndarray, audio: np.ndarray) -> float:
    """Mean log-mel difference over the reference's sounding frames, 60 dB of range."""
    ref, out = _log_mel(reference), _log_mel(audio)
    floor = ref.max() - 60
    ref, out = np.maximum(ref, floor), np.maximum(out, floor)
    sounding = ref.max(axis=1) > ref.max() - 40
    return float(np.abs(ref - out)[sounding].mean())


def _dropouts(reference: np.ndarray, audio: np.ndarray) -> int:
    """25 ms frames that sound in the reference (above -40 dB) but come out 10 dB softer."""

    def level(x):
        return 10 * np.log10(np.mean(x[: len(x) // 600 * 600].reshape(-1, 600) ** 2, axis=1) + 1e-12)

    ref, out = level(reference), level(audio)
    return int(np.sum((ref > -40) & (out < ref - 10)))


def _max_jump(audio: np.ndarray, near: list[int] | None = None, reach: int = 240) -> float:
    """The largest sample-to-sample step, anywhere or within 10 ms of the given samples."""
    steps = np.abs(np.diff(audio))
    if near is None:
        return float(steps.max())
    return max(float(steps[max(0, at - reach) : at + reach].max()) for at in near)


def _heard(whisper, audio: np.ndarray) -> str:
    # Whisper tiny drops a first word that starts on the first sample: give it a lead-in.
    samples = np.concatenate([np.zeros(int(0.3 * SAMPLE_RATE), np.float32), audio])
    segments, _ = whisper.transcribe(soxr.resample(samples, SAMPLE_RATE, 16000), language="en", beam_size=1)
    return " ".join(s.text for s in segments)


def _normalize(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


# --- the cut ---------------------------------------------------------------------------


def test_front_then_decoder_is_the_whole_model(models, split, base_config):
    """Run on every frame, pads included, the two halves give the whole model's audio."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = base_config.tts.threads
    front, decoder = (
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"]) for path in split
    )
    kokoro = models.kokoro
    phonemes = kokoro.tokenizer.phonemize("The capital of France is Paris.", "en-us")
    tokens = kokoro.tokenizer.tokenize(phonemes)
    style = kokoro.voices[VOICE][len(tokens) - 1]
    inputs = {
        "tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
        "style": style,
        "speed": np.array([1.0], dtype=np.float32),
    }

    features, f0, energy, durations = front.run(None, inputs)
    audio = decoder.run(None, {"style": style, FEATURES: features, F0: f0, ENERGY: energy})[0]

    expected = kokoro.sess.run(None, inputs)[0]
    assert features.shape[2] == durations.sum() and len(audio) == durations.sum() * SAMPLES_PER_FRAME
    np.testing.assert_allclose(audio, expected, atol=1e-5)


def test_split_paths_are_cut_once_and_cached(monkeypatch, tmp_path, base_config):
    """The halves are written whole (no temp file left) and found again without a second cut."""
    model = assets.kokoro_model_path(base_config.tts.model_path)
    monkeypatch.setenv("VOXBOT_CACHE_DIR", str(tmp_path))

    front, decoder = assets.kokoro_split_paths(model)

    assert (front, decoder) == split_paths(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([front.name, decoder.name])
    stamps = front.stat().st_mtime_ns, decoder.stat().st_mtime_ns
    assert assets.kokoro_split_paths(model) == (front, decoder)
    assert (front.stat().st_mtime_ns, decoder.stat().st_mtime_ns) == stamps


def test_another_graph_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["tokens"], ["audio"])],
        "not-kokoro",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("audio", TensorProto.INT64, [1, None])],
    )
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ValueError, match="not the Kokoro v1.0 graph"):
        split_kokoro_model(path, tmp_path)


# --- the utterance ---------------------------------------------------------------------


def test_silence_around_the_speech_is_not_decoded(stream, sentence, whole, models):
    """The pads' 0.3 s before and the trailing silence are not frames: the audio starts speaking."""
    total = int(sentence.durations.sum())
    assert sentence.frames < total - sentence.durations[0]
    assert stream.decoded_frames(sentence, 0, sentence.frames) < total
    assert sentence.samples_per_frame == SAMPLES_PER_FRAME == SAMPLE_RATE // 40
    assert len(whole) == sentence.frames * SAMPLES_PER_FRAME
    assert sentence.seconds == pytest.approx(len(whole) / SAMPLE_RATE)
    assert np.flatnonzero(np.abs(whole) > SILENCE_LEVEL)[0] / SAMPLE_RATE <= 0.03
    # What was left out is silent in the whole model's audio too (below -60 dB).
    model = _model_audio(models.kokoro, sentence)
    left_out = np.concatenate(
        [model[: sentence.start * SAMPLES_PER_FRAME], model[(sentence.start + sentence.frames) * SAMPLES_PER_FRAME :]]
    )
    assert np.sqrt(np.mean(left_out**2)) < 1e-3


def test_word_starts_follow_the_phoneme_words(sentence):
    starts = sentence.word_starts
    assert len(starts) == len(sentence.phonemes.split()) == len(SENTENCE.split())
    assert starts[0] < 0.05
    assert all(a < b for a, b in zip(starts, starts[1:]))
    assert starts[-1] < sentence.seconds - 0.2  # "market." takes a while to say


def test_too_many_phonemes_are_refused_or_split(stream):
    text = " ".join(["The weather today is sunny and warm, so we will walk along the river."] * 8)
    with pytest.raises(ValueError, match="phonemes"):
        stream.analyze(text, voice=VOICE)
    utterances = stream.analyze_all(text, voice=VOICE)
    assert len(utterances) >= 2
    assert all(len(u.phonemes) <= 510 for u in utterances)
    assert sum(len(u.word_starts) for u in utterances) == len(text.split())


# --- chunked decoding ------------------------------------------------------------------


@pytest.mark.parametrize("name, sizes", [("typical", TYPICAL), ("irregular", IRREGULAR)])
def test_chunks_sound_like_the_whole_sentence(stream, sentence, whole, models, name, sizes):
    """Same length, same words, close spectra, no lost sounds, and no click at any join."""
    audio, joins = _decode(stream, sentence, sizes)

    assert len(audio) == len(whole)
    heard, heard_whole = _heard(models.whisper, audio), _heard(models.whisper, whole)
    assert jiwer.wer(_normalize(SENTENCE), _normalize(heard_whole)) < 0.1, heard_whole
    assert jiwer.wer(_normalize(heard_whole), _normalize(heard)) < 0.1, heard
    assert _distance_db(whole, audio) < MAX_DISTANCE_DB[name]
    assert _dropouts(whole, audio) <= 2
    # A join steps no further than the sentence's own steepest sample (measured: 0.45-0.52 of it).
    assert _max_jump(audio, joins) <= _max_jump(whole)


def test_the_measures_catch_broken_joins(stream, sentence, whole):
    """The bounds above fail for chunks decoded without context, ballast or fade, or misaligned."""
    bare = copy.copy(stream)  # the same sessions
    bare.context_frames = bare.ballast_frames = 0
    decoding = ChunkedDecoding(bare, sentence, crossfade_secs=0.0)
    chunks = [decoding.next(frames) for frames in IRREGULAR]
    audio, joins = np.concatenate(chunks), list(np.cumsum([len(c) for c in chunks])[:-1])
    assert _distance_db(whole, audio) > MAX_DISTANCE_DB["irregular"]
    assert _max_jump(audio, joins) > _max_jump(whole)

    # Two frames dropped at each join: the audio runs ahead of the sentence.
    decoding = ChunkedDecoding(stream, sentence, min_chunk_frames=1)
    kept = [decoding.next(16)]
    decoding.next(2)
    kept.append(decoding.next(16))
    decoding.next(2)
    kept.append(decoding.next(None))
    audio = np.concatenate(kept)
    audio = np.concatenate([audio, np.zeros(len(whole) - len(audio), np.float32)])
    assert _distance_db(whole, audio) > MAX_DISTANCE_DB["typical"]


def test_chunk_sizes_are_rounded_and_the_rest_taken_whole(stream, sentence):
    decoding = ChunkedDecoding(stream, sentence, min_chunk_frames=8)
    assert decoding.chunk_frames(3) == 8
    assert decoding.chunk_frames(sentence.frames - 5) == sentence.frames  # no 5-frame rest
    assert decoding.chunk_frames(None) == sentence.frames
    assert decoding.frames_decoded_for(16) == stream.decoded_frames(sentence, 0, 16)
    # The first chunk: its frames, 8 of context after, 2 silent before, 8 of ballast.
    assert decoding.frames_decoded_for(16) == 16 + 8 + 2 + 8
    first = decoding.next(3)
    assert len(first) == 8 * SAMPLES_PER_FRAME and decoding.position == 8
    assert decoding.remaining == sentence.frames - 8
    decoding.next(None)
    assert decoding.done
    with pytest.raises(ValueError):
        decoding.next(8)


def test_a_silent_chunk_is_zeros_and_costs_nothing(stream, sentence):
    """The pause at the comma: not decoded, not normalized up into noise."""
    silent = ~sentence.loud[sentence.start : sentence.start + sentence.frames]
    runs = np.flatnonzero(np.convolve(silent, np.ones(8), "valid") == 8)
    assert runs.size, "precondition: the comma makes a pause of 8 silent frames"
    start = int(runs[0])
    assert stream.decoded_frames(sentence, start, start + 8) == 0
    assert not stream.decode(sentence, start, start + 8).size


def test_measured_speed_predicts_a_decode(stream, sentence):
    """Calibrated in about a second, the cost model predicts a real chunk within a factor of three."""
    began = time.perf_counter()
    speed = stream.measure_speed(voice=VOICE, seconds=1.0)
    assert time.perf_counter() - began < 8
    assert isinstance(speed, SynthesisSpeed)
    assert speed.fixed_secs >= 0 and 0.1 < speed.real_time_factor < 5

    decoding = ChunkedDecoding(stream, sentence)
    decoding.next(16)
    frames = decoding.frames_decoded_for(40)
    began = time.perf_counter()
    decoding.next(40)
    took = time.perf_counter() - began
    assert speed.predict(frames) / 3 < took < speed.predict(frames) * 3


def test_a_decode_in_progress_stops_when_terminated(stream, sentence):
    """An interrupted reply's chunk gives the cores back at once, not when it would be done."""
    started = time.perf_counter()
    stream.decode(sentence, 0, sentence.frames)
    whole_secs = time.perf_counter() - started

    options = ort.RunOptions()
    timer = threading.Timer(0.1 * whole_secs, lambda: setattr(options, "terminate", True))
    timer.start()
    started = time.perf_counter()
    with pytest.raises(Exception, match="(?i)terminate"):
        stream.decode(sentence, 0, sentence.frames, run_options=options)
    assert time.perf_counter() - started < 0.6 * whole_secs
