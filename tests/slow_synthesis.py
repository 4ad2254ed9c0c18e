"""A slower CPU for speech synthesis, on any machine: a test double, not a product setting.

Machines here have run Kokoro from 0.35x to 1.5x real time, and the next one may be
slower. :class:`SlowKokoroStream` makes every model call of the real split Kokoro
take ``factor`` times as long (it sleeps for the difference in the calling worker
thread), so the whole bot, its start-up speed measurement included, can be run as
on a machine that synthesizes ``factor`` times slower.

Run the benchmark that way: ``python -m tests.slow_synthesis --factor 2 -- --repeat 2``
(the arguments after ``--`` go to ``voxbot bench``).
"""

from __future__ import annotations

import dataclasses
import sys
import time

from bot.models import Models

# How often a slowed call checks whether it was told to stop (ONNX Runtime checks between nodes).
_TERMINATE_POLL_SECS = 0.01


class SlowKokoroStream:
    """The real ``KokoroStream``, ``factor`` times slower in every model call."""

    def __init__(self, stream, *, factor: float):
        self._stream = stream
        self._factor = factor

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def _slowly(self, fn, *args, run_options=None, **kwargs):
        """``fn``, then the rest of its slowed time; stopped meanwhile as ONNX Runtime stops, by raising."""
        start = time.perf_counter()
        result = fn(*args, run_options=run_options, **kwargs)
        until = start + self._factor * (time.perf_counter() - start)
        while (left := until - time.perf_counter()) > 0:
            if run_options is not None and run_options.terminate:
                return fn(*args, run_options=run_options, **kwargs)  # the model raises, as it does mid-run
            time.sleep(min(left, _TERMINATE_POLL_SECS))
        return result

    def analyze(self, *args, **kwargs):
        return self._slowly(self._stream.analyze, *args, **kwargs)

    def analyze_all(self, *args, **kwargs):
        return self._slowly(self._stream.analyze_all, *args, **kwargs)

    def decode(self, *args, **kwargs):
        return self._slowly(self._stream.decode, *args, **kwargs)

    def measure_speed(self, **kwargs):
        # The stream's own calibration calls its own decode: time it as a whole and scale.
        measured = self._stream.measure_speed(**kwargs)
        measured.fixed_secs *= self._factor
        measured.secs_per_frame *= self._factor
        return measured


def slowed(models: Models, *, factor: float, voice: str) -> Models:
    """The same loaded models, with synthesis ``factor`` times slower (measured anew)."""
    stream = SlowKokoroStream(models.kokoro_stream, factor=factor)
    return dataclasses.replace(models, kokoro_stream=stream, synthesis_speed=stream.measure_speed(voice=voice))


def main(argv: list[str]) -> None:
    """``voxbot bench`` on synthesis slowed by ``--factor``."""
    import bot.cli
    import bot.models

    factor = float(argv[argv.index("--factor") + 1]) if "--factor" in argv else 2.0
    bench_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    load = bot.models.load_models

    def load_slowed(config):
        return slowed(load(config), factor=factor, voice=config.tts.voice)

    bot.models.load_models = load_slowed
    bot.cli.app(["bench", *bench_args])


if __name__ == "__main__":
    main(sys.argv[1:])
