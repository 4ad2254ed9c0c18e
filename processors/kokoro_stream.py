"""Kokoro-82M cut at its decoder, so speech can be decoded in chunks as playback needs it.

The whole model spends 94-97 % of its time in the decoder (frames to audio); the
front (text to frames, 25-120 ms) is cheap and fixes the whole sentence's frames, timing,
pitch and loudness at once. Any span of those frames can then be decoded on its
own: the first 0.4 s of a sentence is ready after a fraction of the sentence's
compute, and the rest follows in chunks of whatever size the listener's buffer
allows.

What makes chunks join well, each measured (see tests/test_kokoro_stream.py):

- Context: each chunk is decoded with real neighbouring frames each side, and
  only its middle is kept; the decoder's convolutions see what they would see
  in the whole sentence.
- Ballast: the decoder normalizes over time (instance norm). A whole sentence
  comes with 0.5-1 s of silence around it, a chunk with none, and normalized
  without silence its soft sounds (fricatives) drop by 10-25 dB. So a few
  silent frames are decoded after every chunk, and thrown away.
- Silence: the front's energy says which frames are silent (below -70 dB in the
  whole model's audio). They are not decoded unless as context, come out as
  exact zeros (a mostly silent chunk would otherwise be normalized up to audible
  noise), and the silence around the speech is not part of the utterance at all.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
from kokoro_onnx import Kokoro
from kokoro_onnx.chunker import split_phonemes
from kokoro_onnx.config import MAX_PHONEME_LENGTH
from kokoro_onnx.session import input_dtypes
from loguru import logger

from processors.synthesis_speed import SynthesisSpeed

SAMPLE_RATE = 24000
# One decoder frame is 25 ms: F0 has 2 values a frame, upsampled 300x to samples.
SAMPLES_PER_FRAME = 600

# The tensors the cut is made at, as named in Kokoro v1.0's ONNX export.
STYLE = "style"
SPEED = "speed"
AUDIO = "audio"
FEATURES = "/encoder/MatMul_1_output_0"  # text features aligned to frames, [1, 512, T]
F0 = "/encoder/Reshape_output_0"  # pitch in Hz, two values a frame, [1, 2T]
ENERGY = "/encoder/Reshape_1_output_0"  # "N", log energy, two values a frame, [1, 2T]
DURATIONS = "/encoder/Gather_output_0"  # frames of each token, the two pads included, [n + 2]
_DECODER_INPUTS = (FEATURES, F0, ENERGY)
# Changes when the tensors cut at do, so halves cut another way are never loaded from a cache.
CUT_VERSION = 1

# Real frames decoded each side of a chunk (8 = 200 ms, about the convolutions' reach).
CONTEXT_FRAMES = 8
# The cross-fade at a join: the two sides' waveforms differ in fine phase, so short.
CROSSFADE_SECS = 0.005
# Frames before and after the speech decoded as context: without them the first sample clicks.
EDGE_CONTEXT_FRAMES = 2
# Silent frames decoded after each chunk, for its normalization (see the module's docstring).
BALLAST_FRAMES = 8
# Chunks shorter than this cost mostly context; a shorter request is rounded up.
MIN_CHUNK_FRAMES = 8
# A frame is silent when its energy and its neighbours' are below this: measured on
# five voices, such frames are below -69 dB in the whole model's audio.
SILENT_ENERGY = -2.0
# Speech is played from the first frame with this energy: measured on five voices, the
# onset before it is below -52 dB, more latency than sound (it is decoded as context).
AUDIBLE_ENERGY = 1.0
_GATE_RAMP = 120  # 5 ms

_CALIBRATION_TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away."


def split_kokoro_model(model_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """Cut the whole Kokoro graph into its front and its decoder.

    Returns:
        The front's and the decoder's paths in ``out_dir``, named after the model.

    Raises:
        ValueError: the graph lacks the tensors the cut is made at (another export).
    """
    model = onnx.load(str(model_path))
    produced = {name for node in model.graph.node for name in node.output}
    missing = [name for name in (*_DECODER_INPUTS, DURATIONS) if name not in produced]
    if missing:
        raise ValueError(f"{model_path} is not the Kokoro v1.0 graph this cut is made for: no {missing}")
    inputs = {i.name for i in model.graph.input}
    tokens = "input_ids" if "input_ids" in inputs else "tokens"
    extractor = onnx.utils.Extractor(model)
    front = extractor.extract_model([tokens, STYLE, SPEED], [*_DECODER_INPUTS, DURATIONS])
    decoder = extractor.extract_model([STYLE, *_DECODER_INPUTS], [AUDIO])
    out_dir.mkdir(parents=True, exist_ok=True)
    front_path, decoder_path = split_paths(model_path, out_dir)
    _save_atomically(front, front_path)
    _save_atomically(decoder, decoder_path)
    return front_path, decoder_path


def split_paths(model_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """Where ``split_kokoro_model`` puts the halves: named after the model and the cut's version."""
    return (
        out_dir / f"{model_path.stem}.cut{CUT_VERSION}.front.onnx",
        out_dir / f"{model_path.stem}.cut{CUT_VERSION}.decoder.onnx",
    )


def _save_atomically(model: onnx.ModelProto, path: Path) -> None:
    # Another process may load the file the moment it exists: never let it see half of one.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)


def load_kokoro_stream(*, kokoro: Kokoro, front_path: Path, decoder_path: Path, threads: int = 2) -> KokoroStream:
    """Open the two halves on the CPU, sharing ``kokoro``'s phonemizer and voices."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Threads that sleep between operators, instead of spinning, leave those moments to the
    # language model writing the rest of the reply (see processors/compute_budget.py).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    front, decoder = (
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        for path in (front_path, decoder_path)
    )
    return KokoroStream(front=front, decoder=decoder, kokoro=kokoro)


@dataclass(frozen=True, eq=False)
class Utterance:
    """One sentence through the front: what the decoder needs, and when each word starts.

    Its speech frames run from ``start`` (in the front's frames) for ``frames``
    frames: the silence the model puts around speech (0.3 s before, up to 0.7 s
    after) is not played, and decoded only as a few frames of context.
    """

    phonemes: str
    style: np.ndarray
    features: np.ndarray
    f0: np.ndarray
    energy: np.ndarray
    durations: np.ndarray
    loud: np.ndarray  # per front frame: not silent
    start: int
    frames: int
    word_starts: list[float]

    @property
    def samples_per_frame(self) -> int:
        return SAMPLES_PER_FRAME

    @property
    def seconds(self) -> float:
        """Duration of the speech audio."""
        return self.frames * SAMPLES_PER_FRAME / SAMPLE_RATE


class KokoroStream:
    """Kokoro as two halves: ``analyze`` a sentence once, then ``decode`` any span of it.

    Holds no per-sentence state: one instance (and its two ONNX Runtime sessions)
    serves every session of the process, from any thread.
    """

    sample_rate = SAMPLE_RATE
    samples_per_frame = SAMPLES_PER_FRAME

    def __init__(
        self,
        *,
        front: ort.InferenceSession,
        decoder: ort.InferenceSession,
        kokoro: Kokoro,
        context_frames: int = CONTEXT_FRAMES,
        edge_context_frames: int = EDGE_CONTEXT_FRAMES,
        ballast_frames: int = BALLAST_FRAMES,
    ):
        """Initialize the stream.

        Args:
            front: The front half (tokens, style, speed to frames), from ``split_kokoro_model``.
            decoder: The decoder half (frames to audio).
            kokoro: A loaded Kokoro, for its phonemizer, tokenizer and voices only.
            context_frames: Real frames decoded each side of a chunk and thrown away.
            edge_context_frames: Frames before and after the speech decoded as context.
            ballast_frames: Silent frames decoded after each chunk's context, for the
                decoder's normalization to see a whole sentence's mix of sound and silence.
        """
        self._front = front
        self._decoder = decoder
        self._kokoro = kokoro
        # Read once: an .npz reads each voice from its zip on access, which threads must not share.
        self._voices = {name: np.asarray(kokoro.voices[name]) for name in kokoro.voices}
        self._dtypes = input_dtypes(front)
        self._tokens_input = "input_ids" if "input_ids" in self._dtypes else "tokens"
        self.context_frames = context_frames
        self.edge_context_frames = edge_context_frames
        self.ballast_frames = ballast_frames

    @property
    def voices(self) -> dict[str, np.ndarray]:
        """The voice styles by name."""
        return self._voices

    def analyze(
        self,
        text: str,
        *,
        voice: str,
        speed: float = 1.0,
        lang: str = "en-us",
        run_options: ort.RunOptions | None = None,
    ) -> Utterance:
        """Phonemize ``text`` and run the front: fixes every frame of the sentence at once.

        ``run_options.terminate = True`` from another thread stops the front (it raises).

        Raises:
            ValueError: unknown voice, speed outside 0.5-2.0, nothing to say, or more
                phonemes than the model takes at once (``analyze_all`` splits those).
        """
        phonemes = self._phonemize(text, lang=lang)
        if len(phonemes) > MAX_PHONEME_LENGTH:
            raise ValueError(
                f"{text[:40]!r}... has {len(phonemes)} phonemes, more than Kokoro's {MAX_PHONEME_LENGTH}: "
                "split it (analyze_all does)"
            )
        return self._analyze_phonemes(phonemes, voice=voice, speed=speed, run_options=run_options)

    def analyze_all(
        self,
        text: str,
        *,
        voice: str,
        speed: float = 1.0,
        lang: str = "en-us",
        run_options: ort.RunOptions | None = None,
    ) -> list[Utterance]:
        """Like ``analyze``, for text of any length: split where ``Kokoro.create`` splits it.

        Cuts fall at sentence ends first, then clauses, then words.
        """
        phonemes = self._phonemize(text, lang=lang)
        return [
            self._analyze_phonemes(batch, voice=voice, speed=speed, run_options=run_options)
            for batch in split_phonemes(phonemes, MAX_PHONEME_LENGTH)
        ]

    def _phonemize(self, text: str, *, lang: str) -> str:
        # As kokoro-onnx does: newlines are not in the vocabulary, so whitespace becomes one space.
        phonemes = " ".join(self._kokoro.tokenizer.phonemize(text, lang).split())
        if not phonemes:
            raise ValueError(f"Nothing to synthesize, {text!r} produced no phonemes")
        return phonemes

    def _analyze_phonemes(
        self, phonemes: str, *, voice: str, speed: float, run_options: ort.RunOptions | None
    ) -> Utterance:
        if voice not in self._voices:
            raise ValueError(f"Voice {voice} not found in available voices")
        if not 0.5 <= speed <= 2.0:
            raise ValueError(f"Speed should be between 0.5 and 2.0, got {speed}")
        tokenizer = self._kokoro.tokenizer
        tokens = tokenizer.tokenize(phonemes, limit=MAX_PHONEME_LENGTH)
        if not tokens:
            raise ValueError(f"No phonemes of {phonemes!r} are in the model vocabulary")
        styles = self._voices[voice]
        # One style per phoneme count: n phonemes use row n - 1.
        style = np.asarray(styles[min(len(tokens), len(styles)) - 1], dtype=self._dtypes[STYLE])
        features, f0, energy, durations = self._front.run(
            [*_DECODER_INPUTS, DURATIONS],
            {
                self._tokens_input: np.array([[0, *tokens, 0]], dtype=self._dtypes[self._tokens_input]),
                STYLE: style,
                SPEED: np.array([speed], dtype=self._dtypes[SPEED]),
            },
            run_options,
        )
        start, stop = _speech_span(energy, durations)
        return Utterance(
            phonemes=phonemes,
            style=style,
            features=features,
            f0=f0,
            energy=energy,
            durations=durations,
            loud=_loud_frames(energy),
            start=start,
            frames=stop - start,
            word_starts=_word_starts(tokenizer.known(phonemes), durations, start=start),
        )

    def context_span(self, utterance: Utterance, start: int, end: int) -> tuple[int, int]:
        """Speech frames [start, end) and their context, clipped at the utterance's edges.

        In speech frames: the context before the first speech frame is negative.
        """
        total = len(utterance.loud)
        first = -min(self.edge_context_frames, utterance.start)
        last = utterance.frames + min(self.edge_context_frames, total - utterance.start - utterance.frames)
        return max(first, start - self.context_frames), min(last, end + self.context_frames)

    def overhead_frames(self, *, first: bool, last: bool) -> int:
        """Frames decoded beyond a chunk's own: its context each side and the ballast.

        A chunk at the start or end of its utterance takes only the edge's few frames
        there, so one whole sentence costs least and every cut adds context.
        """
        before = self.edge_context_frames if first else self.context_frames
        after = self.edge_context_frames if last else self.context_frames
        return before + after + self.ballast_frames

    def decoded_span(self, utterance: Utterance, start: int, end: int) -> tuple[int, int]:
        """The speech frames the decoder runs on for frames [start, end); empty when all are silent.

        The context around the chunk's loud frames, so silence at its ends is not decoded.
        """
        loud = np.flatnonzero(utterance.loud[utterance.start + start : utterance.start + end])
        if not loud.size:
            return start, start
        lo, hi = self.context_span(utterance, start + int(loud[0]), start + int(loud[-1]) + 1)
        return lo, hi

    def decoded_frames(self, utterance: Utterance, start: int, end: int) -> int:
        """Frames ``decode(utterance, start, end)`` runs the decoder on: what its cost scales with."""
        lo, hi = self.decoded_span(utterance, start, end)
        return hi - lo + (len(self._ballast(utterance)) if hi > lo else 0)

    def _ballast(self, utterance: Utterance) -> np.ndarray:
        """The utterance's last silent frames (repeated if it has fewer), decoded after a chunk."""
        silence = np.flatnonzero(~utterance.loud)
        return np.resize(silence[len(silence) - self.ballast_frames :], self.ballast_frames) if silence.size else silence

    def decode(
        self, utterance: Utterance, start: int, end: int, *, run_options: ort.RunOptions | None = None
    ) -> np.ndarray:
        """Decode speech frames [start, end) with their context, blocking.

        ``run_options.terminate = True`` from another thread stops the call (it raises):
        a chunk of an interrupted reply gives the cores back at once.

        Returns:
            float32 audio at 24 kHz for exactly ``decoded_span(utterance, start, end)``
            (empty when the frames are silent), silent frames as zeros.
        """
        if not 0 <= start < end <= utterance.frames:
            raise ValueError(f"frames [{start}, {end}) are not within the utterance's {utterance.frames}")
        lo, hi = self.decoded_span(utterance, start, end)
        if lo == hi:
            return np.zeros(0, dtype=np.float32)
        lo, hi = lo + utterance.start, hi + utterance.start
        frames = np.concatenate([np.arange(lo, hi), self._ballast(utterance)])
        halves = np.stack([2 * frames, 2 * frames + 1], axis=1).ravel()
        audio = self._decoder.run(
            [AUDIO],
            {
                STYLE: utterance.style,
                FEATURES: utterance.features[:, :, frames],
                F0: utterance.f0[:, halves],
                ENERGY: utterance.energy[:, halves],
            },
            run_options,
        )[0]
        return audio[: (hi - lo) * SAMPLES_PER_FRAME] * _gate(utterance.loud[lo:hi])

    def measure_speed(self, *, voice: str, seconds: float = 1.0) -> SynthesisSpeed:
        """Fit this machine's decoder cost, ``fixed + per_frame * frames``, in about ``seconds``.

        The same CPU model has run Kokoro from 0.35x to 1.5x real time, so the cost is
        measured where it runs: a short and a long chunk of one sentence, after a warm-up.
        """
        utterance = self.analyze(_CALIBRATION_TEXT, voice=voice)
        sizes = (MIN_CHUNK_FRAMES, min(utterance.frames, 64))
        self.decode(utterance, 0, sizes[0])  # first-call allocations are not the steady cost
        points = []
        deadline = time.perf_counter() + seconds
        while not points or time.perf_counter() < deadline:
            for frames in sizes:
                began = time.perf_counter()
                self.decode(utterance, 0, frames)
                points.append((self.decoded_frames(utterance, 0, frames), time.perf_counter() - began))
        # The fastest call of each size: a busy moment during the measurement is load, not this
        # CPU's speed (what load there is, the chunks decoded while the bot talks measure).
        (small, small_secs), (large, large_secs) = (
            (frames, min(secs for decoded, secs in points if decoded == frames))
            for frames in sorted({decoded for decoded, _ in points})
        )
        per_frame = (large_secs - small_secs) / max(1, large - small)
        fixed = small_secs - per_frame * small
        speed = SynthesisSpeed(fixed_secs=max(0.0, float(fixed)), secs_per_frame=max(1e-4, float(per_frame)))
        logger.debug(f"Kokoro decoder: {speed.fixed_secs * 1000:.0f} ms + {speed.secs_per_frame * 1000:.1f} ms a frame")
        return speed


def _speech_span(energy: np.ndarray, durations: np.ndarray) -> tuple[int, int]:
    """The front frames [start, stop) that are played: from the first audible to the last sounding.

    The start is strict (a -60 dB onset is latency, not speech); the end keeps the
    decay down to silence. Nothing audible (a lone mark, say): no frames at all.
    """
    level = energy.reshape(-1, 2).max(axis=1)
    audible, sounding = np.flatnonzero(level >= AUDIBLE_ENERGY), np.flatnonzero(level >= SILENT_ENERGY)
    if not audible.size:
        return int(durations[0]), int(durations[0])
    return int(audible[0]), int(sounding[-1]) + 1


def _loud_frames(energy: np.ndarray) -> np.ndarray:
    """Which frames carry sound: the energy of the frame or a neighbour is above silence."""
    loud = energy.reshape(-1, 2).max(axis=1) >= SILENT_ENERGY
    near = loud.copy()
    near[1:] |= loud[:-1]
    near[:-1] |= loud[1:]
    return near


def _gate(loud: np.ndarray) -> np.ndarray:
    """Per-sample gain: 1 over loud frames, 0 over silent ones, ramping within the silence."""
    gain = np.repeat(loud.astype(np.float32), SAMPLES_PER_FRAME)
    down = np.linspace(1, 0, _GATE_RAMP, endpoint=False, dtype=np.float32)
    for edge in np.flatnonzero(loud[1:] != loud[:-1]) + 1:
        at = edge * SAMPLES_PER_FRAME
        if loud[edge]:
            gain[at - _GATE_RAMP : at] = down[::-1]
        else:
            gain[at : at + _GATE_RAMP] = down
    return gain


def _word_starts(phonemes: str, durations: np.ndarray, *, start: int) -> list[float]:
    """When each space-separated phoneme word starts, in seconds from the first speech sample.

    ``phonemes`` are aligned one to one with the tokens after the leading pad, so
    a word starts once the frames of every token before it have passed.
    """
    token_starts = np.cumsum(durations)[: len(phonemes)]
    frame_secs = SAMPLES_PER_FRAME / SAMPLE_RATE
    return [
        max(0.0, float((token_starts[i] - start) * frame_secs))
        for i, p in enumerate(phonemes)
        if not p.isspace() and (i == 0 or phonemes[i - 1].isspace())
    ]


class ChunkedDecoding:
    """One utterance decoded front to back, in chunks whose sizes the caller picks as it goes.

    Each chunk's audio is ready to play after the one before: its start is
    cross-faded into the audio the previous chunk decoded past its end. Keeps
    state: use each instance from one task at a time.
    """

    def __init__(
        self,
        stream: KokoroStream,
        utterance: Utterance,
        *,
        min_chunk_frames: int = MIN_CHUNK_FRAMES,
        crossfade_secs: float = CROSSFADE_SECS,
    ):
        """Initialize the decoding.

        Args:
            stream: What decodes (a ``KokoroStream``, or a wrapper of one).
            utterance: The analyzed sentence.
            min_chunk_frames: Shorter requests are rounded up, and a shorter rest
                is decoded with the chunk before it.
            crossfade_secs: Length of the cross-fade at each join.
        """
        self._stream = stream
        self._utterance = utterance
        self._min = min_chunk_frames
        self._fade = int(crossfade_secs * SAMPLE_RATE)
        self._position = 0
        self._tail = np.zeros(0, dtype=np.float32)  # decoded past the last chunk's end

    @property
    def position(self) -> int:
        """Speech frames decoded so far."""
        return self._position

    @property
    def remaining(self) -> int:
        """Speech frames still to decode."""
        return self._utterance.frames - self._position

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def chunk_frames(self, frames: int | None) -> int:
        """How many speech frames ``next(frames)`` decodes, after rounding."""
        if frames is None:
            return self.remaining
        frames = max(frames, self._min)
        return self.remaining if self.remaining - frames < self._min else frames

    def frames_decoded_for(self, frames: int | None) -> int:
        """Frames ``next(frames)`` runs the decoder on, context included: what its cost scales with."""
        return self._stream.decoded_frames(self._utterance, self._position, self._position + self.chunk_frames(frames))

    def next(self, frames: int | None = None, *, run_options: ort.RunOptions | None = None) -> np.ndarray:
        """Decode the next ``frames`` speech frames (None: all that is left, in one call).

        Returns:
            float32 audio at 24 kHz, ``chunk_frames(frames) * 600`` samples, to play
            right after the previous chunk's.
        """
        if self.done:
            raise ValueError("the utterance is decoded")
        start = self._position
        end = start + self.chunk_frames(frames)
        window = self._stream.decode(self._utterance, start, end, run_options=run_options)
        lo, _ = self._stream.decoded_span(self._utterance, start, end)
        # Place the window (it may start before the chunk, or after when its first frames are silent).
        at = (lo - start) * SAMPLES_PER_FRAME
        audio = np.zeros((end - start) * SAMPLES_PER_FRAME, dtype=np.float32)
        inside = window[max(0, -at) : max(0, -at) + len(audio) - max(0, at)]
        audio[max(0, at) : max(0, at) + len(inside)] = inside
        fade = min(len(self._tail), self._fade)
        if fade and at <= 0:
            ramp = _fade_in(fade)
            audio[:fade] = audio[:fade] * ramp + self._tail[:fade] * (1 - ramp)
        self._tail = window[max(0, -at) + len(inside) :]
        self._position = end
        return audio


def _fade_in(samples: int) -> np.ndarray:
    # Raised cosine: the two sides' weights sum to one, and neither has a corner.
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(samples) + 0.5) / samples)).astype(np.float32)
