"""Telnyx: call control answers the call and streams its media over a WebSocket.

    POST /telephony/telnyx            JSON call-control webhook (telnyx-signature-ed25519, telnyx-timestamp)
      call.initiated -> POST {rest_base_url}/v2/calls/{call_control_id}/actions/answer
                        {"stream_url": "wss://<host>/telephony/telnyx/ws/<token>", "stream_track": "inbound_track",
                         "stream_bidirectional_mode": "rtp", "stream_bidirectional_codec": "PCMU"}
      (a TeXML application's form-encoded webhook gets <Response><Connect><Stream .../></Connect></Response>)
    WS   /telephony/telnyx/ws/<token> connected, start (media_format), media (sequence_number), mark, stop

The webhook's signature is Ed25519 over ``"{telnyx-timestamp}|{raw body}"`` with the
portal's public key, and the timestamp must be within ``max_clock_skew_s`` of now.
Telnyx may stream PCMA even when PCMU was asked for: audio is decoded (and answered)
in the encoding the ``start`` message declares. Hang-up: ``POST
{rest_base_url}/v2/calls/{call_control_id}/actions/hangup``; a 422 means it already ended.
"""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl
from xml.sax.saxutils import quoteattr

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from loguru import logger

from pipecat.serializers.telnyx import TelnyxFrameSerializer

from transports.telephony.base import (
    CallSerializerMixin,
    CarrierPlugin,
    TokenStore,
    open_media_socket,
    public_ws_url,
    rest_hang_up,
    run_call,
)

if TYPE_CHECKING:
    from bot.server import BotState

NAME = "telnyx"
ENCODINGS = ("PCMU", "PCMA")


def valid_telnyx_signature(
    public_key_b64: str,
    body: bytes,
    signature_b64: str | None,
    timestamp: str | None,
    *,
    max_skew_s: float,
    now: float | None = None,
) -> bool:
    """Ed25519 over ``"{timestamp}|{raw body}"``, signed no further than ``max_skew_s`` from now."""
    if not signature_b64 or not timestamp:
        return False
    try:
        if abs((now if now is not None else time.time()) - int(timestamp)) > max_skew_s:
            return False
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
        key.verify(base64.b64decode(signature_b64), f"{timestamp}|".encode() + body)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def _normalize(encoding: str | None) -> str:
    encoding = (encoding or "PCMU").upper()
    return {"AUDIO/X-MULAW": "PCMU", "ULAW": "PCMU", "ALAW": "PCMA", "AUDIO/X-ALAW": "PCMA"}.get(encoding, encoding)


class TelnyxCallSerializer(CallSerializerMixin, TelnyxFrameSerializer):
    """pipecat's Telnyx serializer, plus the encoding the stream declares, ordering, marks,
    the caller's stop and a REST hang-up at a configurable base URL whose 422 is no error."""

    carrier = NAME

    def __init__(self, *args, rest_base_url: str = "https://api.telnyx.com", **kwargs):
        super().__init__(*args, **kwargs)
        self._rest_base_url = rest_base_url.rstrip("/")
        self._init_call()

    def set_encoding(self, encoding: str) -> None:
        """Decode what Telnyx sends, and encode what it is sent, as the stream declares."""
        encoding = _normalize(encoding)
        if encoding not in ENCODINGS:
            logger.warning(f"telnyx: unsupported media encoding {encoding!r}; keeping {self._params.outbound_encoding}")
            return
        self._params.outbound_encoding = encoding  # pipecat: what is received from Telnyx
        self._params.inbound_encoding = encoding  # pipecat: what is sent to Telnyx

    @property
    def encoding(self) -> str:
        return self._params.outbound_encoding

    def mark_message(self, name: str) -> dict:
        return {"event": "mark", "mark": {"name": name}}

    def _on_start(self, message: dict) -> None:
        media_format = (message.get("start") or {}).get("media_format") or {}
        if media_format.get("encoding"):
            self.set_encoding(media_format["encoding"])

    async def _hang_up_call(self):
        self.hang_up_result = await rest_hang_up(
            f"{self._rest_base_url}/v2/calls/{self._call_control_id}/actions/hangup",
            carrier=NAME,
            call_id=self._call_control_id,
            gone_status=422,
            headers={"Authorization": f"Bearer {self._api_key}"},
            json_body={},
        )


def mount(app: FastAPI, state: BotState, tokens: TokenStore) -> None:
    config = state.config.telephony
    telnyx = config.telnyx

    def stream_url(request: Request, token: str) -> str:
        return public_ws_url(request, config.public_base_url, f"/telephony/{NAME}/ws/{token}")

    @app.post(f"/telephony/{NAME}")
    async def telnyx_webhook(request: Request):
        body = await request.body()
        if telnyx.public_key:
            ok = valid_telnyx_signature(
                telnyx.public_key,
                body,
                request.headers.get("telnyx-signature-ed25519"),
                request.headers.get("telnyx-timestamp"),
                max_skew_s=telnyx.max_clock_skew_s,
            )
            if not ok:
                logger.warning("telnyx: webhook refused: missing, wrong or stale Ed25519 signature")
                return Response("invalid signature", status_code=403)
        if "json" not in request.headers.get("content-type", "json"):
            return _texml(request, body)
        try:
            event = json.loads(body)["data"]
            kind, payload = event["event_type"], event.get("payload") or {}
        except (ValueError, KeyError, TypeError):
            return Response("a call-control event is expected", status_code=400)
        if kind != "call.initiated" or payload.get("direction", "incoming") != "incoming":
            return JSONResponse({"ok": True})  # call.answered, streaming.started, call.hangup, ...
        call_id = payload.get("call_control_id")
        if not call_id:
            return Response("call_control_id is required", status_code=400)
        if telnyx.api_key is None:
            logger.error("telnyx: a call came in, but telephony.telnyx.api_key is not set: it cannot be answered")
            return JSONResponse({"ok": False, "error": "no api key"}, status_code=503)
        if not state.has_room():
            state.metrics.rejected.inc()
            await _command(telnyx, call_id, "reject", {"cause": "USER_BUSY"})
            return JSONResponse({"ok": False, "error": "busy"})
        token = tokens.issue(NAME, call_id, caller=payload.get("from"))
        answered = await _command(
            telnyx,
            call_id,
            "answer",
            {
                "stream_url": stream_url(request, token),
                "stream_track": "inbound_track",
                "stream_bidirectional_mode": "rtp",
                "stream_bidirectional_codec": telnyx.codec,
            },
        )
        logger.info(f"telnyx: call {call_id} {'answered' if answered else 'could not be answered'}")
        return JSONResponse({"ok": answered})

    def _texml(request: Request, body: bytes) -> Response:
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        call_id = form.get("CallControlId") or form.get("CallSid")
        if not call_id:
            return Response("CallSid is required", status_code=400)
        token = tokens.issue(NAME, call_id, caller=form.get("From"))
        url = quoteattr(stream_url(request, token))
        texml = (
            '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
            f'<Stream url={url} bidirectionalMode="rtp" bidirectionalCodec="{telnyx.codec}"/>'
            "</Connect></Response>"
        )
        return Response(texml, media_type="application/xml")

    @app.websocket(f"/telephony/{NAME}/ws/{{token}}")
    async def telnyx_media(websocket: WebSocket, token: str):
        opened = await open_media_socket(
            websocket, token=token, tokens=tokens, state=state, carrier=NAME,
            call_id_field="call_control_id", call_id_required=False,  # a TeXML stream may not name it
        )  # fmt: skip
        if opened is None:
            return
        ticket, start = opened
        info = start.get("start") or {}
        encoding = _normalize((info.get("media_format") or {}).get("encoding") or telnyx.codec)
        serializer = TelnyxCallSerializer(
            stream_id=start.get("stream_id", ""),
            outbound_encoding=encoding if encoding in ENCODINGS else telnyx.codec,
            inbound_encoding=encoding if encoding in ENCODINGS else telnyx.codec,
            call_control_id=ticket.call_id,
            api_key=telnyx.api_key.get_secret_value() if telnyx.api_key else None,
            rest_base_url=telnyx.rest_base_url,
            params=TelnyxFrameSerializer.InputParams(auto_hang_up=telnyx.api_key is not None),
        )
        await run_call(websocket, state, carrier=NAME, call_id=ticket.call_id, serializer=serializer)


async def _command(telnyx, call_id: str, action: str, body: dict) -> bool:
    """A call-control command (answer, reject); the API key goes only in the header."""
    import aiohttp

    url = f"{telnyx.rest_base_url.rstrip('/')}/v2/calls/{call_id}/actions/{action}"
    headers = {"Authorization": f"Bearer {telnyx.api_key.get_secret_value()}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.post(url, json=body, headers=headers) as response:
                if 200 <= response.status < 300:
                    return True
                logger.error(f"telnyx: {action} for call {call_id} refused: HTTP {response.status}")
    except Exception as e:
        logger.error(f"telnyx: {action} for call {call_id} failed: {type(e).__name__}: {e}")
    return False


def warnings(config) -> list[str]:
    telnyx = config.telephony.telnyx
    out = []
    if not telnyx.public_key:
        out.append(
            "telephony.telnyx.public_key is not set: Telnyx webhooks are accepted without checking "
            "their Ed25519 signature, so anyone who finds the URL can start a call. Fine for a local "
            "trial; set it for a real number."
        )
    if telnyx.api_key is None:
        out.append(
            "telephony.telnyx.api_key is not set: call-control calls cannot be answered or hung up "
            "(a TeXML application still connects)."
        )
    return out


PLUGIN = CarrierPlugin(name=NAME, mount=mount, warnings=warnings)
