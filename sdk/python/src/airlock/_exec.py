"""Reading an exec's output as it arrives: the NDJSON form (output only)
and the framed form (``?stream=raw``, used when the process gets stdin)."""

from __future__ import annotations

import base64
import json
import struct
from types import TracebackType
from typing import Any, Dict, Iterator, List, Optional, Type

from ._errors import ExecInterrupted, ProtocolError
from ._models import ExecResult, ExitStatus, OutputChunk
from ._transport import Response

# Frame types of the framed form (crates/proto/src/exec_stream.rs).
FRAME_STDIN = 0
FRAME_STDOUT = 1
FRAME_STDERR = 2
FRAME_END = 3
#: The largest payload the daemon takes in one frame.
MAX_FRAME = 1 << 20


def stdin_frames(data: bytes) -> bytes:
    """``data`` as stdin frames; the end of the request body closes stdin."""
    out = bytearray()
    for start in range(0, len(data), MAX_FRAME):
        piece = data[start : start + MAX_FRAME]
        out += struct.pack(">BI", FRAME_STDIN, len(piece)) + piece
    return bytes(out)


class ExecStream:
    """A running process's output, chunk by chunk, as it writes it.

    Iterate it for :class:`OutputChunk` values; when the iteration ends the
    process has ended and ``exit`` says how. Closing the stream before that
    (leaving a ``with`` block, ``close()``) hangs up, and the daemon kills
    the process's group: an exec lives as long as someone reads it.
    """

    def __init__(self, response: Response, framed: bool) -> None:
        self._response = response
        self._framed = framed
        self._done = False
        self.pid: Optional[int] = None
        """The process's pid inside the sandbox (NDJSON form only)."""
        self.exit: Optional[ExitStatus] = None
        """How the process ended; None until the stream has been read to its end."""

    @property
    def exit_code(self) -> Optional[int]:
        return self.exit.exit_code if self.exit is not None else None

    def __iter__(self) -> Iterator[OutputChunk]:
        try:
            while not self._done:
                chunk = self._next_frame() if self._framed else self._next_line()
                if chunk is not None:
                    yield chunk
        finally:
            if not self._done:
                self.close()

    def _end(self, obj: Dict[str, Any]) -> None:
        self._done = True
        self._response.close()
        if obj.get("type") == "exit":
            self.exit = ExitStatus.from_json(obj)
            return
        message = obj.get("message")
        raise ExecInterrupted(f"the exec broke off: {message if isinstance(message, str) else obj!r}")

    def _next_line(self) -> Optional[OutputChunk]:
        line = self._response.readline()
        if not line:
            self.close()
            raise ProtocolError("the exec's answer ended without its exit line")
        try:
            obj = json.loads(line)
        except ValueError as e:
            self.close()
            raise ProtocolError(f"the exec's answer has a line that is not JSON: {line[:200]!r}") from e
        kind = obj.get("type")
        if kind in ("stdout", "stderr"):
            return OutputChunk(kind, base64.b64decode(obj.get("data", "")))
        if kind == "started":
            pid = obj.get("pid")
            self.pid = pid if isinstance(pid, int) else None
            return None
        if kind in ("exit", "error"):
            self._end(obj)
            return None
        return None  # A kind added after this version: nothing to do with it.

    def _next_frame(self) -> Optional[OutputChunk]:
        head = self._response.read_exactly(5)
        if head is None:
            self.close()
            raise ProtocolError("the exec's answer ended without its end frame")
        kind, length = struct.unpack(">BI", head)
        if length > MAX_FRAME:
            self.close()
            raise ProtocolError(f"the exec's answer has a frame of {length} bytes, over the 1 MiB limit")
        payload = self._response.read_exactly(length) if length else b""
        if payload is None:
            self.close()
            raise ProtocolError("the exec's answer ended inside a frame")
        if kind == FRAME_STDOUT:
            return OutputChunk("stdout", payload)
        if kind == FRAME_STDERR:
            return OutputChunk("stderr", payload)
        if kind == FRAME_END:
            try:
                obj = json.loads(payload)
            except ValueError as e:
                self.close()
                raise ProtocolError(f"the exec's end frame is not JSON: {payload[:200]!r}") from e
            self._end(obj)
        return None

    def collect(self) -> ExecResult:
        """Reads to the end and returns everything the process wrote."""
        out: List[bytes] = []
        err: List[bytes] = []
        for chunk in self:
            (out if chunk.stream == "stdout" else err).append(chunk.data)
        assert self.exit is not None
        return ExecResult(
            exit_code=self.exit.exit_code,
            signal=self.exit.signal,
            timed_out=self.exit.timed_out,
            stdout_bytes=b"".join(out),
            stderr_bytes=b"".join(err),
        )

    def close(self) -> None:
        """Hangs up; a process still running is killed by the daemon."""
        self._done = True
        self._response.close()

    def __enter__(self) -> "ExecStream":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()
