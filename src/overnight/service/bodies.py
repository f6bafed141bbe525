"""A request's JSON body, read within a size limit: one reader for every route that takes one
(Starlette's `request.body()` has no limit)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request


async def json_body(request: Request, limit: int, refuse: Callable[[int, str], Exception]) -> Any:
    """The parsed body; `refuse(status, message)` is raised for one over `limit` bytes (413,
    by its Content-Length or as it streams in) or not JSON (400)."""
    too_large = f"The request is larger than {limit} bytes."
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise refuse(413, too_large)
    raw = bytearray()  # grows in place: a 200 MB body in 64 KB chunks is not copied each time
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise refuse(413, too_large)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise refuse(400, "The body is not valid JSON.") from None
