"""LlamaCppLLMService on the real SmolLM2 GGUF: streaming, sentence-bounded replies, barge-in."""

import asyncio
import re
import threading
import time

from pipecat.frames.frames import (
    ErrorFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import run_test

from processors.responder import _GRACE_TOKENS, SENTENCE_ENDS, LlamaCppLLMService, fit_window
from tests.live_pipeline import running

STORYTELLER = "You are a storyteller. Tell long, detailed stories with many characters."


def _context(question: str) -> LLMContext:
    return LLMContext(messages=[{"role": "user", "content": question}])


def _service(models, *, system_prompt: str, max_tokens: int, llm=None) -> LlamaCppLLMService:
    # temperature 0: greedy decoding, so a reply is reproducible across runs.
    return LlamaCppLLMService(
        llm=llm or models.llm,
        lock=models.llm_lock,
        system_prompt=system_prompt,
        max_tokens=max_tokens,
        temperature=0.0,
    )


async def _reply(service, question: str) -> tuple[str, list]:
    down, up = await run_test(service, frames_to_send=[LLMContextFrame(context=_context(question))])
    errors = [f for f in [*down, *up] if isinstance(f, ErrorFrame)]
    assert not errors, [f.error for f in errors]
    return "".join(f.text for f in down if isinstance(f, LLMTextFrame)), down


class CountingLlama:
    """The real model, with every token it generates counted and timed (a spy, not a fake)."""

    def __init__(self, llm):
        self._llm = llm
        self.calls = 0
        self.token_times: list[float] = []

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def create_chat_completion(self, **kwargs):
        self.calls += 1
        for chunk in self._llm.create_chat_completion(**kwargs):
            self.token_times.append(time.monotonic())
            yield chunk


class Recorder(FrameProcessor):
    """Keeps every downstream frame with its arrival time, and the lock's state at the interruption."""

    def __init__(self, lock):
        super().__init__()
        self._lock = lock
        self.frames: list[tuple[float, object]] = []
        self.first_text = asyncio.Event()
        self.interrupted = asyncio.Event()
        self.lock_held_at_interruption: bool | None = None

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append((time.monotonic(), frame))
            if isinstance(frame, LLMTextFrame):
                self.first_text.set()
            if isinstance(frame, InterruptionFrame):
                self.lock_held_at_interruption = self._lock.locked()
                self.interrupted.set()
        await self.push_frame(frame, direction)

    def after_interruption(self) -> list:
        kinds = [f for _, f in self.frames]
        i = next(i for i, f in enumerate(kinds) if isinstance(f, InterruptionFrame))
        return kinds[i + 1 :]


async def _lock_free_within(lock, seconds: float) -> float | None:
    """Seconds until ``lock`` could be taken (then released again), or None."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if lock.acquire(blocking=False):
            lock.release()
            return time.monotonic() - start
        await asyncio.sleep(0.002)
    return None


async def test_reply_streams_between_start_and_end_frames(base_config, models):
    """A user message becomes Start, tokens, End; the answer is complete and on topic."""
    service = _service(models, system_prompt=base_config.llm.system_prompt, max_tokens=48)

    text, down = await _reply(service, "What is the capital of France?")

    kinds = [type(f) for f in down if isinstance(f, (LLMFullResponseStartFrame, LLMTextFrame, LLMFullResponseEndFrame))]
    assert kinds[0] is LLMFullResponseStartFrame and kinds[-1] is LLMFullResponseEndFrame, kinds
    assert kinds.count(LLMFullResponseStartFrame) == kinds.count(LLMFullResponseEndFrame) == 1
    assert kinds.count(LLMTextFrame) >= 2, "the reply must stream token by token"
    assert "paris" in text.lower(), text
    assert text.rstrip().endswith(SENTENCE_ENDS), text
    assert not models.llm_lock.locked()


def _sentences(text: str) -> list[str]:
    return [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


async def test_the_default_reply_never_says_a_sentence_twice(base_config, models):
    """Greedy SmolLM2 loops on this question without llama.cpp's repeat penalty; the repeat
    guard cuts such a loop at its first repeat, and with the default penalty there is none."""
    question = "What should I cook for dinner tonight?"

    def raw() -> str:
        with models.llm_lock:
            return models.llm.create_chat_completion(
                messages=[{"role": "system", "content": base_config.llm.system_prompt}, {"role": "user", "content": question}],
                max_tokens=72, temperature=0.0, repeat_penalty=1.0,
            )["choices"][0]["message"]["content"]  # fmt: skip

    looped = await asyncio.to_thread(raw)
    guarded_service = LlamaCppLLMService(
        llm=models.llm, lock=models.llm_lock, system_prompt=base_config.llm.system_prompt,
        max_tokens=48, temperature=0.0, repeat_penalty=1.0,
    )  # fmt: skip
    guarded, _ = await _reply(guarded_service, question)
    said, _ = await _reply(_service(models, system_prompt=base_config.llm.system_prompt, max_tokens=48), question)

    assert len(set(_sentences(looped))) < len(_sentences(looped)), looped  # the model does loop
    for reply in (guarded, said):
        assert reply.strip() and len(set(_sentences(reply))) == len(_sentences(reply)), reply


async def test_capped_reply_is_short_and_ends_at_a_real_sentence_boundary(base_config, models):
    """max_tokens=5 cuts at the first sentence end past the cap, never inside "3.14"."""
    question = "What is pi to two decimal places?"
    full, _ = await _reply(
        _service(models, system_prompt=base_config.llm.system_prompt, max_tokens=200), question
    )
    capped, down = await _reply(
        _service(models, system_prompt=base_config.llm.system_prompt, max_tokens=5), question
    )

    tokens = sum(isinstance(f, LLMTextFrame) for f in down)
    assert 0 < tokens <= 5 + _GRACE_TOKENS + 1, (tokens, capped)
    assert capped.rstrip().endswith(SENTENCE_ENDS), capped
    # Greedy decoding: the capped reply is the uncapped one, stopped where a sentence ends,
    # i.e. its final mark is followed by a space or by nothing.
    assert full.startswith(capped), (capped, full)
    rest = full[len(capped) :]
    assert rest == "" or rest[0].isspace(), f"cut inside a sentence: {capped!r} | {rest!r}"


async def test_interruption_stops_the_generating_thread_at_the_next_token(models):
    """Barge-in: no CPU keeps burning on a dead reply, and the model is free for the next turn."""
    spy = CountingLlama(models.llm)
    service = _service(models, system_prompt=STORYTELLER, max_tokens=400, llm=spy)
    recorder = Recorder(models.llm_lock)
    async with running([service, recorder], end=True) as worker:
        await worker.queue_frame(LLMContextFrame(context=_context("Tell me a long story about a dragon and a knight.")))
        await asyncio.wait_for(recorder.first_text.wait(), 20)
        await asyncio.sleep(0.2)
        # Mid-generation: the reply has hundreds of tokens to go.
        assert models.llm_lock.locked()
        assert len(spy.token_times) < 300

        interrupted_at = time.monotonic()
        await worker.queue_frame(InterruptionFrame())
        freed_after = await _lock_free_within(models.llm_lock, 5.0)
        await asyncio.wait_for(recorder.interrupted.wait(), 5)
        passed_at = next(t for t, f in recorder.frames if isinstance(f, InterruptionFrame))
        await asyncio.sleep(0.3)

    # The interruption leaves the service only once the thread has stopped...
    assert recorder.lock_held_at_interruption is False
    assert [t for t in spy.token_times if t > passed_at] == []
    assert not [f for f in recorder.after_interruption() if isinstance(f, LLMTextFrame)]
    # ...and that happens at the thread's next token (about 10 ms), well within half a second.
    assert freed_after is not None and freed_after < 0.5, freed_after
    assert passed_at - interrupted_at < 0.5, passed_at - interrupted_at
    print(f"lock free {freed_after * 1000:.0f} ms, interruption through {(passed_at - interrupted_at) * 1000:.0f} ms")


async def test_interruption_while_waiting_for_the_shared_model_is_immediate(models):
    """Another session holds the model: a barge-in must not wait for that session's reply."""
    spy = CountingLlama(models.llm)
    service = _service(models, system_prompt=STORYTELLER, max_tokens=48, llm=spy)
    recorder = Recorder(models.llm_lock)
    models.llm_lock.acquire()  # another session is generating
    held = True
    try:
        async with running([service, recorder], end=True) as worker:
            await worker.queue_frame(LLMContextFrame(context=_context("Tell me a story.")))
            await asyncio.sleep(0.2)
            interrupted_at = time.monotonic()
            await worker.queue_frame(InterruptionFrame())
            await asyncio.wait_for(recorder.interrupted.wait(), 5)
            passed_after = time.monotonic() - interrupted_at

            models.llm_lock.release()  # the other session finishes
            held = False
            await asyncio.sleep(0.3)
            calls_after_release = spy.calls
    finally:
        if held:
            models.llm_lock.release()

    assert passed_after < 0.5, passed_after
    assert calls_after_release == 0, "the cancelled reply still ran once the model was free"
    assert not models.llm_lock.locked()


class PromptSpy:
    """The real model; each request's prompt is formatted by the model's own chat template
    (what llama.cpp evaluates) and its tokens counted."""

    def __init__(self, llm):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llm = llm
        self._format = Jinja2ChatFormatter(
            template=llm.metadata["tokenizer.chat_template"],
            eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
            bos_token=llm.detokenize([llm.token_bos()], special=True).decode(),
        )
        self.requests: list[tuple[list[dict], int]] = []  # (messages, prompt tokens)

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def create_chat_completion(self, *, messages, **kwargs):
        prompt = self._format(messages=messages).prompt
        self.requests.append((messages, len(self._llm.tokenize(prompt.encode(), add_bos=False, special=True))))
        return self._llm.create_chat_completion(messages=messages, **kwargs)


def test_the_window_keeps_the_system_prompt_and_the_latest_turns_whole():
    messages = [{"role": "system", "content": "s " * 10}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i} " * 10} for i in range(9)
    ]
    count = lambda text: len(text.split())  # noqa: E731  (a word a token)
    each = 10 + 8  # words and a message's template overhead
    # Four fit: six go, the oldest exchanges whole, so the first kept is a user message.
    assert fit_window(messages, count=count, budget=4 * each) == 6
    assert messages[1 + 6]["role"] == "user"
    # Dropping down to a target: room for the next turns.
    assert fit_window(messages, count=count, budget=4 * each, target=2 * each) == 8
    assert fit_window(messages, count=count, budget=100 * each) == 0
    # What an earlier turn left out stays out while the rest fits: the prompt begins the same.
    assert fit_window(messages, count=count, budget=100 * each, dropped=2) == 2
    # Too small even for the question: the question is still sent (llama.cpp says why it fails).
    assert fit_window(messages, count=count, budget=1) == 8


async def test_a_conversation_longer_than_the_window_is_answered_to_the_last_turn(base_config):
    """120 turns through the real SmolLM2 with a 512-token window (2048 by default: the same,
    four times slower), typed through the bot's context aggregators and responder (`voxbot
    chat`'s pipeline): every turn answered, every prompt the model's template makes fits."""
    from llama_cpp import Llama

    from bot import assets
    from bot.chat import ChatSession
    from bot.models import Models

    n_ctx, max_tokens = 512, 24
    spy = PromptSpy(Llama(model_path=str(assets.llm_gguf_path(None)), n_ctx=n_ctx, n_threads=2, verbose=False))
    config = base_config.model_copy(deep=True)
    config.llm.max_tokens, config.llm.temperature = max_tokens, 0.0
    models = Models(stt_engine="none", stt_reason="text only", llm=spy)
    topics = ["France", "the moon", "cats", "tea", "rain", "music", "Rome", "bread", "snow", "trains"]
    async with ChatSession(config=config, models=models) as session:
        for turn in range(120):
            reply = await session.ask(f"Tell me one thing about {topics[turn % len(topics)]}, please.")
            assert reply.fault is None and reply.reply.strip(), (turn, reply)
            assert reply.context_messages == 2 * (turn + 1)  # the window trims what is sent, not what is kept
        context = session.context

    assert len(spy.requests) == 120
    examples = [text for pair in config.llm.llama_cpp.examples for text in pair]
    head = 1 + len(examples)  # the system prompt and the example exchanges, always sent
    for messages, tokens in spy.requests:
        assert tokens + max_tokens + _GRACE_TOKENS <= n_ctx, tokens
        assert messages[0]["role"] == "system" and [m["content"] for m in messages[1:head]] == examples
        assert messages[head]["role"] == "user"
    last_messages, _ = spy.requests[-1]
    assert last_messages[-1] == context.messages[-2]  # the latest question is always sent
    assert len(last_messages) - head < len(context.messages) - 1  # older turns were dropped
    # Half the window is cleared at a time: where the prompt's beginning changed, it fell to
    # half the budget, so the next turns reuse it (one exchange at a time: every turn changes).
    budget = n_ctx - (max_tokens + _GRACE_TOKENS)
    beginnings = [messages[head]["content"] for messages, _ in spy.requests]
    changed = [i + 1 for i, (a, b) in enumerate(zip(beginnings, beginnings[1:])) if a != b]
    assert changed, beginnings
    assert all(spy.requests[i][1] <= budget // 2 for i in changed), [spy.requests[i][1] for i in changed]
    assert all(b - a >= 3 for a, b in zip(changed, changed[1:])), changed



class ScriptedLlama:
    """A model that says ``tokens`` whatever it is asked, in llama.cpp's streaming chunk format
    (what ``Llama.create_chat_completion(stream=True)`` yields), one every 20 ms as a model
    writes them; counts what was taken from it."""

    def __init__(self, tokens: list[str]):
        self._tokens = tokens
        self.taken = 0

    def n_ctx(self) -> int:
        return 2048

    def tokenize(self, text: bytes, **kwargs) -> list[int]:
        return list(range(len(text.split())))

    def create_chat_completion(self, **kwargs):
        for token in self._tokens:
            time.sleep(0.02)
            self.taken += 1
            yield {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "scripted",
                   "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]}  # fmt: skip


async def test_a_model_that_loops_through_the_penalty_is_stopped_before_its_first_repeat():
    looping = ["Sure", ".", " I", "'m", " so", " sorry", ".", " Try", " pasta", ".", *[" I", "'m", " so", " sorry", "."] * 6]
    llm = ScriptedLlama(looping)
    service = LlamaCppLLMService(llm=llm, lock=threading.Lock(), system_prompt="Be brief.", max_tokens=200, temperature=0.0)

    text, down = await _reply(service, "What should I cook for dinner tonight?")

    assert text == "Sure. I'm so sorry. Try pasta.", text
    # Generation stopped at the repeat's first token (the 21st), not only the speech.
    assert llm.taken <= 21 + 5, llm.taken  # a few more while the event loop reacts
    # The first sentence streamed token by token; the later ones went whole.
    pushed = [f.text for f in down if isinstance(f, LLMTextFrame)]
    assert pushed[:2] == ["Sure", "."] and " I'm so sorry." in pushed, pushed
