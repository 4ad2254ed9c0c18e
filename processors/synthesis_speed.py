"""How fast this machine makes speech: measured at start-up, kept current while it runs.

The same ``lscpu`` name has run Kokoro from 0.35x to 1.5x real time, and a busy
process runs it slower still. Every decision about when a reply may start and
how finely to cut its synthesis is made from this model's prediction, which
each synthesized chunk corrects.
"""

from __future__ import annotations

import threading

# Seconds of audio in one decoder frame (600 samples at 24 kHz).
FRAME_SECS = 0.025
# How much each new measurement moves the estimate: a few chunks follow a change of load.
_SMOOTHING = 0.3


class SynthesisSpeed:
    """A linear cost model of the speech decoder: ``fixed_secs + secs_per_frame * frames``."""

    def __init__(self, *, fixed_secs: float, secs_per_frame: float):
        """Initialize the model.

        Args:
            fixed_secs: Cost of one decoder call, whatever its length.
            secs_per_frame: Cost of each decoded frame, context frames included.
        """
        self._lock = threading.Lock()
        self.fixed_secs = fixed_secs
        self.secs_per_frame = secs_per_frame

    @property
    def real_time_factor(self) -> float:
        """Seconds of compute per second of speech, decoded in one piece."""
        return self.secs_per_frame / FRAME_SECS

    def predict(self, frames: int) -> float:
        """Seconds to decode ``frames`` frames (context included) in one call."""
        return self.fixed_secs + self.secs_per_frame * frames

    def frames_within(self, secs: float) -> int:
        """The most frames one call decodes within ``secs``."""
        return max(0, int((secs - self.fixed_secs) / self.secs_per_frame))

    def observe(self, *, frames: int, secs: float) -> None:
        """Correct the per-frame cost with a measured call (the fixed cost stays as calibrated)."""
        if frames <= 0:
            return
        measured = max(1e-4, (secs - self.fixed_secs) / frames)
        with self._lock:
            self.secs_per_frame += _SMOOTHING * (measured - self.secs_per_frame)

    def describe(self) -> str:
        """The speed in words, for the start-up log and ``voxbot prepare``."""
        rtf = self.real_time_factor
        if rtf < 1:
            how = "replies start as soon as their first words are synthesized"
        else:
            how = "replies start after a short buffer, so they play without a hole"
        return (
            f"Kokoro runs at {rtf:.2f}x real time on this CPU ({rtf:.2f} s of compute per second "
            f"of speech): {how}"
        )
