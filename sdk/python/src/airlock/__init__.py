"""Python client for airlock's own API: sandboxes as context managers,
exec (streaming too), files, diff, apply, the network log and events.

    import airlock
    with airlock.Sandbox(policy="ci", workspace=".") as sb:
        r = sb.exec(["make", "test"])
        print(r.exit_code, r.stdout)
        print(sb.diff())

It talks to ``airlock daemon`` over its Unix socket by default, or over its
TLS listener with ``airlock.Client(url="https://host:port", token=..., ca=...)``.
The HTTP API it speaks is described in the repository's docs/api.md.
"""

from ._client import Client, Files, Sandbox
from ._errors import (
    AirlockError,
    ApiError,
    BadRequest,
    Conflict,
    DaemonUnavailable,
    ExecInterrupted,
    Forbidden,
    NotFound,
    ProtocolError,
    ServerError,
    Unauthorized,
    Unprocessable,
)
from ._exec import ExecStream
from ._models import (
    ApplyResult,
    Change,
    Diff,
    Event,
    ExecResult,
    ExitStatus,
    FileEntry,
    Listing,
    NetEvent,
    OutputChunk,
    SandboxInfo,
)
from ._transport import default_socket

__version__ = "0.1.0"

__all__ = [
    "AirlockError",
    "ApiError",
    "ApplyResult",
    "BadRequest",
    "Change",
    "Client",
    "Conflict",
    "DaemonUnavailable",
    "Diff",
    "Event",
    "ExecInterrupted",
    "ExecResult",
    "ExecStream",
    "ExitStatus",
    "FileEntry",
    "Files",
    "Forbidden",
    "Listing",
    "NetEvent",
    "NotFound",
    "OutputChunk",
    "ProtocolError",
    "Sandbox",
    "SandboxInfo",
    "ServerError",
    "Unauthorized",
    "Unprocessable",
    "default_socket",
]
