"""Two bot processes sharing one LLM server vs one process with its own model, on this machine.

``python -m tests.scale_bench --rounds 3``: the same spoken question from two callers at
once, ``--rounds`` times, to (a) one ``voxbot serve`` holding its own model and (b) two
``voxbot serve`` processes sharing one ``llama_cpp.server``. Reports each setup's
voice-to-voice (the servers' own traces, /status) and the memory of all its processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

from bot.assets import llm_gguf_path
from bot.config import load_config
from bot.machine import describe
from bot.tracing import percentile
from tests.conftest import QUESTION, RATE, make_speaker, silence
from tests.test_scale_out import VOXBOT, _converse, _free_port, _process


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return round(kb / 1024, 1)


async def _rounds(hosts: list[str], question, rounds: int) -> dict:
    for _ in range(rounds):
        await asyncio.gather(*(_converse(hosts[i % len(hosts)], question) for i in range(2)))
    v2v, rtf = [], []
    async with httpx.AsyncClient(timeout=10) as http:
        for host in hosts:
            status = (await http.get(f"http://{host}/status")).json()
            v2v += [t["voice_to_voice_ms"] for t in status["recent_turns"] if t["voice_to_voice_ms"] is not None]
            rtf.append(status["models"]["tts"]["real_time_factor"])
    return {
        "voice_to_voice_p50_ms": percentile(v2v, 50),
        "p95_ms": percentile(v2v, 95),
        "turns": len(v2v),
        "kokoro_real_time_factor_at_start": rtf,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    config = load_config()
    speech = make_speaker(config)(QUESTION, sample_rate=RATE)
    question = np.concatenate([silence(0.3, sample_rate=RATE), speech, silence(1.5, sample_rate=RATE)])
    tmp = Path(tempfile.mkdtemp())
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VOXBOT_TRACING__DIR": str(tmp),
        "VOXBOT_TRACING__STATUS_TURNS": "100",
        # Measured here is how late the replies come, so every caller is let in.
        "VOXBOT_SERVER__ADMIT_MAX_VOICE_TO_VOICE_MS": "1e9",
        "VOXBOT_SERVER__ADMIT_MAX_LOOP_LAG_MS": "1e9",
    }
    report = {"machine": describe()}

    with ExitStack() as stack:
        port = _free_port()
        bot = stack.enter_context(
            _process([str(VOXBOT), "serve", "--port", str(port)], ready=f"http://127.0.0.1:{port}/ready", env=env, log=tmp / "one.log")
        )
        result = asyncio.run(_rounds([f"127.0.0.1:{port}"], question, args.rounds))
        report["one process, its own model"] = {**result, "rss_mb": _rss_mb(bot.pid)}

    with ExitStack() as stack:
        llm_port, ports = _free_port(), [_free_port(), _free_port()]
        llm = stack.enter_context(
            _process(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(llm_gguf_path()), "--host", "127.0.0.1",
                 "--port", str(llm_port), "--n_ctx", "2048", "--n_threads", "1"],
                ready=f"http://127.0.0.1:{llm_port}/v1/models", env=env, log=tmp / "llm.log",
            )
        )
        bot_env = {**env, "VOXBOT_LLM__ENGINE": "openai", "VOXBOT_LLM__OPENAI__BASE_URL": f"http://127.0.0.1:{llm_port}/v1"}
        bots = [
            stack.enter_context(
                _process([str(VOXBOT), "serve", "--port", str(p)], ready=f"http://127.0.0.1:{p}/ready", env=bot_env, log=tmp / f"bot{p}.log")
            )
            for p in ports
        ]
        result = asyncio.run(_rounds([f"127.0.0.1:{p}" for p in ports], question, args.rounds))
        report["two processes, one LLM server"] = {**result, "rss_mb": round(sum(_rss_mb(p.pid) for p in [llm, *bots]), 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
