"""The scripted transport over a phone line: the scenario suite through the carrier's codec path.

The user's 16 kHz audio is taken down to 8 kHz and G.711 μ-law-encoded (the caller's
phone), wrapped in Twilio ``media`` messages and decoded by the bot's own Twilio
serializer (``TwilioCallSerializer``: ordering, μ-law, soxr up to the pipeline rate);
the bot's voice goes out at 8 kHz through the same serializer and is decoded back
(the caller's earpiece) before it is recorded — and before it leaks into the
microphone as echo. Only the network is missing.
"""

from __future__ import annotations

import base64
import json

import numpy as np

from pipecat.frames.frames import InputAudioRawFrame, OutputAudioRawFrame
from pipecat.serializers.twilio import TwilioFrameSerializer

from tests.phone_caller import g711_decode, g711_encode, to_line
from transports.scripted import ScriptedInputTransport, ScriptedOutputTransport, ScriptedTransport
from transports.telephony.twilio import TwilioCallSerializer

LINE_RATE = 8000


def _serializer(pipeline_rate: int) -> TwilioCallSerializer:
    serializer = TwilioCallSerializer(
        stream_sid="MZscripted", params=TwilioFrameSerializer.InputParams(auto_hang_up=False)
    )
    serializer._sample_rate = pipeline_rate  # what setup() would take from the pipeline
    return serializer


class PhoneLineInput(ScriptedInputTransport):
    def __init__(self, *, serializer: TwilioCallSerializer, **kwargs):
        super().__init__(**kwargs)
        self._serializer = serializer
        self._chunk = 0

    async def push_audio_frame(self, frame: InputAudioRawFrame):
        line = to_line(np.frombuffer(frame.audio, dtype=np.int16), frame.sample_rate)
        self._chunk += 1
        message = {
            "event": "media",
            "sequenceNumber": str(self._chunk + 1),
            "media": {"track": "inbound", "chunk": str(self._chunk), "payload": base64.b64encode(g711_encode(line)).decode()},
            "streamSid": "MZscripted",
        }
        decoded = await self._serializer.deserialize(json.dumps(message))
        if decoded is not None:
            await super().push_audio_frame(decoded)


class PhoneLineOutput(ScriptedOutputTransport):
    def __init__(self, *, serializer: TwilioCallSerializer, **kwargs):
        super().__init__(**kwargs)
        self._serializer = serializer

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        wire = await self._serializer.serialize(frame)
        if not wire:
            return True
        audio = g711_decode(base64.b64decode(json.loads(wire)["media"]["payload"]))
        return await super().write_audio_frame(
            OutputAudioRawFrame(audio=audio.tobytes(), sample_rate=LINE_RATE, num_channels=1)
        )


class PhoneLineTransport(ScriptedTransport):
    """``ScriptedTransport`` whose audio crosses an 8 kHz μ-law line both ways."""

    def __init__(self, *, cues, in_sample_rate: int = 16000, out_sample_rate: int = 24000, echo_gain: float = 0.0):
        super().__init__(cues=cues, in_sample_rate=in_sample_rate, out_sample_rate=LINE_RATE, echo_gain=echo_gain)
        serializer = _serializer(in_sample_rate)
        self.serializer = serializer
        self._input = PhoneLineInput(
            serializer=serializer,
            cues=cues,
            clock=self.clock,
            recording=self.recording,
            echo_gain=echo_gain,
            params=self._params,
        )
        self._output = PhoneLineOutput(
            serializer=serializer, clock=self.clock, recording=self.recording, params=self._params
        )

