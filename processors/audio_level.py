"""The level of 16-bit PCM, as the echo, barge-in and latency checks read it."""

from __future__ import annotations

import numpy as np


def pcm_peak(audio: bytes) -> float:
    """The loudest sample of 16-bit mono PCM, as a share of full scale (0..1); 0 when empty."""
    samples = np.frombuffer(audio, dtype=np.int16)
    return float(np.abs(samples.astype(np.int32)).max()) / 32768 if samples.size else 0.0
