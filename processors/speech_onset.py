"""Silero VAD that also tells when speech may be starting, not only once it has.

pipecat reports speech once it has lasted ``start_secs`` (0.2 s), and its
controller passes on no earlier state. A reply about to start must give way to a
user going on after a pause from the speech's first frame: a reply held for the
statement wait (0.8 s after the speech ended) met a user resuming after a 0.6 s
pause, whom the VAD reported only at 0.806 s.
"""

from __future__ import annotations

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADState


class OnsetSileroVADAnalyzer(SileroVADAnalyzer):
    """pipecat's Silero analyzer, keeping the state of the last audio it analyzed."""

    def __init__(self, **kwargs):
        """Initialize the analyzer; ``kwargs`` go to ``SileroVADAnalyzer``."""
        super().__init__(**kwargs)
        self.state = VADState.QUIET

    async def analyze_audio(self, buffer: bytes) -> VADState:
        self.state = await super().analyze_audio(buffer)
        return self.state
