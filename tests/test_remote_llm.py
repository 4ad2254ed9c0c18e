"""The OpenAI-API language model, against a loopback server that streams chat completions
as vLLM and llama.cpp's server do, or fails as a real one can: down, erroring, stalled,
sending garbage or nothing."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from aiohttp import web

from pipecat.frames.frames import ErrorFrame, LLMContextFrame, LLMTextFrame
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.tests.utils import run_test

from bot.conversation import run_conversation
from processors.apology import APOLOGY, CUT_SHORT, FaultNoticeFrame
from processors.openai_llm import RemoteLLMService
from tests.live_server import serve as serve_bot
from tests.loopback_http import serve_routes
from tests.test_faults import FIRST, SECOND, Notices, _assert_apology_then_answer
from transports.scripted import Cue

ANSWER = ["The capital", " of France", " is Paris."]
TIMEOUT_S = 0.5


class FakeOpenAI:
    """``POST /v1/chat/completions`` streamed as server-sent events, each request answered as scripted.

    ``answers`` is consumed in order: "ok", "error" (HTTP 500), "hang" (no byte in time),
    "stall" (the first words, then nothing), "garbage" (a 200 stream of what is not JSON),
    "empty" (a stream with no text) or "overflow" (vLLM's HTTP 400 for a prompt over its
    ``window``). With ``tokens_per_char`` a reply ends with the prompt's usage, as vLLM's does.
    """

    def __init__(self, answers: list[str], *, window: int = 1024, tokens_per_char: float | None = None):
        self.answers = list(answers)
        self.requests: list[dict] = []
        self.window = window
        self.tokens_per_char = tokens_per_char

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        answer = self.answers.pop(0) if self.answers else "ok"
        if answer == "error":
            return web.json_response({"error": {"message": "CUDA out of memory"}}, status=500)
        if answer == "overflow":
            message = (
                f"This model's maximum context length is {self.window} tokens. However, you requested"
                f" {self.window + 1000} tokens in the messages. Please reduce the length of the messages."
            )
            return web.json_response({"object": "error", "message": message, "type": "BadRequestError", "code": 400}, status=400)
        if answer == "hang":
            await asyncio.sleep(30)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if answer == "garbage":
            await response.write(b"data: {this is not json\n\n")
        elif answer in ("ok", "stall"):
            for text in ANSWER:
                await response.write(f"data: {json.dumps(_chunk(text))}\n\n".encode())
                if answer == "stall":
                    await asyncio.sleep(30)
            if self.tokens_per_char:
                prompt = round(_chars(self.requests[-1]["messages"]) * self.tokens_per_char)
                usage = {"prompt_tokens": prompt, "completion_tokens": 3, "total_tokens": prompt + 3}
                await response.write(f"data: {json.dumps({**_chunk(''), 'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


def _chunk(text: str) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}],
    }


def _chars(messages: list[dict]) -> int:
    return sum(len(m["content"]) for m in messages)


def serve(server: FakeOpenAI):
    """Run ``server`` on a free loopback port; yields its base URL."""
    return serve_routes([web.post("/v1/chat/completions", server.completions), web.get("/v1/models", server.models)])


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def _service(base_url: str, **kwargs) -> RemoteLLMService:
    return RemoteLLMService(
        base_url=base_url, api_key="sk-test", timeout_s=TIMEOUT_S,
        settings=RemoteLLMService.Settings(model="fake", max_tokens=100), **kwargs,
    )  # fmt: skip


async def _ask(base_url: str, *, llm: RemoteLLMService | None = None, context: LLMContext | None = None):
    llm = llm or _service(base_url)
    context = context or LLMContext(messages=[{"role": "user", "content": SECOND}])
    began = time.monotonic()
    down, up = await run_test(llm, frames_to_send=[LLMContextFrame(context)])
    text = "".join(f.text for f in down if isinstance(f, LLMTextFrame))
    notices = [f.message for f in down if isinstance(f, FaultNoticeFrame)]
    errors = [f.error for f in up if isinstance(f, ErrorFrame)]
    return text, notices, errors, time.monotonic() - began


async def test_a_reply_streams_from_the_server():
    server = FakeOpenAI(["ok"])
    async with serve(server) as url:
        text, notices, errors, _ = await _ask(url)
    assert text == "".join(ANSWER) and not notices and not errors
    assert server.requests[0]["stream"] is True and server.requests[0]["messages"][-1]["content"] == SECOND


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ("error", "answered HTTP 500"),
        ("hang", f"did not answer within {TIMEOUT_S} s"),
        ("garbage", "could not be read"),
        ("empty", "sent no reply text"),
        ("down", "is unreachable"),
    ],
)
async def test_a_failing_server_costs_one_apology_within_the_timeout(answer, says):
    if answer == "down":
        text, notices, errors, secs = await _ask(_closed_port_url())
    else:
        server = FakeOpenAI([answer])
        async with serve(server) as url:
            text, notices, errors, secs = await _ask(url)
        assert len(server.requests) == 1  # no retry the user would wait through
    assert text == APOLOGY
    assert len(errors) == 1 and says in errors[0], errors
    assert len(notices) == 1 and says in notices[0], notices
    assert secs < TIMEOUT_S + 3


async def test_a_server_that_stalls_mid_reply_is_cut_short_within_the_timeout():
    server = FakeOpenAI(["stall"])
    async with serve(server) as url:
        text, notices, errors, secs = await _ask(url)
    assert text == ANSWER[0] + CUT_SHORT
    assert len(errors) == 1 and f"did not answer within {TIMEOUT_S} s" in errors[0], errors
    assert secs < TIMEOUT_S + 3


def _long_conversation(exchanges: int) -> LLMContext:
    """``exchanges`` questions and answers of 300 characters each (about 75 tokens), then a question."""
    context = LLMContext()
    for i in range(exchanges):
        context.add_message({"role": "user", "content": f"Question {i}: " + "tell me more " * 23})
        context.add_message({"role": "assistant", "content": f"Answer {i}: " + "here is more " * 23})
    context.add_message({"role": "user", "content": SECOND})
    return context


def _assert_trimmed(request: dict, *, context: LLMContext, budget_tokens: int, tokens_per_char: float):
    sent = request["messages"]
    assert sent[-1]["content"] == SECOND  # the latest question is always sent
    assert sent[0]["role"] == "user" and sent[0]["content"].startswith("Question")  # whole exchanges
    assert len(sent) < len(context.messages)
    assert _chars(sent) * tokens_per_char <= budget_tokens, _chars(sent)


async def test_a_long_conversation_is_trimmed_to_the_servers_window():
    server = FakeOpenAI(["ok"])
    context = _long_conversation(40)  # ~6000 tokens
    async with serve(server) as url:
        text, notices, errors, _ = await _ask(url, llm=_service(url, context_window=1024), context=context)
    assert text == "".join(ANSWER) and not notices and not errors
    _assert_trimmed(server.requests[0], context=context, budget_tokens=1024 - 100, tokens_per_char=1 / 3)


async def test_a_prompt_the_server_refuses_as_too_long_is_trimmed_to_its_stated_window_and_retried_once():
    """The window configured (8192) is larger than the server's (1024): its HTTP 400 says so."""
    server = FakeOpenAI(["overflow", "ok"], window=1024)
    context = _long_conversation(30)
    async with serve(server) as url:
        text, notices, errors, _ = await _ask(url, llm=_service(url, context_window=8192), context=context)
    assert text == "".join(ANSWER) and not notices and not errors
    assert len(server.requests) == 2
    assert len(server.requests[0]["messages"]) == len(context.messages)  # ~6700 tokens fit 8192
    _assert_trimmed(server.requests[1], context=context, budget_tokens=1024 - 100, tokens_per_char=1 / 3)


async def test_a_server_that_refuses_the_trimmed_prompt_too_costs_one_apology():
    server = FakeOpenAI(["overflow", "overflow", "ok"], window=1024)
    async with serve(server) as url:
        text, notices, errors, _ = await _ask(url, llm=_service(url, context_window=8192), context=_long_conversation(40))
    assert len(server.requests) == 2  # retried once, not until the user gives up
    assert text == APOLOGY
    assert len(errors) == 1 and "answered HTTP 400" in errors[0], errors


async def test_the_servers_own_count_of_the_prompt_calibrates_the_trimming():
    """A tokenizer three times denser than the first guess: after one reply reports its usage,
    the next prompt is cut to what that tokenizer fits, before the server has to refuse it."""
    server = FakeOpenAI(["ok", "ok"], tokens_per_char=1.0)
    async with serve(server) as url:
        llm = _service(url, context_window=2048)
        await _ask(url, llm=llm, context=_long_conversation(1))
        context = _long_conversation(12)  # ~3900 chars: fits 2048 tokens at a third, not at one per char
        text, notices, errors, _ = await _ask(url, llm=llm, context=context)
    assert text == "".join(ANSWER) and not notices and not errors
    _assert_trimmed(server.requests[1], context=context, budget_tokens=2048 - 100, tokens_per_char=1.0)


async def test_in_a_conversation_the_failed_turn_is_an_apology_and_the_next_is_answered(base_config, models, speaker):
    server = FakeOpenAI(["garbage", "ok"])
    async with serve(server) as url:
        config = base_config.model_copy(deep=True)
        config.llm.engine = "openai"
        config.llm.openai.base_url = url
        config.llm.openai.timeout_s = 5
        notices = Notices()
        cues = [
            Cue(audio=speaker(FIRST), text=FIRST, at=0.5),
            Cue(audio=speaker(SECOND), text=SECOND, after_bot_done=0.8),
        ]
        result = await run_conversation(config=config, models=models, cues=cues, observers=[notices])
    _assert_apology_then_answer(result, notices, "could not be read")
    assert [t for t in result.turns if t.bot_text][1].bot_text.strip() == "".join(ANSWER)
    assert len(server.requests) == 2


async def test_ready_says_the_llm_server_is_down_until_it_is_up(base_config, models):
    config = base_config.model_copy(deep=True)
    config.llm.engine = "openai"
    config.llm.openai.base_url = down = _closed_port_url()
    with serve_bot(config, models=models) as host:
        async with httpx.AsyncClient(base_url=f"http://{host}", timeout=10) as http:
            ready = await http.get("/ready")
    assert ready.status_code == 503, ready.text
    assert ready.json()["error"].startswith(f"the LLM server at {down} is down"), ready.json()

    async with serve(FakeOpenAI([])) as url:
        config.llm.openai.base_url = url
        with serve_bot(config, models=models) as host:
            async with httpx.AsyncClient(base_url=f"http://{host}", timeout=10) as http:
                ready = await http.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
