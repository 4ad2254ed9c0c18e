"""Twilio: a number's voice webhook answers with TwiML that connects the call to a Media Stream.

    POST /telephony/twilio            form: CallSid, AccountSid, From, To, ... (X-Twilio-Signature)
      <- <Response><Connect><Stream url="wss://<host>/telephony/twilio/ws/<token>"/></Connect></Response>
    WS   /telephony/twilio/ws/<token> Twilio Media Streams: connected, start, media, mark, stop

The token is in the path because Twilio drops query strings from a <Stream> URL. The call
is hung up with ``POST {rest_base_url}/2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json``
``Status=completed`` (Basic auth: account SID, auth token); a 404 means it already ended.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl
from xml.sax.saxutils import quoteattr

import aiohttp
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from loguru import logger

from pipecat.serializers.twilio import TwilioFrameSerializer, _build_call_resource_url

from transports.telephony.base import (
    CallSerializerMixin,
    CarrierPlugin,
    TokenStore,
    open_media_socket,
    public_http_url,
    public_ws_url,
    rest_hang_up,
    run_call,
)

if TYPE_CHECKING:
    from bot.server import BotState

NAME = "twilio"
MULAW = "audio/x-mulaw"


def twilio_signature(auth_token: str, url: str, params: dict[str, str] | list[tuple[str, str]]) -> str:
    """X-Twilio-Signature: base64(HMAC-SHA1(auth token, URL + each sorted key and its value))."""
    pairs = sorted(params.items() if isinstance(params, dict) else params)
    payload = url + "".join(k + v for k, v in pairs)
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def valid_twilio_signature(auth_token: str, url: str, params, signature: str | None) -> bool:
    if not signature:
        return False
    return hmac.compare_digest(twilio_signature(auth_token, url, params), signature)


class TwilioCallSerializer(CallSerializerMixin, TwilioFrameSerializer):
    """pipecat's Twilio serializer, plus ordering, marks, the caller's stop and a REST hang-up
    whose 404 (already ended) is no error."""

    carrier = NAME

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_call()

    def mark_message(self, name: str) -> dict:
        return {"event": "mark", "streamSid": self._stream_sid, "mark": {"name": name}}

    def _on_start(self, message: dict) -> None:
        encoding = (message.get("start") or {}).get("mediaFormat", {}).get("encoding", MULAW)
        if encoding != MULAW:
            logger.warning(f"twilio: media format {encoding!r} is not {MULAW}; decoding as mu-law")

    async def _hang_up_call(self):
        url = _build_call_resource_url(self._account_sid, self._call_sid, base_url=self._base_url)
        self.hang_up_result = await rest_hang_up(
            url,
            carrier=NAME,
            call_id=self._call_sid,
            gone_status=404,
            auth=aiohttp.BasicAuth(self._account_sid, self._auth_token),
            data={"Status": "completed"},
        )


def _twiml(stream_url: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Connect><Stream url={quoteattr(stream_url)}/></Connect></Response>"
    )


def _twiml_busy() -> str:
    return '<?xml version="1.0" encoding="UTF-8"?><Response><Reject reason="busy"/></Response>'


def mount(app: FastAPI, state: BotState, tokens: TokenStore) -> None:
    config = state.config.telephony
    twilio = config.twilio

    @app.post(f"/telephony/{NAME}")
    async def twilio_webhook(request: Request):
        body = (await request.body()).decode("utf-8", "replace")
        params = parse_qsl(body, keep_blank_values=True)
        if twilio.auth_token is not None:
            url = public_http_url(request, config.public_base_url)
            signature = request.headers.get("x-twilio-signature")
            if not valid_twilio_signature(twilio.auth_token.get_secret_value(), url, params, signature):
                logger.warning("twilio: webhook refused: missing or wrong X-Twilio-Signature")
                return Response("invalid signature", status_code=403)
        form = dict(params)
        call_sid = form.get("CallSid")
        if not call_sid:
            return Response("CallSid is required", status_code=400)
        if not state.has_room():
            state.metrics.rejected.inc()
            return Response(_twiml_busy(), media_type="application/xml")
        token = tokens.issue(NAME, call_sid, account_sid=form.get("AccountSid"), caller=form.get("From"))
        stream_url = public_ws_url(request, config.public_base_url, f"/telephony/{NAME}/ws/{token}")
        logger.info(f"twilio: call {call_sid} answered")
        return Response(_twiml(stream_url), media_type="application/xml")

    @app.websocket(f"/telephony/{NAME}/ws/{{token}}")
    async def twilio_media(websocket: WebSocket, token: str):
        opened = await open_media_socket(
            websocket, token=token, tokens=tokens, state=state, carrier=NAME,
            call_id_field="callSid", call_id_required=True,
        )  # fmt: skip
        if opened is None:
            return
        ticket, start = opened
        info = start.get("start") or {}
        account_sid = twilio.account_sid or info.get("accountSid") or ticket.data.get("account_sid")
        can_hang_up = bool(twilio.auth_token is not None and account_sid)
        serializer = TwilioCallSerializer(
            stream_sid=info.get("streamSid") or start.get("streamSid"),
            call_sid=ticket.call_id,
            account_sid=account_sid,
            auth_token=twilio.auth_token.get_secret_value() if twilio.auth_token else None,
            base_url=twilio.rest_base_url,
            params=TwilioFrameSerializer.InputParams(auto_hang_up=can_hang_up),
        )
        serializer._on_start(start)
        await run_call(websocket, state, carrier=NAME, call_id=ticket.call_id, serializer=serializer)


def warnings(config) -> list[str]:
    twilio = config.telephony.twilio
    if twilio.auth_token is None:
        return [
            "telephony.twilio.auth_token is not set: Twilio webhooks are accepted without checking "
            "their signature, so anyone who finds the URL can start a call, and the bot cannot hang "
            "up through Twilio's API. Fine for a local trial; set it for a real number."
        ]
    return []


PLUGIN = CarrierPlugin(name=NAME, mount=mount, warnings=warnings)
