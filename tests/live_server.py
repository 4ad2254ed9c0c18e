"""The real server on loopback, for tests that talk to it over the network."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from bot.config import Config
from bot.models import Models
from bot.server import BotState, DrainingServer, create_server


@contextmanager
def serve(config: Config, *, models: Models | None) -> Iterator[str]:
    """Run ``voxbot serve``'s server on a free 127.0.0.1 port; yields "127.0.0.1:PORT".

    It runs in its own thread and event loop, as it would in its own process: a
    slow test client cannot stall it, nor it the client.
    """
    with serve_app(config, models=models) as (host, _):
        yield host


@contextmanager
def serve_app(config: Config, *, models: Models | None) -> Iterator[tuple[str, BotState]]:
    """Like :func:`serve`, and also yields the app's state (its event loop, its counts)."""
    with serve_server(config, models=models) as (host, state, _, _):
        yield host, state


@contextmanager
def serve_server(
    config: Config, *, models: Models | None
) -> Iterator[tuple[str, BotState, DrainingServer, threading.Thread]]:
    """Like :func:`serve_app`, and also yields the uvicorn server (to signal it) and its thread."""
    server = create_server(config, host="127.0.0.1", port=0, models=models)
    thread = threading.Thread(target=server.run, name="voxbot-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}", server.config.app.state.bot, server, thread
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def session_tasks(state: BotState) -> list[str]:
    """The server loop's tasks that belong to a session: pipecat's, the bot's, the transport's."""

    async def collect():
        names = []
        for task in asyncio.all_tasks():
            code = getattr(task.get_coro(), "cr_code", None)
            filename = code.co_filename if code else ""
            if any(part in filename for part in ("/pipecat/", "/processors/", "/transports/")):
                names.append(f"{task.get_name()} ({filename.rsplit('/', 1)[-1]})")
        return names

    return asyncio.run_coroutine_threadsafe(collect(), state.loop).result(10)
