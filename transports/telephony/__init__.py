"""Telephony transport plug-ins: a phone call reaches the same pipeline as the browser.

A carrier is one module (its pipecat serializer, webhook and media-socket routes, call
set-up and signature check) and one line in :data:`CARRIERS`.
"""

from __future__ import annotations

from transports.telephony import telnyx, twilio
from transports.telephony.base import CarrierPlugin, TokenStore, mount_carriers

CARRIERS: dict[str, CarrierPlugin] = {
    "twilio": twilio.PLUGIN,
    "telnyx": telnyx.PLUGIN,
}

__all__ = ["CARRIERS", "CarrierPlugin", "TokenStore", "mount_carriers"]
