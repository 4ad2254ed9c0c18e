"""A fake of a model server (vLLM, llama.cpp's server) on a free loopback port, for its clients' tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web


@asynccontextmanager
async def serve_routes(routes: list[web.RouteDef]) -> AsyncIterator[str]:
    """Serve ``routes``; yields the base URL, ``http://127.0.0.1:PORT/v1``."""
    app = web.Application()
    app.add_routes(routes)
    # Cancel a hanging handler when its client gives up, so shutdown is quick.
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, shutdown_timeout=0.5)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        await runner.cleanup()
