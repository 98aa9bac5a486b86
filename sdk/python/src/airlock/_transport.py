"""HTTP/1.1 to the daemon with the standard library's http.client: over
its Unix socket (the caller is whoever owns this process) or over TLS on
TCP with a bearer token.

Every request opens its own connection. The daemon answers exec output,
files and events as streams that stay open as long as they last, and a
connection closed early is how a client cancels an exec; one connection
per request keeps those semantics plain and the client thread-safe.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
from typing import Any, BinaryIO, Iterable, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlencode, urlsplit

from ._errors import DaemonUnavailable, ProtocolError, error_from_body

#: What a query may hold: pairs, so a key can repeat (``label=…&label=…``).
Query = Sequence[Tuple[str, str]]
#: What a request body may be: bytes, or a file object read as it is sent.
Body = Union[bytes, BinaryIO, Iterable[bytes], None]


def default_socket() -> str:
    """The socket the CLI looks for a daemon on: ``$AIRLOCK_SOCKET``, else
    ``/run/airlock/airlock.sock`` for root and
    ``$XDG_RUNTIME_DIR/airlock/airlock.sock`` for anyone else."""
    explicit = os.environ.get("AIRLOCK_SOCKET")
    if explicit:
        return explicit
    if os.geteuid() == 0:
        return "/run/airlock/airlock.sock"
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR", "")
    if not os.path.isabs(runtime_dir):
        raise DaemonUnavailable(
            "cannot choose the daemon's socket: XDG_RUNTIME_DIR is not set to an absolute path; "
            "set AIRLOCK_SOCKET or pass socket= to airlock.Client"
        )
    return os.path.join(runtime_dir, "airlock", "airlock.sock")


class _UnixConnection(http.client.HTTPConnection):
    """http.client's connection, on a Unix socket instead of TCP."""

    def __init__(self, path: str, timeout: Optional[float]) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Response:
    """An answer with a 2xx status whose body has not been read yet. Closing
    it closes its connection (for an exec: cancels it)."""

    def __init__(self, conn: http.client.HTTPConnection, raw: http.client.HTTPResponse) -> None:
        self._conn = conn
        self.raw = raw
        self.status = raw.status

    def header(self, name: str) -> Optional[str]:
        return self.raw.getheader(name)

    def read(self, amount: Optional[int] = None) -> bytes:
        try:
            return self.raw.read(amount)
        except (http.client.HTTPException, OSError) as e:
            raise ProtocolError(f"the daemon's answer broke off: {e!r}") from e

    def readline(self) -> bytes:
        try:
            return self.raw.readline()
        except (http.client.HTTPException, OSError) as e:
            raise ProtocolError(f"the daemon's answer broke off: {e!r}") from e

    def read_exactly(self, amount: int) -> Optional[bytes]:
        """``amount`` bytes, or None at a clean end before the first of them."""
        data = self.read(amount)
        if not data:
            return None
        while len(data) < amount:
            more = self.read(amount - len(data))
            if not more:
                raise ProtocolError(f"the daemon's answer ended inside a frame ({len(data)} of {amount} bytes)")
            data += more
        return data

    def json(self) -> Any:
        body = self.read()
        self.close()
        try:
            return json.loads(body)
        except ValueError as e:
            raise ProtocolError(f"the daemon answered {self.status} with a body that is not JSON: {body[:200]!r}") from e

    def close(self) -> None:
        self.raw.close()
        self._conn.close()

    def __enter__(self) -> "Response":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transport:
    """Where the daemon is and how to authenticate to it."""

    def __init__(
        self,
        url: Optional[str] = None,
        *,
        socket_path: Optional[str] = None,
        token: Optional[str] = None,
        ca: Union[str, "os.PathLike[str]", None] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        timeout: Optional[float] = None,
    ) -> None:
        self.timeout = timeout
        self._token = token
        self._host: Optional[str] = None
        self._port = 0
        self._ssl: Optional[ssl.SSLContext] = None
        self.socket_path: Optional[str] = None
        if url is not None:
            if socket_path is not None:
                raise ValueError("give url= (TCP) or socket= (Unix socket), not both")
            parts = urlsplit(url)
            if parts.scheme == "unix":
                self.socket_path = parts.path
            elif parts.scheme == "https":
                if not parts.hostname:
                    raise ValueError(f"url {url!r} names no host")
                if parts.path not in ("", "/"):
                    raise ValueError(f"url {url!r}: give only https://HOST:PORT, the API's paths are added")
                self._host = parts.hostname
                self._port = parts.port or 443
                if ssl_context is None:
                    ssl_context = ssl.create_default_context(cafile=os.fspath(ca) if ca is not None else None)
                elif ca is not None:
                    raise ValueError("give ca= or ssl_context=, not both")
                self._ssl = ssl_context
                if not token:
                    raise ValueError("the daemon's TCP listener needs a bearer token: pass token=")
            else:
                # The daemon has no plain-HTTP mode: TCP is TLS with tokens.
                raise ValueError(f"url {url!r}: expected https://HOST:PORT or unix:///path/to/airlock.sock")
        else:
            self.socket_path = socket_path if socket_path is not None else default_socket()
        if self.socket_path is not None and token is not None:
            raise ValueError("the Unix socket takes no token: the caller is this process's user")

    def describe(self) -> str:
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        return f"https://{self._host}:{self._port}"

    def _connection(self) -> http.client.HTTPConnection:
        if self.socket_path is not None:
            return _UnixConnection(self.socket_path, self.timeout)
        assert self._host is not None
        return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout, context=self._ssl)

    def open(
        self,
        method: str,
        path: str,
        *,
        query: Query = (),
        json_body: Any = None,
        body: Body = None,
        length: Optional[int] = None,
        content_type: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> Response:
        """Sends a request and returns the answer once its status arrived.
        A 4xx/5xx raises the API's error; the body of a 2xx is left to read."""
        target = path + ("?" + urlencode(list(query)) if query else "")
        send_headers = {"Accept": "application/json"}
        if headers:
            send_headers.update(headers)
        if self._token is not None:
            send_headers["Authorization"] = f"Bearer {self._token}"
        payload: Body = body
        if json_body is not None:
            payload = json.dumps(json_body).encode()
            content_type = "application/json"
        if content_type is not None:
            send_headers["Content-Type"] = content_type
        if isinstance(payload, bytes):
            send_headers["Content-Length"] = str(len(payload))
        elif payload is not None:
            if length is None:
                raise ValueError("a streamed body needs its length: the daemon refuses uploads without one")
            send_headers["Content-Length"] = str(length)
        elif method in ("POST", "PUT"):
            send_headers["Content-Length"] = "0"
        conn = self._connection()
        try:
            conn.request(method, target, body=payload, headers=send_headers)
            raw = conn.getresponse()
        except (FileNotFoundError, PermissionError) as e:
            conn.close()
            raise DaemonUnavailable(
                f"cannot reach an airlock daemon at {self.describe()}: {e.strerror}; start `airlock daemon`, "
                "or point AIRLOCK_SOCKET at its socket"
            ) from e
        except ssl.SSLError as e:
            conn.close()
            raise DaemonUnavailable(f"TLS with {self.describe()} failed: {e}") from e
        except (ConnectionError, socket.timeout, socket.gaierror) as e:
            conn.close()
            raise DaemonUnavailable(f"could not reach the airlock daemon at {self.describe()}: {e}") from e
        except (http.client.HTTPException, OSError) as e:
            conn.close()
            raise ProtocolError(f"{method} {path} at {self.describe()} failed: {e!r}") from e
        if raw.status >= 400:
            try:
                data = raw.read()
            except (http.client.HTTPException, OSError):
                data = b""
            finally:
                conn.close()
            raise error_from_body(raw.status, data)
        return Response(conn, raw)

    def json(self, method: str, path: str, *, query: Query = (), json_body: Any = None) -> Any:
        """A request whose answer is JSON."""
        return self.open(method, path, query=query, json_body=json_body).json()


def pairs(**params: Union[str, int, bool, None, List[str]]) -> List[Tuple[str, str]]:
    """Query pairs from keyword arguments: None is left out, True is
    ``true``, a list repeats its key."""
    out: List[Tuple[str, str]] = []
    for key, value in params.items():
        if value is None or value is False:
            continue
        if value is True:
            out.append((key, "true"))
        elif isinstance(value, list):
            out.extend((key, v) for v in value)
        else:
            out.append((key, str(value)))
    return out
