"""The stock pipecat bot on the same models: the baseline `voxbot bench` compares against.

It is what a pipecat user would write from the examples: pipecat's own
WhisperSTTService and KokoroTTSService on the same model files, the same GGUF
served the usual way (llama-cpp-python's OpenAI-compatible server behind
OpenAILLMService), and pipecat's default turn strategies (smart-turn v3).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
from loguru import logger

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.services.kokoro.tts import KokoroTTSService
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.whisper.stt import WhisperSTTService

from bot import assets
from bot.config import Config
from bot.pipeline import BotSession


@contextmanager
def llama_server(config: Config, *, startup_timeout: float = 60.0):
    """Serve the configured GGUF with llama-cpp-python's server on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = assets.llm_gguf_path(config.llm.llama_cpp.model_path)
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(config.llm.llama_cpp.n_ctx), "--n_threads", str(config.llm.llama_cpp.n_threads),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            try:
                if httpx.get(f"{base_url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server did not start: {' '.join(cmd)}")
            time.sleep(0.2)
        logger.info(f"stock baseline: llama_cpp.server on {base_url}")
        yield base_url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def stock_builder(llm_base_url: str):
    """A `build` for bot.conversation.run_conversation that makes the stock bot."""

    def build(*, config: Config, models, transport, observers) -> BotSession:
        context = LLMContext()
        user, assistant = LLMContextAggregatorPair(
            context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())
        )
        stt = WhisperSTTService(
            model=str(assets.whisper_model_dir(config.stt.whisper.model_path)),
            device="cpu",
            compute_type=config.stt.whisper.compute_type,
        )
        llm = OpenAILLMService(
            base_url=llm_base_url,
            api_key="none",
            settings=OpenAILLMService.Settings(
                model="local",
                system_instruction=config.llm.system_prompt,
                max_tokens=config.llm.max_tokens,
                temperature=config.llm.temperature,
            ),
        )
        tts = KokoroTTSService(
            model_path=str(assets.kokoro_model_path(config.tts.model_path)),
            voices_path=str(assets.kokoro_voices_path(config.tts.voices_path)),
            settings=KokoroTTSService.Settings(voice=config.tts.voice),
        )
        pipeline = Pipeline(
            [transport.input(), stt, user, llm, tts, transport.output(), assistant]
        )
        worker = PipelineWorker(
            pipeline,
            params=PipelineParams(
                audio_in_sample_rate=config.audio.in_sample_rate,
                audio_out_sample_rate=config.audio.out_sample_rate,
                enable_metrics=True,
            ),
            observers=observers,
            enable_rtvi=False,
        )
        return BotSession(worker=worker, context=context, assistant=assistant)

    return build
