"""Exceptions: one base class, and the API's errors as classes by status.

The daemon answers every failure with a 4xx/5xx status and
``{"error": {"code": "...", "message": "..."}}``; ``code`` is stable and
meant for programs (docs/api.md lists them), ``message`` is for people.
"""

from __future__ import annotations

import json
from typing import Dict, Type


class AirlockError(Exception):
    """Anything this package raises."""


class DaemonUnavailable(AirlockError):
    """No daemon answered: the socket or address could not be reached."""


class ProtocolError(AirlockError):
    """The daemon's answer broke off or was not what the API promises."""


class ExecInterrupted(AirlockError):
    """An exec broke off before its process ended (the sandbox stopped under it)."""


class ApiError(AirlockError):
    """The daemon refused a request: ``status``, its ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class BadRequest(ApiError):
    """400: the request itself is wrong (``invalid_json``, ``invalid_path``, …)."""


class Unauthorized(ApiError):
    """401: over TCP, no token, or one the daemon does not know."""


class Forbidden(ApiError):
    """403: the caller may not do this (``forbidden``, ``writeback_forbidden``)."""


class NotFound(ApiError):
    """404: no such sandbox (``not_found``), file (``file_not_found``) or route."""


class Conflict(ApiError):
    """409: the sandbox's state forbids it (``conflict``, ``not_running``, ``still_running``, …)."""


class Unprocessable(ApiError):
    """422: understood but not possible here (``host_unsupported``, ``wrong_file_type``, …)."""


class ServerError(ApiError):
    """5xx: the daemon failed (``create_failed``, ``internal``, …)."""


_BY_STATUS: Dict[int, Type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: Unprocessable,
}


def error_for(status: int, code: str, message: str) -> ApiError:
    """The exception for an error the API reported."""
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return cls(status, code, message)


def error_from_body(status: int, body: bytes) -> ApiError:
    """The exception for an error response; a body that is not the API's
    error shape (a proxy's page, say) keeps its text as the message."""
    try:
        parsed = json.loads(body)
        error = parsed["error"]
        code, message = error["code"], error["message"]
        if isinstance(code, str) and isinstance(message, str):
            return error_for(status, code, message)
    except (ValueError, KeyError, TypeError):
        pass
    text = body.decode("utf-8", errors="replace").strip()[:1000]
    return error_for(status, "unknown", text or f"HTTP status {status} without an error body")
