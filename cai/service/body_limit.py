"""Request bodies over a size are refused with 413 before the app holds them in memory: by their
Content-Length when they declare one, else by counting what arrives (a chunked upload)."""

from __future__ import annotations

import json

from fastapi import HTTPException

MAX_BODY_BYTES = 64 << 10  # a job request is a path and a few overrides: a few hundred bytes


class BodyLimit:
    """ASGI middleware: requests of the wrapped app may carry at most `max_bytes` of body."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # Raised inside the app's body reading, which passes HTTPExceptions on to the app's handler.
                raise HTTPException(413, self._detail())
            return message

        await self.app(scope, counted, send)

    def _detail(self) -> str:
        return f"request body over {self.max_bytes} bytes: refused"

    async def _refuse(self, send) -> None:
        body = json.dumps({"detail": self._detail()}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
