"""Whisper speech-to-text over faster-whisper, one transcription per user turn."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator

import ctranslate2
import numpy as np
import soxr
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from loguru import logger

from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import STTSettings
from pipecat.services.stt_service import SegmentedSTTService
from pipecat.turns.eager_end_of_turn_mixin import EagerEndOfTurnSTTServiceMixin
from pipecat.utils.time import time_now_iso8601

from processors.apology import transcription_failed
from processors.audio_level import pcm_peak
from processors.barge_in import Floor
from processors.bot_voice import BotVoice
from processors.compute_budget import ComputeBudget

WHISPER_SAMPLE_RATE = 16000
# Silence after the speech inside a fitted window, so the model hears the end.
_FIT_PAD_SECS = 1.0
# Whisper's window is 30 s; longer turns use faster-whisper's own chunking.
_FIT_MAX_SECS = 28.0
_TOKENS_PER_SEC = 6
# A frame quieter than this share of the turn's loudest (and than the floor) is a pause.
_QUIET_SHARE = 0.05
_QUIET_FLOOR = 0.01


def cut_repetition(tokens: list[int], *, span: int = 3) -> list[int]:
    """Cut a short-window hallucination: Whisper starting the transcript over.

    A window fitted to the speech sometimes makes Whisper repeat from the
    beginning ("What is the capital of France? What is the"); the first
    ``span`` tokens coming back is that loop, and everything from there is dropped.
    """
    head = tokens[:span]
    if not head:
        return tokens
    for i in range(1, len(tokens) - len(head) + 1):
        if tokens[i : i + len(head)] == head:
            return tokens[:i]
    return tokens


def pcm16_to_float(audio: bytes, *, sample_rate: int, target_rate: int) -> np.ndarray:
    """16-bit PCM to float32 at ``target_rate``, resampling only when the rates differ."""
    samples = np.frombuffer(audio, dtype=np.int16).astype(np.float32) / 32768.0
    if sample_rate != target_rate:
        samples = soxr.resample(samples, sample_rate, target_rate, quality="HQ")
    return samples


class WhisperSTTService(EagerEndOfTurnSTTServiceMixin, SegmentedSTTService):
    """Transcribes each VAD segment with a shared, already loaded faster-whisper model.

    Its speculative transcript, made after a short quiet while the VAD still confirms
    the end of the turn, is also its prediction of that end (an eager end of turn,
    with ``enable_eager_end_of_turn``): a preemptive reply can start on it.
    """

    def __init__(
        self,
        *,
        model: WhisperModel,
        model_name: str = "whisper-tiny.en",
        language: str | None = "en",
        beam_size: int = 1,
        no_speech_prob: float = 0.6,
        fit_window: bool = True,
        interim_secs: float | None = 0.15,
        bot_voice: BotVoice | None = None,
        echo_gate: float = 0.5,
        speculate_after_secs: float | None = 0.12,
        budget: ComputeBudget | None = None,
        preemptive_max_speech_secs: float = 10.0,
        **kwargs,
    ):
        """Initialize the service.

        Args:
            model: A loaded faster-whisper model, shared across sessions.
            model_name: Reported in metrics.
            language: ISO code, or None to let Whisper detect it.
            beam_size: 1 is greedy decoding, the fastest.
            no_speech_prob: Segments Whisper deems likelier silence than this are dropped,
                so a cough does not become a hallucinated sentence.
            fit_window: Encode only the speech (plus 1 s) instead of Whisper's fixed
                30 s window: about 4x faster for a short turn on a CPU.
            interim_secs: While the bot holds the floor (thinking or speaking),
                transcribe the user's speech every this many seconds, so a
                barge-in is recognized by its words before the user stops
                talking. None disables it.
            bot_voice: The bot's playback level, to tell its echo from the user.
            echo_gate: While the bot plays, speech quieter than this share of its
                level is taken for its echo and not transcribed (the Geigel
                double-talk test); 0 disables it.
            speculate_after_secs: After this much quiet in a turn, transcribe what
                was said so far while the VAD is still confirming the end of the
                turn; the transcript is used if the user says no more. None waits
                for the VAD.
            budget: The process's compute order: speculative passes, which nobody
                waits for yet, wait while a listener's speech is synthesized.
            preemptive_max_speech_secs: No eager end of turn for a longer utterance:
                a long one is likelier to go on, and its reply costs more to throw away.
            **kwargs: Passed to ``SegmentedSTTService`` (``enable_eager_end_of_turn``
                reports the speculative transcript as an eager end of turn).
        """
        super().__init__(settings=STTSettings(model=model_name, language=language), **kwargs)
        self._model = model
        self._language = language
        self._beam_size = beam_size
        self._no_speech_prob = no_speech_prob
        self._fit_window = fit_window
        self._interim_bytes = int(interim_secs * WHISPER_SAMPLE_RATE * 2) if interim_secs else 0
        self._floor = Floor(bot_voice=bot_voice)
        self._bot_voice = bot_voice
        self._echo_gate = echo_gate
        self._interim_task: asyncio.Task | None = None
        self._interim_mark = 0
        self._speculate_bytes = int(speculate_after_secs * WHISPER_SAMPLE_RATE * 2) if speculate_after_secs else 0
        self._speech_peak = 0.0
        self._quiet_bytes = 0
        self._speculation: asyncio.Task | None = None
        self._guess: asyncio.Task | None = None  # the latest pass, stood or not
        # One entry per segment handed to run_stt, in order: its speculation, if it stood.
        self._speculations: deque[asyncio.Task | None] = deque()
        self._budget = budget
        self._preemptive_max_secs = preemptive_max_speech_secs
        self._tokenizer = Tokenizer(
            model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=language or "en"
        )

    @property
    def wants_wav_segments(self) -> bool:
        return False

    def can_generate_metrics(self) -> bool:
        return True

    def _transcribe(self, samples: np.ndarray) -> tuple[str, str | None]:
        """The kept text and the language Whisper used (detected when none is set)."""
        if self._fit_window and self._language and len(samples) < _FIT_MAX_SECS * WHISPER_SAMPLE_RATE:
            return self._transcribe_fitted(samples), self._language
        segments, info = self._model.transcribe(
            samples,
            language=self._language,
            beam_size=self._beam_size,
            condition_on_previous_text=False,
            without_timestamps=True,
            vad_filter=False,
        )
        text = " ".join(
            s.text.strip() for s in segments if s.no_speech_prob < self._no_speech_prob
        ).strip()
        return text, self._language or info.language

    def _transcribe_fitted(self, samples: np.ndarray) -> str:
        padded = np.concatenate([samples, np.zeros(int(_FIT_PAD_SECS * WHISPER_SAMPLE_RATE), np.float32)])
        features = self._model.feature_extractor(padded, padding=0)
        frames = features.shape[1] - features.shape[1] % 2  # the encoder halves the frames
        encoded = self._model.model.encode(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None, :, :frames]))
        )
        prompt = [*self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]
        duration = len(samples) / WHISPER_SAMPLE_RATE
        result = self._model.model.generate(
            encoded,
            [prompt],
            beam_size=self._beam_size,
            max_length=len(prompt) + int(_TOKENS_PER_SEC * duration) + 8,
            return_no_speech_prob=True,
            suppress_blank=True,
        )[0]
        if result.no_speech_prob >= self._no_speech_prob:
            return ""
        tokens = [t for t in result.sequences_ids[0] if t < self._tokenizer.eot]
        return self._tokenizer.decode(cut_repetition(tokens)).strip()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if isinstance(frame, VADUserStoppedSpeakingFrame) and self._user_speaking:
            # Before the base class queues the segment: run_stt takes these in the same order.
            self._speculations.append(self._speculation)
            self._speculation = None
            # The segment is committed: its transcript, early or not, settles the prediction.
            self._clear_eager_end_of_turn()
        await super().process_frame(frame, direction)
        self._floor.update(frame)
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._interim_mark = 0
            self._speech_peak = 0.0
            self._quiet_bytes = 0
            self._speculation = None
            self._maybe_interim()

    async def process_audio_frame(self, frame: InputAudioRawFrame, direction: FrameDirection):
        await super().process_audio_frame(frame, direction)
        self._maybe_interim()
        await self._maybe_speculate(frame.audio)

    async def _maybe_speculate(self, audio: bytes):
        """Transcribe the turn so far once the user falls quiet, before the VAD confirms it."""
        if not (self._speculate_bytes and self._user_speaking):
            return
        peak = pcm_peak(audio)
        if peak > max(_QUIET_FLOOR, _QUIET_SHARE * self._speech_peak):
            self._speech_peak = max(self._speech_peak, peak)
            self._quiet_bytes = 0
            self._speculation = None  # the user went on: that transcript is short of words
            await self._cancel_eager_end_of_turn()
            return
        self._quiet_bytes += len(audio) * WHISPER_SAMPLE_RATE // self.sample_rate
        busy = self._speculation is not None or (self._guess and not self._guess.done())
        if not busy and self._speech_peak and self._quiet_bytes >= self._speculate_bytes:
            audio = bytes(self._audio_buffer) + self._trailing_silence()
            # One pass at a time: a pause between words costs at most one wasted pass.
            self._speculation = self._guess = self.create_task(self._guess_turn(audio))

    async def _guess_turn(self, audio: bytes) -> tuple[str, str | None] | None:
        """A speculative pass; while the user stays quiet, its words predict the end of the turn.

        None when it failed: it was only a guess, and the turn is transcribed again, whole.
        """
        try:
            text, language = await self._transcribe_pcm(audio, background=True)
        except Exception as e:
            logger.warning(f"{self}: a speculative transcription failed ({e}); the turn will be transcribed whole")
            return None
        stands = self._speculation is asyncio.current_task() and self._user_speaking
        # While the bot holds the floor, speech is a barge-in or a backchannel, not a turn to answer early.
        if text and stands and not self._floor.bot_has_it and len(audio) / 2 / self.sample_rate <= self._preemptive_max_secs:
            await self._push_eager_end_of_turn(text, user_id=self._user_id, language=language)
        return text, language

    def _maybe_interim(self):
        """Transcribe the speech so far while the bot has the floor: the words decide a barge-in."""
        if not (self._interim_bytes and self._floor.bot_has_it and self._user_speaking):
            return
        if self._interim_task and not self._interim_task.done():
            return
        if len(self._audio_buffer) - self._interim_mark < self._interim_bytes and self._interim_mark:
            return
        self._interim_mark = len(self._audio_buffer)
        if self._is_echo():
            return
        # The last 3 s are plenty to recognize a barge-in and keep each pass cheap.
        audio = bytes(self._audio_buffer[-3 * self.sample_rate * 2 :])
        self._interim_task = self.create_task(self._interim(audio))

    def _is_echo(self) -> bool:
        """Whether the latest speech is no louder than the bot's own voice would echo."""
        if not (self._bot_voice and self._echo_gate and self._floor.bot_speaking):
            return False
        mic_peak = pcm_peak(bytes(self._audio_buffer[-int(0.3 * self.sample_rate) * 2 :]))
        return self._bot_voice.could_be_echo(mic_peak, gate=self._echo_gate)

    async def _interim(self, audio: bytes):
        # Not background: these words decide whether the bot stops talking over the user.
        text, language = await self._transcribe_pcm(audio)
        if text and self._user_speaking:
            await self.push_frame(
                InterimTranscriptionFrame(text, self._user_id, time_now_iso8601(), language)
            )

    async def cleanup(self):
        if self._interim_task:
            await self.cancel_task(self._interim_task)
            self._interim_task = None
        # A session closed while its StartFrame was still on its way starts this task after the
        # CancelFrame passed: it would wait on its queue for ever (82 of 215 fuzzed sessions).
        await self._cancel_segment_task()
        await super().cleanup()

    async def _transcribe_pcm(self, audio: bytes, *, background: bool = False) -> tuple[str, str | None]:
        """Transcribe in a worker thread; a ``background`` pass first lets urgent speech synthesis finish."""
        samples = pcm16_to_float(audio, sample_rate=self.sample_rate, target_rate=WHISPER_SAMPLE_RATE)
        budget = self._budget if background else None

        def transcribe() -> tuple[str, str | None]:
            if budget is not None:
                budget.yield_to_speech()
            return self._transcribe(samples)

        return await asyncio.to_thread(transcribe)

    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame | None, None]:
        """Transcribe one user turn in a worker thread, or take its speculative transcript."""
        speculation = self._speculations.popleft() if self._speculations else None
        await self.start_processing_metrics()
        try:
            # The user said nothing after the speculative pass: the same audio, up to the quiet.
            heard = await speculation if speculation else None
            text, language = heard or await self._transcribe_pcm(audio)
        except Exception as e:
            logger.exception(f"{self}: transcription failed")
            yield ErrorFrame(error=f"Whisper STT failed: {e}")
            for frame in transcription_failed(e):
                yield frame
            return
        finally:
            await self.stop_processing_metrics()
        logger.debug(f"{self}: transcript [{text}]")
        if text:
            yield TranscriptionFrame(text, self._user_id, time_now_iso8601(), language)
