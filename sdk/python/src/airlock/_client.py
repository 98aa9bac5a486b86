"""The client, sandboxes and their files."""

from __future__ import annotations

import json
import os
import ssl
from types import TracebackType
from typing import Any, BinaryIO, Dict, Iterator, List, Mapping, Optional, Sequence, Type, Union
from urllib.parse import quote

from ._errors import AirlockError, NotFound, ProtocolError, error_for
from ._exec import ExecStream, stdin_frames
from ._models import ApplyResult, Diff, Event, ExecResult, FileEntry, Listing, NetEvent, SandboxInfo
from ._transport import Transport, pairs

#: A duration: seconds, or text like ``"30s"``, ``"10m"``, ``"2h"``.
Duration = Union[int, str]
#: A size: bytes, or text like ``"512M"``, ``"2G"``.
Size = Union[int, str]


def _sandbox_path(name: str, rest: str = "") -> str:
    return f"/v1/sandboxes/{quote(name, safe='')}{rest}"


def _parse_sse(lines: Iterator[bytes]) -> Iterator[Event]:
    """Server-sent events: ``id``/``event``/``data`` fields up to a blank
    line; comment lines (keepalives) skipped."""
    kind: Optional[str] = None
    data: List[str] = []
    for raw_line in lines:
        line = raw_line.decode("utf-8", errors="replace").rstrip("\r\n")
        if line == "":
            if data:
                obj = json.loads("\n".join(data))
                if kind == "error":
                    # The stream's own failure, after its 200.
                    raise error_for(500, str(obj.get("code", "internal")), str(obj.get("message", obj)))
                yield Event.from_json(obj)
            kind, data = None, []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                kind = value
            elif field == "data":
                data.append(value)


class Client:
    """A connection to an airlock daemon.

    ``Client()`` talks to the daemon on its Unix socket, found as the CLI
    finds it (``$AIRLOCK_SOCKET``, else ``/run/airlock/airlock.sock`` for
    root and ``$XDG_RUNTIME_DIR/airlock/airlock.sock`` for other users);
    ``Client(socket=PATH)`` names the socket. ``Client(url="https://host:port",
    token=..., ca="cert.pem")`` talks to its TCP listener (``airlock daemon
    --listen``) with a bearer token; ``ca`` is the certificate (or CA) to
    trust, the system's trust store when absent. ``timeout`` (seconds)
    bounds connecting and each wait for data; None waits as long as it
    takes (an exec may run for hours).
    """

    def __init__(
        self,
        url: Optional[str] = None,
        *,
        socket: Optional[str] = None,
        token: Optional[str] = None,
        ca: Union[str, "os.PathLike[str]", None] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        timeout: Optional[float] = None,
    ) -> None:
        self.transport = Transport(
            url, socket_path=socket, token=token, ca=ca, ssl_context=ssl_context, timeout=timeout
        )

    def __repr__(self) -> str:
        return f"airlock.Client({self.transport.describe()!r})"

    def health(self) -> Dict[str, Any]:
        """``{"status": "ok", "version": …, "api": "v1"}``."""
        answer: Dict[str, Any] = self.transport.json("GET", "/v1/health")
        return answer

    def list(self, *, labels: Optional[Mapping[str, str]] = None, states: Sequence[str] = ()) -> List[SandboxInfo]:
        """The caller's sandboxes, oldest first: those with every label in
        ``labels`` and, when ``states`` is given, in one of them."""
        query = pairs(
            label=[f"{k}={v}" for k, v in (labels or {}).items()],
            state=list(states),
        )
        answer = self.transport.json("GET", "/v1/sandboxes", query=query)
        return [SandboxInfo.from_json(s) for s in answer.get("sandboxes", [])]

    def create(self, name: Optional[str] = None, **options: Any) -> "Sandbox":
        """Creates a sandbox now and returns it (running). Takes the options
        of :class:`Sandbox`; remove it with ``destroy()`` (or use
        ``with client.create(...) as sb``)."""
        sandbox = Sandbox(name, client=self, **options)
        sandbox.create()
        return sandbox

    def sandbox(self, name: str) -> "Sandbox":
        """An existing sandbox, by name. Nothing is asked of the daemon until
        it is used; leaving a ``with`` block destroys it like any other."""
        sandbox = Sandbox(name, client=self)
        sandbox._created = True
        return sandbox

    def events(self, *, sandbox: Optional[str] = None, since: Optional[int] = None, follow: bool = False) -> Iterator[Event]:
        """The daemon's event log, the caller's own events only, oldest
        first. ``since`` starts after that event id; ``follow`` keeps the
        iterator waiting for new events until it is closed."""
        response = self.transport.open(
            "GET",
            "/v1/events",
            query=pairs(sandbox=sandbox, since=since, follow=follow),
            headers={"Accept": "text/event-stream"},
        )

        def lines() -> Iterator[bytes]:
            while True:
                line = response.readline()
                if not line:
                    return
                yield line

        try:
            yield from _parse_sse(lines())
        except ValueError as e:
            raise ProtocolError(f"an event's data is not JSON: {e}") from e
        finally:
            response.close()


class Files:
    """A running sandbox's files, as its own processes see them. Paths are
    absolute paths inside the sandbox; nothing follows a symlink at the last
    component. Each operation is done by the sandbox's agent, not by a
    program in the sandbox, and is in its audit log."""

    def __init__(self, sandbox: "Sandbox") -> None:
        self._sandbox = sandbox

    def _path(self, rest: str) -> str:
        return _sandbox_path(self._sandbox.name, rest)

    def read(self, path: str) -> bytes:
        """The bytes of a regular file (``NotFound`` with code
        ``file_not_found`` when there is none; ``Unprocessable`` with
        ``wrong_file_type`` for a directory, symlink, FIFO…)."""
        with self._sandbox.client.transport.open("GET", self._path("/files"), query=pairs(path=path)) as response:
            length = response.header("Content-Length")
            data = response.read()
            if length is not None and len(data) != int(length):
                raise ProtocolError(f"reading {path} broke off after {len(data)} of {length} bytes")
            return data

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def write(self, path: str, data: Union[bytes, str, BinaryIO], *, mode: Optional[int] = None) -> int:
        """Writes ``data`` (bytes, text as UTF-8, or a binary file object read
        from its position to its end) to ``path``, replacing a regular file
        there (which keeps its mode) or creating one with ``mode`` (default
        ``0o644``). The file changes only once every byte arrived. Returns
        the size written."""
        length: Optional[int] = None
        body: Union[bytes, BinaryIO]
        if isinstance(data, str):
            body = data.encode()
        elif isinstance(data, (bytes, bytearray, memoryview)):
            body = bytes(data)
        else:
            body = data
            start = data.tell()
            length = data.seek(0, os.SEEK_END) - start
            data.seek(start)
        query = pairs(path=path, mode=format(mode, "o") if mode is not None else None)
        answer = self._sandbox.client.transport.open(
            "PUT", self._path("/files"), query=query, body=body, length=length, content_type="application/octet-stream"
        ).json()
        return int(answer.get("size", 0))

    def list(self, path: str, *, depth: Optional[int] = None, max_entries: Optional[int] = None) -> Listing:
        """The directory's entries, sorted by name; ``depth`` levels deep
        (deeper entries named ``a/b``)."""
        query = pairs(path=path, depth=depth, max_entries=max_entries)
        answer = self._sandbox.client.transport.json("GET", self._path("/files/list"), query=query)
        entries = [FileEntry.from_json(e) for e in answer.get("entries", [])]
        return Listing(str(answer.get("path", path)), entries, answer.get("truncated") is True)

    def stat(self, path: str) -> FileEntry:
        """One entry; a symlink is described (with its target), not followed."""
        return FileEntry.from_json(
            self._sandbox.client.transport.json("GET", self._path("/files/stat"), query=pairs(path=path))
        )

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except NotFound:
            return False
        return True

    def mkdir(self, path: str, *, parents: bool = False, mode: Optional[int] = None) -> None:
        """Makes a directory (``mode`` default ``0o755``); with ``parents``
        the missing ones above it too, and an existing one is no error."""
        query = pairs(path=path, parents=parents, mode=format(mode, "o") if mode is not None else None)
        self._sandbox.client.transport.json("POST", self._path("/files/mkdir"), query=query)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Removes a file, a symlink or an empty directory; ``recursive``
        removes a directory with everything below it."""
        query = pairs(path=path, recursive=recursive)
        self._sandbox.client.transport.json("DELETE", self._path("/files"), query=query)

    def rename(self, source: str, target: str, *, replace: bool = True) -> None:
        """Renames ``source`` to ``target``; with ``replace=False`` an
        existing target raises ``Conflict`` (code ``file_exists``)."""
        query = pairs(**{"from": source, "to": target, "replace": "true" if replace else "false"})
        self._sandbox.client.transport.json("POST", self._path("/files/rename"), query=query)


class Sandbox:
    """An airlock sandbox.

    As a context manager it is created when the ``with`` block starts and
    destroyed (stopped and removed) when it ends; ``keep=True`` leaves it
    as it is instead. Without ``with``, call :meth:`create` and
    :meth:`destroy`. The options are those of ``POST /v1/sandboxes``
    (docs/api.md): a built-in ``policy`` (``dev``, ``ci``, ``plugin``,
    ``remediation``; root may name a policy file), a ``workspace``
    directory (a relative path is made absolute here, so it means this
    process's directory: the daemon must run on this host), durations as
    seconds or ``"10m"``, sizes as bytes or ``"2G"``.
    """

    def __init__(
        self,
        name: Optional[str] = None,
        *,
        policy: Optional[str] = None,
        workspace: Union[str, "os.PathLike[str]", None] = None,
        workspace_mode: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        labels: Optional[Mapping[str, str]] = None,
        timeout: Optional[Duration] = None,
        idle_timeout: Optional[Duration] = None,
        memory: Optional[Size] = None,
        pids: Optional[int] = None,
        cpus: Optional[float] = None,
        allow: Optional[Sequence[str]] = None,
        tier: Optional[str] = None,
        keep: bool = False,
        client: Optional[Client] = None,
    ) -> None:
        self.client = client if client is not None else Client()
        self._name = name
        self._created = False
        self.keep = keep
        self.files = Files(self)
        request: Dict[str, Any] = {
            "name": name,
            "policy": policy,
            "workspace": os.path.abspath(os.fspath(workspace)) if workspace is not None else None,
            "workspace_mode": workspace_mode,
            "env": dict(env) if env else None,
            "labels": dict(labels) if labels else None,
            "timeout": timeout,
            "idle_timeout": idle_timeout,
            "memory": memory,
            "pids": pids,
            "cpus": cpus,
            "allow": list(allow) if allow else None,
            "tier": tier,
        }
        self._request = {k: v for k, v in request.items() if v is not None}

    def __repr__(self) -> str:
        return f"airlock.Sandbox({self._name!r})"

    @property
    def name(self) -> str:
        """The sandbox's name (generated by the daemon when none was given)."""
        if self._name is None:
            raise AirlockError("the sandbox has no name yet: create it first")
        return self._name

    def create(self) -> SandboxInfo:
        """Creates the sandbox; returns once it runs."""
        if self._created:
            raise AirlockError(f"sandbox {self._name} was already created")
        info = SandboxInfo.from_json(self.client.transport.json("POST", "/v1/sandboxes", json_body=self._request))
        self._name = info.name
        self._created = True
        return info

    def info(self) -> SandboxInfo:
        """The sandbox as ``GET /v1/sandboxes/{name}`` shows it (state,
        limits, deadline, … in ``raw``)."""
        return SandboxInfo.from_json(self.client.transport.json("GET", _sandbox_path(self.name)))

    def exec_stream(
        self,
        argv: Sequence[str],
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        timeout: Optional[Duration] = None,
        user: Optional[str] = None,
        tty: bool = False,
        stdin: Optional[bytes] = None,
    ) -> ExecStream:
        """Starts ``argv`` in the sandbox and returns its output as it comes.

        The process reads ``stdin`` (then end-of-file), or nothing. ``user``
        is ``UID[:GID]`` or ``NAME[:GROUP]`` of the sandbox (root inside
        otherwise); ``tty`` gives it a terminal, whose output is all
        ``stdout``; ``timeout`` kills it (exit code 124). A sandbox that is
        unknown or not running raises before anything starts.
        """
        request: Dict[str, Any] = {"argv": list(argv)}
        if env:
            request["env"] = dict(env)
        if cwd is not None:
            request["cwd"] = cwd
        if timeout is not None:
            request["timeout"] = timeout
        if user is not None:
            request["user"] = user
        if tty:
            request["tty"] = True
        path = _sandbox_path(self.name, "/exec")
        transport = self.client.transport
        if stdin is None:
            return ExecStream(transport.open("POST", path, json_body=request), framed=False)
        # The framed form: the request line, then stdin; the body's end closes stdin.
        body = json.dumps(request).encode() + b"\n" + stdin_frames(stdin)
        response = transport.open("POST", path, query=[("stream", "raw")], body=body, content_type="application/json")
        return ExecStream(response, framed=True)

    def exec(
        self,
        argv: Sequence[str],
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        timeout: Optional[Duration] = None,
        user: Optional[str] = None,
        tty: bool = False,
        stdin: Optional[bytes] = None,
    ) -> ExecResult:
        """Runs ``argv`` in the sandbox to its end; see :meth:`exec_stream`.
        A non-zero exit is a result, not an exception."""
        stream = self.exec_stream(argv, env=env, cwd=cwd, timeout=timeout, user=user, tty=tty, stdin=stdin)
        return stream.collect()

    def diff(self) -> Diff:
        """What the sandbox changed in its workspace overlay (``Conflict``
        with code ``no_overlay`` when it has none)."""
        return Diff.from_json(self.client.transport.json("GET", _sandbox_path(self.name, "/diff")))

    def patch(self) -> str:
        """The change as a unified diff (what ``airlock diff`` prints),
        ending with its ``change sha256:…`` line."""
        with self.client.transport.open("GET", _sandbox_path(self.name, "/diff"), query=pairs(format="patch")) as r:
            return r.read().decode("utf-8", errors="replace")

    def apply(self, *, expect: Optional[str] = None, allow_protected: bool = False) -> ApplyResult:
        """Writes a stopped sandbox's changes into its workspace, all or
        nothing (``stop()`` it first: a running one raises ``Conflict`` with
        code ``still_running``). With ``expect`` (a :class:`Diff`'s
        ``digest``) only if the change is still exactly that one."""
        body: Dict[str, Any] = {"allow_protected": allow_protected}
        if expect is not None:
            body["expect"] = expect
        return ApplyResult.from_json(
            self.client.transport.json("POST", _sandbox_path(self.name, "/apply"), json_body=body)
        )

    def audit(self) -> List[Dict[str, Any]]:
        """The sandbox's audit log, oldest first, one dict per record
        (``ts``, ``seq``, ``event`` and the event's fields)."""
        with self.client.transport.open("GET", _sandbox_path(self.name, "/audit")) as response:
            records: List[Dict[str, Any]] = []
            for line in response.read().splitlines():
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError as e:
                        raise ProtocolError(f"an audit line is not JSON: {line[:200]!r}") from e
            return records

    def net_log(self) -> List[NetEvent]:
        """Every decision of the sandbox's egress proxy, oldest first (what
        ``airlock net log`` shows)."""
        return [NetEvent.from_json(r) for r in self.audit() if r.get("event") == "network"]

    def events(self) -> List[Event]:
        """The daemon's events for this sandbox so far (``created``,
        ``exec_started``, ``exec_ended``, ``file_written``, …)."""
        return list(self.client.events(sandbox=self.name))

    def logs(self, stream: str = "stdout") -> bytes:
        """Everything the sandbox's processes wrote to ``stream``
        (``stdout`` or ``stderr``), secrets redacted."""
        query = pairs(stream=stream)
        with self.client.transport.open("GET", _sandbox_path(self.name, "/logs"), query=query) as response:
            return response.read()

    def extend(self, seconds: int) -> SandboxInfo:
        """Moves a running sandbox's deadline ``seconds`` later."""
        answer = self.client.transport.json("POST", _sandbox_path(self.name, "/extend"), json_body={"seconds": seconds})
        return SandboxInfo.from_json(answer)

    def stop(self) -> SandboxInfo:
        """Stops the sandbox (SIGTERM, the policy's grace, SIGKILL); its
        diff, logs and audit stay readable until it is destroyed."""
        return SandboxInfo.from_json(self.client.transport.json("POST", _sandbox_path(self.name, "/stop")))

    def destroy(self) -> None:
        """Stops the sandbox if it runs and removes it with its state."""
        self.client.transport.json("DELETE", _sandbox_path(self.name))
        self._created = False

    def __enter__(self) -> "Sandbox":
        if not self._created:
            self.create()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self.keep or not self._created:
            return
        try:
            self.destroy()
        except NotFound:
            self._created = False  # Already gone: nothing left to remove.
        except AirlockError as cleanup:
            if exc is None:
                raise
            # Keep the failure that ended the block, with the cleanup's beside it.
            add_note = getattr(exc, "add_note", None)
            if add_note is not None:
                add_note(f"destroying sandbox {self._name} failed too: {cleanup}")
