"""The model servers a bot process relies on (vLLM, llama.cpp's server, Ollama), as ``/ready`` checks them.

A load balancer sends users only to a process that says it is ready; a bot whose
language model server is down would greet them with apologies.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from bot.config import Config

# A readiness probe answers quickly or not at all.
_PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Backend:
    """An OpenAI-compatible server: what it is for, and where."""

    role: str
    base_url: str
    api_key: str


def remote_backends(config: Config, *, stt_engine: str) -> list[Backend]:
    """The servers this configuration's sessions call."""
    backends = []
    if stt_engine == "voxtral_remote":
        backends.append(Backend("speech recognition server", config.stt.remote.base_url, config.stt.remote.api_key))
    if config.llm.engine == "openai":
        backends.append(Backend("LLM server", config.llm.openai.base_url, config.llm.openai.api_key))
    return backends


async def unreachable(backends: list[Backend]) -> list[str]:
    """One line for each backend that does not list its models (``GET /models``) in time."""
    problems = []
    async with httpx.AsyncClient(timeout=_PROBE_TIMEOUT_S) as http:
        for backend in backends:
            url = f"{backend.base_url.rstrip('/')}/models"
            try:
                response = await http.get(url, headers={"Authorization": f"Bearer {backend.api_key}"})
                response.raise_for_status()
            except httpx.HTTPStatusError as e:
                problems.append(f"the {backend.role} at {backend.base_url} answered HTTP {e.response.status_code}")
            except httpx.HTTPError as e:
                problems.append(f"the {backend.role} at {backend.base_url} is down: {type(e).__name__} {e}".strip())
    return problems
