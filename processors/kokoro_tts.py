"""Kokoro-82M text-to-speech: streamed inside each sentence, paced to the listener.

Sentences arrive from the language model faster than they can be spoken; a
background task per session synthesizes them in order. Each sentence is decoded
in chunks cut to how far synthesis is ahead of playback: a small first chunk
while the listener waits, the rest in one piece once there is time for it (a
chunk costs extra compute for its context). Before a reply starts, its audio
is held until what is buffered covers what is still to be made at this
machine's measured speed, so the reply plays without a hole even on a CPU
slower than real time. Every decoder call goes through the process's
:class:`ComputeBudget`, so the speech a listener waits for is made first.

A preemptive reply (processors/preemptive.py) is held here, by pipecat's
:class:`SpeculationGate` on everything this service sends: it is made after all
other speech until what it holds could start playing, then it waits. Once the turn
is confirmed it plays at once; once withdrawn it is dropped, and nothing of it went
downstream.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import onnxruntime as ort
import soxr
from kokoro_onnx.chunker import pause_after
from loguru import logger

from pipecat.frames.frames import (
    EagerEndOfTurnCancelFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseStartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.turns.speculation_gate import SpeculationGate
from pipecat.utils.text.base_text_aggregator import TextType

from processors.apology import FaultNoticeFrame
from processors.compute_budget import ComputeBudget, Preempted
from processors.first_clause_aggregator import FirstClauseAggregator
from processors.kokoro_stream import ChunkedDecoding, KokoroStream, Utterance
from processors.preemptive import PreemptionWasteFrame, SpeculativeReplyFrame
from processors.reply_floor import ReplyNotBeforeFrame
from processors.synthesis_speed import FRAME_SECS, SynthesisSpeed
from transports.playback_gate import PausePlaybackFrame, ResumePlaybackFrame

KOKORO_SAMPLE_RATE = 24000
# Speech starts where the signal first exceeds this (about -46 dBFS); what comes
# before is silence the listener would wait through.
_ONSET_THRESHOLD = 0.005
_ONSET_KEEP_SECS = 0.01
_CHUNK_SECS = 0.04
# Predicted compute is inflated by this much before it is trusted against a deadline.
_SAFETY = 1.3
# A gap in playback shorter than this is inaudible: it is no hole worth holding audio for.
_HOLE_TOLERANCE_SECS = 0.05
# While this little audio is buffered ahead of playback, the next chunk is urgent.
_URGENT_AHEAD_SECS = 0.3
# A reply still being generated is assumed to hold about this much more speech.
_UNSEEN_SPEECH_FRAMES = 60
# Silence between a reply's pieces, after a sentence's end and after a clause's: what
# kokoro-onnx's own ``create`` puts between the sentences it joins. Free time to synthesize in.
_SENTENCE_PAUSE_SECS = 0.25
_CLAUSE_PAUSE_SECS = 0.1
# Frames of speech per character of text, before the first sentence measures it.
_FRAMES_PER_CHAR = 2.5
# Seconds the front takes for a sentence, before one measures it; and how fast measurements move it.
_FRONT_SECS = 0.05
_SMOOTHING = 0.3
# Held audio waits for more text at least this long (longer on a slow CPU: _starved_after).
_TEXT_STARVED_SECS = 0.3

# How often a model call in progress checks whether its reply was interrupted.
_POLL_SECS = 0.05

T = TypeVar("T")


class _Dropped(Exception):
    """The reply a model call was for has been interrupted."""


def _pause_after(text: str) -> float:
    """Seconds of silence before the piece that follows ``text`` in a reply (none after none)."""
    return pause_after(text, _SENTENCE_PAUSE_SECS, _CLAUSE_PAUSE_SECS) if text else 0.0


def trim_leading_silence(audio: np.ndarray, *, sample_rate: int) -> np.ndarray:
    """Drop the silence Kokoro puts before speech: it is pure added latency."""
    loud = np.flatnonzero(np.abs(audio) > _ONSET_THRESHOLD)
    if loud.size == 0:
        return audio[:0]
    start = max(0, int(loud[0]) - int(_ONSET_KEEP_SECS * sample_rate))
    return audio[start:]


def word_times(text: str, starts: list[float], *, offset: float, duration: float) -> list[tuple[str, float]]:
    """When each word of ``text`` starts, in seconds from the reply's first audio.

    ``starts`` are the word starts the model's durations give (one per phonemized
    word); when their count matches the text's words they are exact. Otherwise
    (numbers spoken as several words, say) words are spread over the audio by length.
    """
    words = text.split()
    if not words:
        return []
    if len(starts) != len(words):
        total = sum(len(w) + 1 for w in words)
        starts, acc = [], 0
        for w in words:
            starts.append(duration * acc / total)
            acc += len(w) + 1
    return [(w, offset + max(0.0, s)) for w, s in zip(words, starts)]


@dataclass
class _Sentence:
    text: str
    context_id: str


@dataclass
class _ReplyEnd:
    context_id: str


@dataclass
class _Reply:
    """One reply's playout: audio held before it starts, and when what was sent runs out."""

    context_id: str
    waiting_since: float = field(default_factory=time.monotonic)
    spoken_secs: float = 0.0  # audio made so far: word times count from the reply's first audio
    spoken_text: str = ""  # the last piece of text begun: the pause before the next follows from it
    held: list[TTSAudioRawFrame] = field(default_factory=list)
    held_secs: float = 0.0
    playing: bool = False
    play_end: float = 0.0  # time.monotonic() at which the audio sent so far has played out
    paused_at: float | None = None  # the output holds the audio (the user may be barging in)
    resume_by: float = 0.0  # ...and plays on by itself by then
    gain: float = 1.0
    holes: list[float] = field(default_factory=list)
    compute_secs: float = 0.0  # model time spent on it: wasted if it is a preemptive reply cancelled
    decoding: ChunkedDecoding | None = None
    resampler: soxr.ResampleStream | None = None
    release_timer: asyncio.Task | None = None  # plays what is held once the user's pause is over

    def ahead(self, now: float) -> float:
        """Seconds of audio the listener has before running dry."""
        if not self.playing:
            return self.held_secs
        if self.paused_at is not None:
            now = min(now, self.paused_at)  # the output holds it: none of it is playing out
        return max(0.0, self.play_end - now)


class KokoroTTSService(TTSService):
    """Speaks each reply with a shared, already loaded Kokoro, streamed and paced.

    Word timestamps go to pipecat so the assistant context keeps only the words
    that were played when the user interrupts.
    """

    def __init__(
        self,
        *,
        kokoro: KokoroStream,
        budget: ComputeBudget,
        speed_model: SynthesisSpeed,
        voice: str,
        lang: str = "en-us",
        speed: float = 1.0,
        peak_limit: float = 0.95,
        first_clause_words: tuple[int, int] | None = (2, 4),
        first_chunk_frames: int = 16,
        min_chunk_frames: int = 12,
        max_buffer_secs: float = 30.0,
        **kwargs,
    ):
        """Initialize the service.

        Args:
            kokoro: The split Kokoro model, shared across sessions.
            budget: The process's compute order, shared across sessions.
            speed_model: This machine's measured synthesis speed, shared and kept current.
            voice: A voice name present in the model's voices file.
            lang: The espeak-ng language used to phonemize text.
            speed: Speech rate multiplier.
            peak_limit: Peaks above this (full scale = 1) are scaled down; some
                voices clip otherwise.
            first_clause_words: (min, max) words of a reply's first chunk of text,
                spoken before its first sentence is complete; None waits for the sentence.
            first_chunk_frames: Decoder frames (25 ms each) of the shortest first audio
                a waiting listener gets; the first chunk is a multiple of it, or the whole
                sentence, whichever is predicted to start the reply soonest without a hole.
            min_chunk_frames: The shortest chunk decoded on its own.
            max_buffer_secs: The longest a reply's start is held while synthesis
                slower than real time buffers it; past this it plays, and may pause
                between sentences.
            **kwargs: Passed to ``TTSService``.
        """
        if voice not in kokoro.voices:
            raise ValueError(
                f"tts.voice '{voice}' is not in the voices file; choose one of {sorted(kokoro.voices)}"
            )
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            push_text_frames=False,
            settings=TTSSettings(model="kokoro-82m", voice=voice, language=lang),
            **kwargs,
        )
        if first_clause_words:
            # pipecat has no constructor argument for the aggregator; it is this one attribute.
            self._text_aggregator = FirstClauseAggregator(
                min_words=first_clause_words[0],
                max_words=first_clause_words[1],
                aggregation_type=TextType.SENTENCE,
                language=self._text_aggregator.language,
            )
        self._kokoro = kokoro
        self._budget = budget
        self._speed_model = speed_model
        self._voice = voice
        self._lang = lang
        self._speed = speed
        self._peak_limit = peak_limit
        self._first_chunk_frames = first_chunk_frames
        self._min_chunk_frames = min_chunk_frames
        self._max_buffer_secs = max_buffer_secs
        self._frames_per_char = _FRAMES_PER_CHAR
        self._front_secs = _FRONT_SECS
        self._jobs: deque[_Sentence | _ReplyEnd] = deque()
        self._jobs_changed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._replies: dict[str, _Reply] = {}
        self._loop_task: asyncio.Task | None = None
        self._speculation = SpeculationGate(name=f"{self}::SpeculationGate")
        self._speculative_context: str | None = None  # the preemptive reply's audio context
        self._speculation_settled = asyncio.Event()
        self._not_before = 0.0  # the next reply's first audio waits for this (ReplyNotBeforeFrame)

    def can_generate_metrics(self) -> bool:
        return True

    # --- pipecat's side: text in, audio contexts out ----------------------------------

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Queue a sentence for the synthesis task; its audio joins the context as it is made."""
        text = text.strip()
        if text:
            await self.start_tts_usage_metrics(text)
            self._queue(_Sentence(text=text, context_id=context_id))
        return
        yield  # an async generator that yields nothing: the audio arrives through the context

    async def on_turn_context_completed(self):
        # The reply's text is all queued: once spoken, its context ends with a stop frame.
        context_id = self._turn_context_id
        if context_id and self.audio_context_available(context_id):
            self._queue(_ReplyEnd(context_id=context_id))
        await super().on_turn_context_completed()

    async def on_audio_context_interrupted(self, context_id: str):
        # Queued sentences of this context are skipped; a chunk being decoded is dropped.
        self._replies.pop(context_id, None)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        speculative = self._speculative_reply()
        if isinstance(frame, EndFrame):
            # A graceful end lets the last words be spoken (a farewell is not cut off).
            await self._idle.wait()
        elif isinstance(frame, PausePlaybackFrame):
            self._hold_playout(max_secs=frame.max_secs)
        elif isinstance(frame, ResumePlaybackFrame):
            self._resume_playout(after_secs=frame.after_secs)
        elif isinstance(frame, SpeculativeReplyFrame):
            # Unless the turn already ended (its frame overtakes queued ones): then it is no speculation.
            self._speculation.begin_speculation(True)
        elif isinstance(frame, EagerEndOfTurnCancelFrame) and self._speculation.is_speculating:
            await self._drop_speculation(direction)
        elif isinstance(frame, UserStoppedSpeakingFrame) and speculative is not None:
            speculative.waiting_since = time.monotonic()  # the listener waits from now
        elif isinstance(frame, ReplyNotBeforeFrame):
            self._not_before = frame.at
            return
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMFullResponseStartFrame) and self._speculation.is_speculating:
            self._speculative_context = self._turn_context_id
        if isinstance(frame, (UserStoppedSpeakingFrame, EagerEndOfTurnCancelFrame, InterruptionFrame)):
            self._speculation_settled.set()

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM):
        # Nothing of a preemptive reply leaves before its turn is confirmed, as in pipecat's LLMService.
        for gated, gated_direction in self._speculation.process(frame, direction):
            await super().push_frame(gated, gated_direction)

    def _speculative_reply(self) -> _Reply | None:
        if self._speculation.is_speculating and self._speculative_context:
            return self._replies.get(self._speculative_context)
        return None

    def _is_speculative(self, reply: _Reply) -> bool:
        return self._speculation.is_speculating and reply.context_id == self._speculative_context

    async def _drop_speculation(self, direction: FrameDirection):
        """The turn went on, or its words changed: the preemptive reply is never heard."""
        context_id, self._speculative_context = self._speculative_context, None
        reply = self._replies.pop(context_id, None) if context_id else None  # stops a decode in progress
        self._jobs = deque(job for job in self._jobs if job.context_id != context_id)
        await self._start_interruption()  # its text still queued here goes too
        await self._handle_interruption(InterruptionFrame(), direction)
        wasted = reply.compute_secs if reply else 0.0
        logger.debug(f"{self}: preemptive reply dropped after {wasted:.2f}s of synthesis")
        await self.push_frame(PreemptionWasteFrame(synthesis_secs=wasted))

    async def _until_confirmed(self, reply: _Reply):
        """A preemptive reply waits for its turn once it holds enough to start at once then.

        Until then it is made on (after all other speech), as far as a confirmed reply
        is held before it starts: its confirmation then costs no synthesis. Stopping at
        the first chunk made a preemptive reply start later than a plain one.
        """
        if not self._is_speculative(reply) or not self._could_start(reply):
            return
        while self._is_speculative(reply):
            self._speculation_settled.clear()
            self._keep_alive()
            try:
                await asyncio.wait_for(self._speculation_settled.wait(), timeout=_TEXT_STARVED_SECS)
            except TimeoutError:
                pass
        if not self._current(reply):
            raise _Dropped()
        if reply.held and self._may_start(reply):
            await self._release_when_due(reply)

    def _hold_playout(self, *, max_secs: float) -> None:
        """The output holds the audio (the user may be barging in): nothing runs dry meanwhile."""
        now = time.monotonic()
        for reply in self._replies.values():
            if reply.playing and reply.paused_at is None:
                reply.paused_at = now
            reply.resume_by = now + max_secs

    def _resume_playout(self, *, after_secs: float) -> None:
        """The output plays on: the audio sent plays out later by however long it was held."""
        for reply in self._replies.values():
            if reply.paused_at is not None:
                resumed = min(time.monotonic() + after_secs, reply.resume_by)
                reply.play_end += max(0.0, resumed - reply.paused_at)
                reply.paused_at = None

    async def cleanup(self):
        if self._loop_task:
            await self.cancel_task(self._loop_task)
            self._loop_task = None
        await super().cleanup()

    def _queue(self, job: _Sentence | _ReplyEnd) -> None:
        self._jobs.append(job)
        self._idle.clear()
        self._jobs_changed.set()
        if self._loop_task is None:
            self._loop_task = self.create_task(self._synthesis_loop())

    # --- the synthesis task ------------------------------------------------------------

    async def _synthesis_loop(self):
        while True:
            job = await self._next_job()
            reply = self._reply(job.context_id)
            if reply is None:
                continue  # interrupted
            try:
                if reply.held:
                    await self._until_confirmed(reply)
                if isinstance(job, _ReplyEnd):
                    await self._end_reply(reply)
                else:
                    await self._speak(job.text, reply)
            except asyncio.CancelledError:
                raise
            except _Dropped:
                pass
            except Exception as e:
                logger.exception(f"{self}: synthesis failed for {job}")
                await self.append_to_audio_context(job.context_id, ErrorFrame(error=f"Kokoro TTS failed: {e}"))
                # The rest of the reply goes on; the page says what could not be said.
                await self.push_frame(FaultNoticeFrame(message=f"part of the reply could not be spoken: {e}"))

    async def _next_job(self) -> _Sentence | _ReplyEnd:
        """The next job; meanwhile keep open replies alive, and release held audio starved of text."""
        idle_since = time.monotonic()
        while not self._jobs:
            self._idle.set()
            self._jobs_changed.clear()
            starved = time.monotonic() - idle_since >= self._starved_after()
            self._keep_alive()
            for reply in list(self._replies.values()):
                if reply.held and starved and not self._is_speculative(reply):
                    await self._release_when_due(reply)  # the text, not synthesis, is what is late
            try:
                await asyncio.wait_for(self._jobs_changed.wait(), timeout=_TEXT_STARVED_SECS)
            except TimeoutError:
                pass
        return self._jobs.popleft()

    def _starved_after(self) -> float:
        """How long held audio waits for text before playing: as long as that text's speech takes to make.

        Text later than that is the bottleneck, and holding audio for it only adds silence.
        A language model catching up after yielding the cores to the reply's first chunk is
        not: measured on a 2-core Xeon with synthesis 2.5x slowed, its next clause came 0.38 s
        after that chunk, and a 0.3 s wait started the reply on 1.2 s of audio, then a hole.
        """
        return max(_TEXT_STARVED_SECS, self._speed_model.predict(_UNSEEN_SPEECH_FRAMES))

    def _keep_alive(self) -> None:
        """Tell pipecat every context still to be spoken is in use, the queued ones too.

        pipecat ends an audio context that gets no audio for ``stop_frame_timeout_s``
        (3 s); a reply queued behind a long one, or held to buffer, waits longer.
        """
        for context_id in {job.context_id for job in self._jobs} | set(self._replies):
            if self.audio_context_available(context_id):
                self._refresh_audio_context(context_id)

    def _reply(self, context_id: str) -> _Reply | None:
        if not self.audio_context_available(context_id):
            self._replies.pop(context_id, None)
            return None
        if context_id not in self._replies:
            self._replies[context_id] = _Reply(context_id=context_id)
        return self._replies[context_id]

    def _current(self, reply: _Reply) -> bool:
        """Whether the reply still plays (an interruption drops it)."""
        return self._replies.get(reply.context_id) is reply

    async def _speak(self, text: str, reply: _Reply):
        pause = _pause_after(reply.spoken_text)
        reply.spoken_text = text
        if pause and reply.spoken_secs:
            # Sent before the piece is made: it is audio in hand while the piece is synthesized.
            await self._emit(np.zeros(int(pause * KOKORO_SAMPLE_RATE), dtype=np.float32), reply)
            reply.spoken_secs += pause
        analyze = functools.partial(self._kokoro.analyze_all, voice=self._voice, speed=self._speed, lang=self._lang)
        utterances, secs = await self._compute(
            lambda options: self._timed(functools.partial(analyze, run_options=options), text),
            reply,
            cost=self._front_secs * _SAFETY,
        )
        self._front_secs += _SMOOTHING * (secs - self._front_secs)
        frames = sum(u.frames for u in utterances)
        self._frames_per_char += _SMOOTHING * (frames / max(1, len(text)) - self._frames_per_char)
        for i, utterance in enumerate(utterances):
            if not self._current(reply):
                return
            # A text too long for one pass (rare: over 500 phonemes) has its words timed by its first piece.
            await self._decode(text if i == 0 else "", utterance, reply)

    async def _decode(self, text: str, utterance: Utterance, reply: _Reply):
        decoding = reply.decoding = ChunkedDecoding(self._kokoro, utterance, min_chunk_frames=self._min_chunk_frames)
        first = True
        while not decoding.done:
            if reply.held:
                await self._until_confirmed(reply)
            frames = self._chunk_frames(decoding, reply)
            decoded = decoding.frames_decoded_for(frames)
            audio, secs = await self._compute(
                lambda options: self._timed(functools.partial(decoding.next, run_options=options), frames),
                reply,
                cost=self._speed_model.predict(decoded) * _SAFETY,
            )
            self._speed_model.observe(frames=decoded, secs=secs)
            logger.trace(
                f"{self}: decoded {decoded} frames in {secs:.2f}s"
                f" ({'playing' if reply.playing else f'held {reply.held_secs:.2f}s'})"
            )
            if not self._current(reply):
                return
            if first:
                audio = await self._start_sentence(text, utterance, audio, reply)
                first = False
            await self._emit(audio, reply)
        reply.decoding = None

    async def _start_sentence(self, text: str, utterance, audio: np.ndarray, reply: _Reply) -> np.ndarray:
        """Trim a reply's leading silence and place the sentence's words in time."""
        shift = 0.0
        if reply.spoken_secs == 0.0:
            # Only the reply's first sentence: later leading silence is a natural pause.
            before = len(audio)
            audio = trim_leading_silence(audio, sample_rate=KOKORO_SAMPLE_RATE)
            shift = (before - len(audio)) / KOKORO_SAMPLE_RATE
        duration = utterance.seconds - shift
        starts = [s - shift for s in utterance.word_starts]
        await self.add_word_timestamps(
            word_times(text, starts, offset=reply.spoken_secs, duration=duration), reply.context_id
        )
        reply.spoken_secs += duration
        return audio

    @staticmethod
    def _timed(fn: Callable[..., T], *args) -> tuple[T, float]:
        """``fn(*args)`` and the seconds it took, without the wait for its turn."""
        start = time.perf_counter()
        return fn(*args), time.perf_counter() - start

    async def _compute(self, fn: Callable[[ort.RunOptions], T], reply: _Reply, *, cost: float) -> T:
        """Run a model call in a worker thread, in its turn, keeping the audio contexts alive.

        ``fn`` passes its ``RunOptions`` to ONNX Runtime: terminating them stops it. A
        speculative reply's call stopped for another listener's audio is made again,
        in its new turn (the reply may have been confirmed meanwhile).

        Raises:
            _Dropped: The reply was interrupted meanwhile; its call was stopped.
        """
        while True:
            try:
                return await self._compute_once(fn, reply, cost=cost)
            except Preempted:
                logger.debug(f"{self}: a speculative piece gave way to another listener's audio")
                if not self._current(reply):
                    raise _Dropped()

    async def _compute_once(self, fn: Callable[[ort.RunOptions], T], reply: _Reply, *, cost: float) -> T:
        options = ort.RunOptions()
        deadline, urgent = self._priority(reply)

        def abort() -> None:
            options.terminate = True

        def run() -> T:
            with self._budget.speech(deadline=deadline, urgent=urgent, cost=cost, abort=abort):
                start = time.perf_counter()
                try:
                    return fn(options)
                finally:
                    reply.compute_secs += time.perf_counter() - start

        task = asyncio.ensure_future(asyncio.to_thread(run))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=min(_POLL_SECS, self._until_cap(reply) or _POLL_SECS))
                if not self._current(reply):
                    raise _Dropped()
                self._keep_alive()
                if reply.held and self._until_cap(reply) == 0.0 and not self._is_speculative(reply):
                    await self._release(reply)  # buffered long enough: play, even if a gap may follow
            return task.result()
        finally:
            if not task.done():
                abort()  # the next reply gets the cores now, not when this call would be done
            task.cancel()

    def _priority(self, reply: _Reply) -> tuple[float, bool]:
        """The reply's next piece's playback deadline, and whether its listener is about to wait."""
        now = time.monotonic()
        if self._is_speculative(reply):
            return float("inf"), False  # nobody waits for it yet: after all other speech
        if reply.playing or reply.held:
            # Audio in hand: urgent only when it is about to run out (held audio is
            # buffering on purpose, and the rest of the reply's text may be needed).
            ahead = reply.ahead(now)
            urgent = reply.playing and ahead < _URGENT_AHEAD_SECS + self._speed_model.predict(self._min_chunk_frames)
            return now + ahead, urgent
        return reply.waiting_since, True  # the listener waits for the first sound

    def _chunk_frames(self, decoding: ChunkedDecoding, reply: _Reply) -> int | None:
        """How many frames to decode next; None for all that is left, the cheapest way."""
        rest, begun = decoding.remaining, decoding.position > 0
        if not reply.playing and not reply.held:
            frames = self._first_chunk(rest, reply)  # the listener is waiting for the first sound
        elif not reply.playing:
            frames = self._chunk_to_start(rest, reply, buffered=reply.held_secs, begun=begun)
        else:
            ahead = reply.ahead(time.monotonic())
            frames = self._playing_chunk(rest, ahead, begun=begun)
            if frames is None:
                # Behind: a gap comes whatever is decoded. Make it one short gap, not a
                # run of small chunks each slower than real time.
                frames = self._chunk_to_start(rest, reply, buffered=ahead, begun=begun)
        return None if frames >= rest else frames

    def _cost(self, frames: int, *, first: bool, last: bool) -> float:
        """Predicted seconds to decode a chunk of ``frames`` speech frames, with its context."""
        decoded = frames + self._kokoro.overhead_frames(first=first, last=last)
        return self._speed_model.predict(decoded) * _SAFETY

    def _first_chunk(self, rest: int, reply: _Reply) -> int:
        """The first chunk after which the reply can start soonest and play on without a hole.

        A short first chunk sounds sooner but adds context to decode, which a CPU near
        real time must then buffer for: on such a CPU the whole first sentence may be
        the soonest start.
        """
        later = self._pending_frames(reply)
        sizes = [*range(self._first_chunk_frames, rest - self._min_chunk_frames + 1, self._first_chunk_frames), rest]
        best, soonest = rest, float("inf")
        for frames in reversed(sizes):  # ties go to the larger chunk: less compute
            start = self._start_after(frames, rest - frames, later)
            if start < soonest - _HOLE_TOLERANCE_SECS:
                best, soonest = frames, start
        return best

    def _start_after(self, first: int, rest: int, later: list[tuple[int, float]]) -> float:
        """Seconds until a reply whose first chunk is ``first`` frames can start, then play through.

        The rest of each sentence is decoded in one piece, the cheapest way.
        """
        ready = self._cost(first, first=True, last=rest == 0)
        start, audio = ready, first * FRAME_SECS
        pieces = ([(rest, 0.0, False)] if rest else []) + [(frames, pause, True) for frames, pause in later]
        for frames, pause, fresh in pieces:
            audio += pause
            ready += self._cost(frames, first=fresh, last=True) + (self._front_secs if fresh else 0.0)
            start = max(start, ready - audio - _HOLE_TOLERANCE_SECS)
            audio += frames * FRAME_SECS
        return start

    def _playing_chunk(self, rest: int, ahead: float, *, begun: bool) -> int | None:
        """While the reply plays: all the rest if it is ready in time, else the most that is.

        None when no chunk ready in time plays longer than it takes to make: cutting
        would only fall further behind.
        """
        if self._cost(rest, first=not begun, last=True) <= ahead:
            return rest
        context = self._kokoro.overhead_frames(first=not begun, last=False)
        frames = self._speed_model.frames_within(ahead / _SAFETY) - context
        if frames < self._min_chunk_frames or frames * FRAME_SECS <= self._cost(frames, first=not begun, last=False):
            return None
        return rest if rest - frames < self._min_chunk_frames else frames

    def _chunk_to_start(self, rest: int, reply: _Reply, *, buffered: float, begun: bool) -> int:
        """The smallest chunk after which the reply, with ``buffered`` seconds in hand, never runs dry.

        Where none would do, as much as is ready when a hold must end (``max_buffer_secs``).
        """
        later = self._pending_frames(reply)
        if self._plays_through(buffered + rest * FRAME_SECS, later):
            lo, hi = self._min_chunk_frames, rest
            while lo < hi:
                mid = (lo + hi) // 2
                if self._plays_through(buffered + mid * FRAME_SECS, later, current=rest - mid):
                    hi = mid
                else:
                    lo = mid + 1
            return lo
        if reply.playing:
            return rest  # the gap is coming anyway: the whole rest, the cheapest way
        context = self._kokoro.overhead_frames(first=not begun, last=False)
        return max(self._min_chunk_frames, self._speed_model.frames_within(self._until_cap(reply) / _SAFETY) - context)

    def _until_cap(self, reply: _Reply) -> float:
        """Seconds left before a held reply must start playing."""
        return max(0.0, reply.waiting_since + self._max_buffer_secs - time.monotonic())

    def _pending_frames(self, reply: _Reply) -> list[tuple[int, float]]:
        """The reply's queued sentences, and more while it is written: speech frames (estimated)
        and the pause before each."""
        pending, ended, before = [], False, reply.spoken_text
        for job in self._jobs:
            if job.context_id != reply.context_id:
                continue
            if isinstance(job, _ReplyEnd):
                ended = True
            else:
                pending.append((int(len(job.text) * self._frames_per_char), _pause_after(before)))
                before = job.text
        return pending if ended else [*pending, (_UNSEEN_SPEECH_FRAMES, _pause_after(before))]

    def _plays_through(self, buffered: float, later: list[tuple[int, float]], *, current: int = 0) -> bool:
        """Whether, starting now with ``buffered`` seconds, the reply's speech never runs dry.

        Plays the reply forward with the chunking used while playing: each chunk must
        be decoded before the audio ahead of it has played out. ``current`` frames are
        left of the sentence being decoded; ``later`` sentences are still to be analyzed.
        """
        pieces = ([(current, 0.0, True)] if current else []) + [(frames, pause, False) for frames, pause in later]
        for rest, pause, begun in pieces:
            buffered += pause
            cost = 0.0 if begun else self._front_secs
            while rest > 0:
                frames = self._playing_chunk(rest, buffered - cost, begun=begun)
                if frames is None:
                    return False
                cost += self._cost(frames, first=not begun, last=frames >= rest)
                if cost > buffered + _HOLE_TOLERANCE_SECS:
                    return False
                buffered += frames * FRAME_SECS - cost
                rest, begun, cost = rest - frames, True, 0.0
        return True

    # --- playout: hold, release, hand to pipecat -----------------------------------------

    async def _emit(self, audio: np.ndarray, reply: _Reply):
        """Limit, convert and send (or hold) a chunk of the reply's audio."""
        audio = self._limit(audio, reply)
        if self.sample_rate != KOKORO_SAMPLE_RATE:
            if reply.resampler is None:
                # A stream resampler keeps its filter state across chunks: no click at the joins.
                reply.resampler = soxr.ResampleStream(KOKORO_SAMPLE_RATE, self.sample_rate, 1, dtype="float32")
            audio = reply.resampler.resample_chunk(audio)
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
        step = int(self.sample_rate * _CHUNK_SECS) * 2
        frames = [
            TTSAudioRawFrame(audio=pcm[i : i + step], sample_rate=self.sample_rate, num_channels=1, context_id=reply.context_id)
            for i in range(0, len(pcm), step)
        ]
        secs = len(pcm) / 2 / self.sample_rate
        if reply.playing:
            await self._send(frames, secs, reply)
            return
        reply.held += frames
        reply.held_secs += secs
        if self._may_start(reply):
            await self._release_when_due(reply)

    def _limit(self, audio: np.ndarray, reply: _Reply) -> np.ndarray:
        """Scale the reply down once a peak would pass the limit; the gain only ever falls."""
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        gain = min(reply.gain, self._peak_limit / peak) if peak > 0 else reply.gain
        if gain < reply.gain:
            # A ramp over 10 ms, so the step in level is no click; it starts no higher than
            # the ramp's own samples allow, so no peak inside it passes the limit either.
            ramp = np.full(len(audio), gain, dtype=np.float32)
            n = min(len(audio), int(0.01 * KOKORO_SAMPLE_RATE))
            start = min(reply.gain, self._peak_limit / max(float(np.max(np.abs(audio[:n]))), 1e-9))
            ramp[:n] = np.linspace(start, gain, n, dtype=np.float32)
            reply.gain = gain
            return audio * ramp
        return audio * gain if gain != 1.0 else audio

    def _may_start(self, reply: _Reply) -> bool:
        """Whether the held audio may play: its turn is over, and it could start."""
        return not self._is_speculative(reply) and self._could_start(reply)

    def _could_start(self, reply: _Reply) -> bool:
        """Whether the held audio covers what is still to be made, at this machine's speed."""
        if self._until_cap(reply) == 0.0:
            return True
        decoding = reply.decoding
        current = decoding.remaining if decoding is not None else 0
        return self._plays_through(reply.held_secs, self._pending_frames(reply), current=current)

    async def _release_when_due(self, reply: _Reply):
        """Start playing what was held now, or once the user's pause is long enough."""
        wait = self._not_before - time.monotonic()
        if wait <= 0:
            await self._release(reply)
        elif reply.release_timer is None:
            reply.release_timer = self.create_task(self._release_after(reply, wait))

    async def _release_after(self, reply: _Reply, wait: float):
        await asyncio.sleep(wait)
        reply.release_timer = None
        if self._current(reply) and reply.held and not reply.playing:
            await self._release(reply)

    async def _release(self, reply: _Reply):
        """Start playing what was held."""
        held, secs = reply.held, reply.held_secs
        reply.held, reply.held_secs, reply.playing = [], 0.0, True
        waited = time.monotonic() - reply.waiting_since
        later = self._pending_frames(reply)
        logger.debug(
            f"{self}: reply starts with {secs:.2f}s buffered after {waited:.2f}s of synthesis"
            f" ({sum(frames for frames, _ in later) * FRAME_SECS:.1f}s of speech estimated still to make)"
        )
        await self._send(held, secs, reply)

    async def _send(self, frames: list[TTSAudioRawFrame], secs: float, reply: _Reply):
        now = time.monotonic()
        if reply.paused_at is None and reply.play_end and now > reply.play_end + _HOLE_TOLERANCE_SECS:
            reply.holes.append(now - reply.play_end)
            logger.debug(f"{self}: synthesis fell {now - reply.play_end:.2f}s behind playback")
        reply.play_end = max(now, reply.play_end) + secs
        for frame in frames:
            await self.append_to_audio_context(reply.context_id, frame)

    async def _end_reply(self, reply: _Reply):
        if reply.held:
            await self._release_when_due(reply)
            if reply.release_timer is not None:
                await reply.release_timer  # the rest (the resampler's tail) follows what was held
            if not self._current(reply):
                return
        if reply.resampler is not None:
            tail = reply.resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            if tail.size:
                pcm = (np.clip(tail, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
                await self._send(
                    [TTSAudioRawFrame(audio=pcm, sample_rate=self.sample_rate, num_channels=1, context_id=reply.context_id)],
                    len(pcm) / 2 / self.sample_rate,
                    reply,
                )
        self._replies.pop(reply.context_id, None)
        await self.append_to_audio_context(reply.context_id, TTSStoppedFrame(context_id=reply.context_id))
        await self.remove_audio_context(reply.context_id)
