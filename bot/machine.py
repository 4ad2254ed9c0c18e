"""The machine a measurement was made on: every figure is only meaningful next to it."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name, as ``lscpu`` prints it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(*, synthesis_speed=None) -> dict:
    """CPU model, cores, and this machine's measured speech synthesis speed."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "tts_real_time_factor": (
            round(synthesis_speed.real_time_factor, 3) if synthesis_speed is not None else None
        ),
    }
