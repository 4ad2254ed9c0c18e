"""Past one machine, on loopback: two ``voxbot serve`` processes share one language model server.

The README's "Scaling out": the LLM is served once (here llama.cpp's own OpenAI-compatible
server over the bundled GGUF), and each bot process holds only the speech models and its
sessions. Real processes, real sockets, real models.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from bot.assets import llm_gguf_path
from tests.conftest import QUESTION
from tests.test_server import TIMEOUT, normalize, session

VOXBOT = Path(sys.executable).with_name("voxbot")
# Loading Whisper, Kokoro and measuring the CPU's synthesis speed, on a busy 2-core machine.
START_TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _process(args: list[str], *, ready: str, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Run ``args`` until the block ends (then SIGTERM), once ``ready`` answers 200."""
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, f"{args[:3]} exited with {proc.returncode}: {log.read_text()[-2000:]}"
            try:
                if httpx.get(ready, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{ready} not ready in {START_TIMEOUT} s: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _converse(host: str, question) -> tuple[str, str]:
    async with session(host) as client:
        await client.ask(question)
        await client.until(lambda: len(client.of_type("bot_text")) >= 2, "the answer's words")
        return client.of_type("transcript")[0]["text"], " ".join(e["text"] for e in client.of_type("bot_text"))


async def test_two_bot_processes_share_one_llm_server(question, tmp_path):
    llm_port, ports = _free_port(), [_free_port(), _free_port()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VOXBOT_TRACING__DIR": str(tmp_path)}
    with ExitStack() as stack:
        stack.enter_context(
            _process(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(llm_gguf_path()), "--host", "127.0.0.1",
                 "--port", str(llm_port), "--n_ctx", "2048", "--n_threads", "1"],
                ready=f"http://127.0.0.1:{llm_port}/v1/models",
                env=env,
                log=tmp_path / "llm.log",
            )
        )
        bot_env = {
            **env,
            "VOXBOT_LLM__ENGINE": "openai",
            "VOXBOT_LLM__OPENAI__BASE_URL": f"http://127.0.0.1:{llm_port}/v1",
            "VOXBOT_LLM__OPENAI__MODEL": "local",
        }
        bots = [
            stack.enter_context(
                _process(
                    [str(VOXBOT), "serve", "--port", str(port)],
                    ready=f"http://127.0.0.1:{port}/ready",  # ready only once the LLM server answers too
                    env=bot_env,
                    log=tmp_path / f"bot{i}.log",
                )
            )
            for i, port in enumerate(ports)
        ]
        hosts = [f"127.0.0.1:{port}" for port in ports]

        answers = await asyncio.gather(*(_converse(host, question) for host in hosts))

        for transcript, answer in answers:
            assert normalize(transcript) == normalize(QUESTION), answers
            assert answer.strip(), answers
        async with httpx.AsyncClient(timeout=10) as http:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    statuses = [(await http.get(f"http://{host}/status")).json() for host in hosts]
                    if all(s["turns"] >= 1 and s["active_sessions"] == 0 for s in statuses):
                        break
                    await asyncio.sleep(0.2)
        # Each process counts its own session and turn, not the other's.
        assert [s["turns"] for s in statuses] == [1, 1], statuses
        assert [len({t["session_id"] for t in s["recent_turns"]}) for s in statuses] == [1, 1], statuses
        assert statuses[0]["recent_turns"][0]["session_id"] != statuses[1]["recent_turns"][0]["session_id"]
        # Neither loaded a language model of its own.
        assert all("llama_cpp" not in s["models"]["load_seconds"] for s in statuses), statuses
        assert all(bot.poll() is None for bot in bots)
