"""A real pipeline around the processors under test, started, for tests that feed it over time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pipecat.frames.frames import EndFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.workers.runner import WorkerRunner


@asynccontextmanager
async def running(
    processors: list[FrameProcessor], *, params: PipelineParams | None = None, end: bool = False
) -> AsyncIterator[PipelineWorker]:
    """Yield the started worker; on exit cancel it, or with ``end`` let an EndFrame drain it."""
    worker = PipelineWorker(
        Pipeline(processors),
        params=params or PipelineParams(),
        cancel_on_idle_timeout=False,
        enable_rtvi=False,
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _on_started(worker, frame):
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(started.wait(), 5)
        yield worker
    finally:
        if end:
            await worker.queue_frame(EndFrame())
        else:
            await worker.cancel()
        await asyncio.wait_for(run, 10)
