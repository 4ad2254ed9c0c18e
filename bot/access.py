"""Who may open a voice session: one shared token, checked in constant time, bad tries slowed.

A client presents the token as ``Authorization: Bearer <token>`` on the WebSocket
handshake, or, as a browser must (it cannot set headers on a WebSocket), in its
first message: ``{"type": "auth", "token": "<token>"}``. A bad or missing token
closes the socket with 1008; an address that keeps trying is refused for a while
without its token being looked at.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import deque

from fastapi import WebSocket, WebSocketDisconnect
from loguru import logger
from prometheus_client import Counter
from pydantic import SecretStr

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
# Bad tokens from one address within the window before it is refused outright.
MAX_FAILURES = 5
FAILURE_WINDOW_SECS = 60.0
# How long a client has to send its auth message.
AUTH_TIMEOUT_SECS = 5.0
UNAUTHORIZED = 1008


class ExposedWithoutTokenError(ValueError):
    """The server would listen beyond this machine with no token asked of anyone."""


def check_exposure(*, host: str, token: SecretStr | None, allow_anonymous: bool) -> None:
    """Refuse to serve every network interface to anybody, unless told to.

    Raises:
        ExposedWithoutTokenError: ``host`` is not loopback, no token is set, and
            anonymous access was not allowed.
    """
    if host in LOOPBACK_HOSTS or token is not None or allow_anonymous:
        return
    raise ExposedWithoutTokenError(
        f"refusing to serve on {host} without a token: set server.auth_token (VOXBOT_SERVER__AUTH_TOKEN), "
        "or server.allow_anonymous: true to let anyone who can reach it in"
    )


class AccessGuard:
    """The token check for ``/ws``, with a per-address limit on bad tries."""

    def __init__(self, *, token: SecretStr | None, failures: Counter):
        self._token = token.get_secret_value().encode() if token is not None else None
        self._failures = failures
        self._recent: dict[str, deque[float]] = {}

    def authorized(self, presented: str | None) -> bool:
        """Whether ``presented`` is the token (always true when none is set)."""
        if self._token is None:
            return True
        return presented is not None and hmac.compare_digest(presented.encode(), self._token)

    @staticmethod
    def bearer(authorization: str | None) -> str | None:
        """The token of an ``Authorization: Bearer`` header."""
        scheme, _, token = (authorization or "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    async def admit(self, websocket: WebSocket) -> bool:
        """Check an accepted socket's token; close it with 1008 and a reason when it has none good."""
        if self._token is None:
            return True
        address = websocket.client.host if websocket.client else "unknown"
        if self._limited(address):
            self._failures.labels(reason="rate_limited").inc()
            await refuse(websocket, code=UNAUTHORIZED, message="too many bad tokens from this address; retry in a minute")
            return False
        presented = self.bearer(websocket.headers.get("authorization")) or await self._first_message_token(websocket)
        if self.authorized(presented):
            return True
        self._recent.setdefault(address, deque()).append(time.monotonic())
        self._failures.labels(reason="missing" if presented is None else "wrong").inc()
        logger.warning(f"/ws: {'no' if presented is None else 'a wrong'} token from {address}")
        await refuse(websocket, code=UNAUTHORIZED, message="unauthorized: a missing or wrong token")
        return False

    def _limited(self, address: str) -> bool:
        recent = self._recent.get(address)
        if not recent:
            return False
        while recent and time.monotonic() - recent[0] > FAILURE_WINDOW_SECS:
            recent.popleft()
        if not recent:
            del self._recent[address]  # the table holds only addresses trying now
        return len(recent) >= MAX_FAILURES

    @staticmethod
    async def _first_message_token(websocket: WebSocket) -> str | None:
        try:
            message = json.loads(await asyncio.wait_for(websocket.receive_text(), AUTH_TIMEOUT_SECS))
        except (TimeoutError, ValueError, KeyError, TypeError, RuntimeError, WebSocketDisconnect):
            return None  # no auth message in time, or not text, or not JSON
        if isinstance(message, dict) and message.get("type") == "auth" and isinstance(message.get("token"), str):
            return message["token"]
        return None


async def refuse(websocket: WebSocket, *, code: int, message: str) -> None:
    """Say why in an error message (what the page shows) and in the close frame (what any
    WebSocket client sees), then close."""
    try:
        await websocket.send_json({"type": "error", "message": message})
        await websocket.close(code=code, reason=message[:120])  # a close reason holds 123 bytes
    except (RuntimeError, OSError, WebSocketDisconnect):
        pass  # the client is already gone
