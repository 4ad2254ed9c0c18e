"""What the user hears when a model fails in the middle of a turn.

A voice bot that goes silent leaves the user wondering whether it heard them.
When speech recognition or the reply fails, the bot says so in a sentence and
the conversation goes on: the next turn runs on the same models.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipecat.frames.frames import Frame, SystemFrame, TTSSpeakFrame

# Nothing was understood, or nothing of the reply was said yet.
APOLOGY = "Sorry, something went wrong on my side. Could you say that again?"
# Part of the reply was already said.
CUT_SHORT = " Sorry, I lost my train of thought."


@dataclass
class FaultNoticeFrame(SystemFrame):
    """A model failed mid-turn: the web page shows ``message`` (a phone caller hears the apology)."""

    message: str = ""


def transcription_failed(error: Exception) -> list[Frame]:
    """What an STT service pushes when a turn's transcription fails: a notice and the apology.

    The user's words never reached the context, so neither does the request to say
    them again.
    """
    return [
        FaultNoticeFrame(message=f"speech recognition failed: {error}"),
        TTSSpeakFrame(APOLOGY, append_to_context=False),
    ]
