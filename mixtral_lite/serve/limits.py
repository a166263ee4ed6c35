"""ASGI middleware: a request body larger than the limit gets 413 in OpenAI's error shape, unread.

A declared Content-Length over the limit is answered before a byte of the body is read; a body sent
without one (chunked) is counted as it arrives and refused once it passes the limit (the route's
`await request.body()` raises the ApiError, which the app's handler answers).
"""

from __future__ import annotations

from .api_schema import ApiError


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                        None, "request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self.too_large().response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self.too_large()
            return message
        await self.app(scope, counted, send)
