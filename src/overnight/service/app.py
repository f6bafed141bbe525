"""The HTTP routes: OpenAI's Files and Batches API, and its error shape
`{"error": {"message", "type", "param", "code"}}` for every refusal."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from . import anthropic, dashboard
from .auth import OPEN_TENANT, keys_from_env, tenant_of
from .batches import ENDPOINTS, Batches, TooManyActive, new_batch, openai_view
from .bodies import json_body
from .catalogue import Catalogue
from .config import ServeConfig, check_models
from .files import FileStore
from .metrics import Metrics, MetricsMiddleware
from .realtime import Realtime

log = logging.getLogger(__name__)

UPLOAD_PURPOSES = ("batch",)
# Multipart framing around the file (boundaries, headers, the purpose field).
_FRAMING = 64 * 1024


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )


# Anthropic's error types by status (its body: {"type": "error", "error": {type, message}}).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


def _error_response(request: Request, exc: ApiError) -> JSONResponse:
    if request.url.path.startswith(anthropic.ENDPOINT):
        kind = _ANTHROPIC_TYPES.get(exc.status, "api_error")
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": exc.message}}
        return JSONResponse(body, status_code=exc.status)
    body = {
        "error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    }
    headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(body, status_code=exc.status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(request, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return _error_response(
        request, ApiError(exc.status_code, str(exc.detail), code=codes.get(exc.status_code))
    )


class _TooLarge(Exception):
    pass


def _page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


def _limit(request: Request, default: int, most: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise ApiError(400, f"limit must be a whole number from 1 to {most}", param="limit")
    return value


def create_app(config: ServeConfig) -> Starlette:
    check_models(config)
    keys = keys_from_env(config.spec.auth.keys_env, config.origin) if config.spec.auth else None
    catalogue = Catalogue.for_service(config.ledger_url, config.folder)
    files = FileStore(config.folder, catalogue)
    metrics = Metrics(config.ledger_url, catalogue)  # /metrics, /healthz
    # /v1/embeddings, /v1/chat/completions, /v1/messages
    realtime = Realtime(config, metrics.observe_model_batch)
    metrics.queue_depths = realtime.queue_depths
    batches = Batches(config, catalogue, files, give_way=realtime.wait_idle)
    max_upload = config.spec.files.max_upload_bytes

    def tenant(request: Request) -> str:
        if keys is None:
            return OPEN_TENANT
        header = request.headers.get("authorization")
        if header is None and "x-api-key" in request.headers:  # Anthropic's SDK
            header = "Bearer " + request.headers["x-api-key"]
        found = tenant_of(keys, header)
        if found is None:
            given = header is not None
            raise ApiError(
                401,
                "Incorrect API key provided."
                if given
                else "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.",
                code="invalid_api_key" if given else None,
            )
        return found

    def may_scrape(request: Request) -> bool:
        """[metrics] require_key: a key of [auth], of one of [metrics] tenants if given."""
        found = tenant_of(keys or {}, request.headers.get("authorization"))
        allowed = config.spec.metrics.tenants
        return found is not None and (allowed is None or found in allowed)

    def no_file(file_id: str) -> ApiError:
        return ApiError(404, f"No such File object: {file_id}", param="id", code="not_found")

    def no_batch(batch_id: str) -> ApiError:
        return ApiError(404, f"No batch found with id '{batch_id}'.", code="not_found")

    def too_large() -> ApiError:
        return ApiError(
            413,
            f"The file is larger than this server's upload limit of {max_upload} bytes.",
            param="file",
            code="file_too_large",
        )

    # -- files --------------------------------------------------------------------------

    async def upload(request: Request) -> Response:
        who = tenant(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_upload + _FRAMING:
            raise too_large()
        received = 0

        async def receive() -> Any:  # the limit also holds for a body without a length
            nonlocal received
            message = await request.receive()
            received += len(message.get("body", b""))
            if received > max_upload + _FRAMING:
                raise _TooLarge
            return message

        try:
            async with Request(request.scope, receive).form(max_files=1, max_fields=8) as form:
                upload = form.get("file")
                purpose = form.get("purpose")
                if not isinstance(upload, UploadFile):
                    raise ApiError(400, "A file is required (multipart part `file`).", param="file")
                if purpose not in UPLOAD_PURPOSES:
                    raise ApiError(
                        400,
                        f"purpose {purpose!r} is not served here; upload with purpose=batch.",
                        param="purpose",
                    )
                if upload.size is not None and upload.size > max_upload:
                    raise too_large()
                filename = upload.filename or "upload.jsonl"
                if not filename.endswith(".jsonl"):
                    raise ApiError(
                        400,
                        "Invalid file format for Batch API. Must be .jsonl",
                        param="file",
                    )
                obj = await run_in_threadpool(files.add, who, filename, "batch", upload.file)
        except _TooLarge:
            raise too_large() from None
        return JSONResponse(obj)

    def list_files(request: Request) -> Response:
        who = tenant(request)
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ApiError(400, "order must be 'asc' or 'desc'", param="order")
        items, more = catalogue.list_files(
            who,
            request.query_params.get("after"),
            _limit(request, 10000, 10000),
            order,
            request.query_params.get("purpose"),
        )
        return JSONResponse(_page(items, more))

    def get_file(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        obj = files.get(tenant(request), file_id)
        if obj is None:
            raise no_file(file_id)
        return JSONResponse(obj)

    def file_content(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        obj = files.get(tenant(request), file_id)
        if obj is None or not files.path(file_id).exists():
            raise no_file(file_id)
        return FileResponse(files.path(file_id), media_type="application/octet-stream")

    def delete_file(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if not files.delete(tenant(request), file_id):
            raise no_file(file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    # -- batches ------------------------------------------------------------------------

    async def create_batch(request: Request) -> Response:
        who = tenant(request)
        body = await json_body(request, max_upload, ApiError)
        if not isinstance(body, dict):
            raise ApiError(400, "The body must be a JSON object.")
        return JSONResponse(await run_in_threadpool(_create_batch, who, body))

    def _create_batch(who: str, body: dict[str, Any]) -> dict[str, Any]:
        file_id = body.get("input_file_id")
        endpoint = body.get("endpoint")
        window = body.get("completion_window")
        metadata = body.get("metadata")
        if not isinstance(file_id, str):
            raise ApiError(400, "input_file_id is required.", param="input_file_id")
        if endpoint not in ENDPOINTS:
            raise ApiError(
                400,
                f"endpoint must be one of {', '.join(ENDPOINTS)} (got {endpoint!r}).",
                param="endpoint",
            )
        if window != "24h":
            raise ApiError(400, "completion_window must be '24h'.", param="completion_window")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and len(metadata) <= 16
            and all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items()
            )
        ):
            raise ApiError(
                400,
                "metadata holds at most 16 pairs of strings (keys up to 64 characters, values"
                " up to 512).",
                param="metadata",
            )
        found = files.get(who, file_id)
        if found is None:
            raise ApiError(
                404, f"No such File object: {file_id}", param="input_file_id", code="not_found"
            )
        if found["purpose"] != "batch":
            raise ApiError(
                400,
                f"File {file_id} has purpose {found['purpose']!r}; a batch needs purpose 'batch'.",
                param="input_file_id",
            )
        return openai_view(_create(who, new_batch(file_id, endpoint, window, metadata)))

    def _create(who: str, batch: dict[str, Any]) -> dict[str, Any]:
        try:
            return batches.create(who, batch)
        except TooManyActive as exc:  # the tenant's quota of open batches
            raise ApiError(429, str(exc), "requests", code="rate_limit_exceeded") from None

    def get_batch(request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        batch = batches.retrieve(tenant(request), batch_id)
        if batch is None or batch["api"] != "openai":
            raise no_batch(batch_id)
        return JSONResponse(openai_view(batch))

    def list_batches(request: Request) -> Response:
        items, more = catalogue.list_batches(
            tenant(request), "openai", _limit(request, 20, 100), request.query_params.get("after")
        )
        return JSONResponse(_page([openai_view(b) for b in items], more))

    def cancel_batch(request: Request) -> Response:
        who = tenant(request)
        batch_id = request.path_params["batch_id"]
        batch = catalogue.get_batch(batch_id, who)
        if batch is None or batch["api"] != "openai":
            raise no_batch(batch_id)
        cancelled = batches.cancel(who, batch_id)
        if cancelled is None:
            raise ApiError(
                400,
                f"Cannot cancel a batch with status '{batch['status']}'.",
                code="invalid_state",
            )
        return JSONResponse(openai_view(cancelled))

    # -- Anthropic's Message Batches ----------------------------------------------------

    def no_message_batch(batch_id: str) -> ApiError:
        return ApiError(404, f"No message batch with id {batch_id!r}.")

    def message_batch(request: Request) -> tuple[str, dict[str, Any]]:
        who = tenant(request)
        batch_id = request.path_params["batch_id"]
        batch = batches.retrieve(who, batch_id)
        if batch is None or batch["api"] != "anthropic":
            raise no_message_batch(batch_id)
        return who, batch

    async def create_message_batch(request: Request) -> Response:
        who = tenant(request)
        data = await json_body(request, max_upload, ApiError)
        requests = data.get("requests") if isinstance(data, dict) else None
        problem = anthropic.check_requests(requests)
        if problem is not None:
            raise ApiError(400, problem)
        assert isinstance(requests, list)
        return JSONResponse(
            anthropic.view(await run_in_threadpool(_create_message_batch, who, requests))
        )

    def _create_message_batch(who: str, requests: list[dict[str, Any]]) -> dict[str, Any]:
        batch = anthropic.new_batch(len(requests))
        lines = [
            {
                "custom_id": r["custom_id"],
                "method": "POST",
                "url": anthropic.ENDPOINT,
                "body": r["params"],
            }
            for r in requests
        ]
        batches.write_input(batch["id"], lines)
        return _create(who, batch)

    def get_message_batch(request: Request) -> Response:
        return JSONResponse(anthropic.view(message_batch(request)[1]))

    def list_message_batches(request: Request) -> Response:
        items, more = catalogue.list_batches(
            tenant(request),
            "anthropic",
            _limit(request, 20, 1000),
            after=request.query_params.get("after_id"),
            before=request.query_params.get("before_id"),
        )
        return JSONResponse(_page([anthropic.view(b) for b in items], more))

    def message_batch_results(request: Request) -> Response:
        _, batch = message_batch(request)
        path = batches.workdir(batch["id"]) / "results.jsonl"
        if anthropic.view(batch)["processing_status"] != "ended" or not path.exists():
            raise ApiError(400, f"Message batch {batch['id']} has no results yet.")
        return FileResponse(path, media_type="application/x-jsonl")

    def cancel_message_batch(request: Request) -> Response:
        who, batch = message_batch(request)
        return JSONResponse(anthropic.view(batches.cancel(who, batch["id"]) or batch))

    def delete_message_batch(request: Request) -> Response:
        who, batch = message_batch(request)
        if anthropic.view(batch)["processing_status"] != "ended":
            raise ApiError(400, "A batch that is still processing cannot be deleted; cancel it.")
        catalogue.delete_batch(who, batch["id"])
        return JSONResponse({"id": batch["id"], "type": "message_batch_deleted"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        resumed = await run_in_threadpool(batches.resume)
        if resumed:
            log.warning("resuming %d unfinished batches: %s", len(resumed), ", ".join(resumed))
        try:
            yield
        finally:
            await run_in_threadpool(batches.shutdown)
            await run_in_threadpool(realtime.close)
            catalogue.close()

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        ApiError: _api_error,
        HTTPException: _http_error,
    }
    app = Starlette(
        routes=[
            Route("/v1/files", upload, methods=["POST"]),
            Route("/v1/files", list_files, methods=["GET"]),
            Route("/v1/files/{file_id}", get_file, methods=["GET"]),
            Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
            Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
            Route("/v1/batches", create_batch, methods=["POST"]),
            Route("/v1/batches", list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
            Route("/v1/messages/batches", create_message_batch, methods=["POST"]),
            Route("/v1/messages/batches", list_message_batches, methods=["GET"]),
            Route("/v1/messages/batches/{batch_id}", get_message_batch, methods=["GET"]),
            Route("/v1/messages/batches/{batch_id}", delete_message_batch, methods=["DELETE"]),
            Route(
                "/v1/messages/batches/{batch_id}/results", message_batch_results, methods=["GET"]
            ),
            Route("/v1/messages/batches/{batch_id}/cancel", cancel_message_batch, methods=["POST"]),
            *metrics.routes(may_scrape if config.spec.metrics.require_key else None),
            *dashboard.routes(config.ledger_url, dashboard.service_access(keys, catalogue)),
            *realtime.routes(tenant),
        ],
        exception_handlers=handlers,
        lifespan=lifespan,
        middleware=[Middleware(MetricsMiddleware, metrics=metrics)],
    )
    app.state.batches = batches
    app.state.metrics = metrics
    app.state.realtime = realtime
    return app
