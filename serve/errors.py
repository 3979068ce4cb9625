"""HTTP errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with its status.

The library's own exceptions are translated here, once (as ``cli/app.py`` does for the command line):
a reference that names nothing is 404, a bad force or a request the model cannot take is 400, a full
queue 429, a model that cannot be loaded 503. Messages are one line.
"""

from __future__ import annotations

from typing import Any

from atmoe.errors import AtmoeError, ModelLoadError, NotFound, RoutingError, UsageError
from atmoe.serve.protocol import ErrorResponse


class ApiError(Exception):
    """An error answer: status, message, and OpenAI's ``type`` / ``param`` / ``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def model_error(error: Exception, ref: str) -> ApiError:
    """A failure to resolve or load the model ``ref`` as an ``ApiError``."""
    from atmoe.serve.engine import QueueFull, WorkerClosed

    if isinstance(error, (NotFound, UsageError)):
        return ApiError(404, f"model {ref!r}: {error}", param="model", code="model_not_found")
    if isinstance(error, QueueFull):
        return ApiError(429, str(error), type="rate_limit_error", code="queue_full")
    if isinstance(error, WorkerClosed):
        return ApiError(503, str(error), type="server_error", code="unavailable")
    if isinstance(error, ModelLoadError):
        return ApiError(503, f"model {ref!r} cannot be loaded: {error}", type="server_error", code="model_load_failed")
    if isinstance(error, AtmoeError):
        return ApiError(500, f"model {ref!r}: {error}", type="server_error", code="model_error")
    raise error


def force_error(error: RoutingError) -> ApiError:
    return ApiError(400, f"atmoe.force: {error}", param="atmoe.force", code="invalid_force")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "model": ErrorResponse}
    for status, description in (
        (400, "Bad request: malformed JSON, a bad parameter, a bad force, a prompt longer than the context"),
        (401, "Missing or wrong API key"),
        (404, "No such model in the catalog"),
        (413, "Request body too large"),
        (429, "The model's queue is full"),
        (503, "The model cannot be loaded, or the server is stopping"),
    )
}
