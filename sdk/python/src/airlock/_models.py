"""What the API answers, as typed values. Each keeps the whole JSON object
it came from in ``raw``: the API adds fields over time, and a field this
version does not name is still there to read."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


def _str(obj: Dict[str, Any], key: str) -> Optional[str]:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _int(obj: Dict[str, Any], key: str) -> Optional[int]:
    value = obj.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as the daemon shows it (list, inspect, stop)."""

    name: str
    state: str
    """``creating``, ``running``, ``stopped`` or ``failed``."""
    policy: Optional[str]
    tier: Optional[str]
    workspace: Optional[str]
    workspace_mode: Optional[str]
    labels: Dict[str, str]
    created_at: Optional[str]
    owner_uid: Optional[int]
    exit: Optional[Dict[str, Any]]
    """How a stopped sandbox ended: ``code``, ``signal``, ``timed_out``, ``oom_killed``."""
    raw: Dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, obj: Dict[str, Any]) -> "SandboxInfo":
        labels = obj.get("labels")
        exit_info = obj.get("exit")
        return cls(
            name=str(obj.get("name", "")),
            state=str(obj.get("state", "")),
            policy=_str(obj, "policy"),
            tier=_str(obj, "tier"),
            workspace=_str(obj, "workspace"),
            workspace_mode=_str(obj, "workspace_mode"),
            labels=dict(labels) if isinstance(labels, dict) else {},
            created_at=_str(obj, "created_at"),
            owner_uid=_int(obj, "owner_uid"),
            exit=exit_info if isinstance(exit_info, dict) else None,
            raw=obj,
        )


@dataclass(frozen=True)
class OutputChunk:
    """Bytes a process wrote, in the order it wrote them."""

    stream: str
    """``stdout`` or ``stderr`` (on a terminal, everything is ``stdout``)."""
    data: bytes

    @property
    def text(self) -> str:
        """The bytes as UTF-8 (invalid sequences replaced). A character may
        be split across two chunks: join ``data`` before decoding when that
        matters."""
        return self.data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended."""

    exit_code: Optional[int]
    """The exit code; 124 when ``timeout`` killed it, 126/127 when it could
    not be started; None when a signal ended it."""
    signal: Optional[int]
    timed_out: bool

    @classmethod
    def from_json(cls, obj: Dict[str, Any]) -> "ExitStatus":
        return cls(exit_code=_int(obj, "code"), signal=_int(obj, "signal"), timed_out=obj.get("timed_out") is True)


@dataclass(frozen=True)
class ExecResult:
    """A finished process: how it ended and everything it wrote."""

    exit_code: Optional[int]
    signal: Optional[int]
    timed_out: bool
    stdout_bytes: bytes = field(repr=False)
    stderr_bytes: bytes = field(repr=False)

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        """Whether the process exited with code 0."""
        return self.exit_code == 0


@dataclass(frozen=True)
class FileEntry:
    """One entry of a directory listing, or a stat (a symlink is described,
    not followed)."""

    name: str
    """Below the listed directory (``a/b`` when listed with depth); lossy
    when the name is not UTF-8 (``name_bytes`` has it exactly)."""
    type: str
    """``file``, ``dir``, ``symlink`` or ``other``."""
    size: int
    mode: int
    """Permission bits (``0o644``)."""
    mtime: Optional[str]
    uid: Optional[int]
    gid: Optional[int]
    link_target: Optional[str]
    raw: Dict[str, Any] = field(repr=False)

    @property
    def name_bytes(self) -> bytes:
        exact = _str(self.raw, "name_b64")
        return base64.b64decode(exact) if exact is not None else self.name.encode()

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @classmethod
    def from_json(cls, obj: Dict[str, Any]) -> "FileEntry":
        return cls(
            name=str(obj.get("name", "")),
            type=str(obj.get("type", "")),
            size=_int(obj, "size") or 0,
            mode=_int(obj, "mode") or 0,
            mtime=_str(obj, "mtime"),
            uid=_int(obj, "uid"),
            gid=_int(obj, "gid"),
            link_target=_str(obj, "link_target"),
            raw=obj,
        )


class Listing(List[FileEntry]):
    """The entries of a directory, sorted by name; ``truncated`` when there
    were more than ``max_entries``."""

    def __init__(self, path: str, entries: List[FileEntry], truncated: bool) -> None:
        super().__init__(entries)
        self.path = path
        self.truncated = truncated

    @property
    def names(self) -> List[str]:
        return [e.name for e in self]


@dataclass(frozen=True)
class Change:
    """One path the sandbox changed in its workspace."""

    path: str
    kind: str
    """``added``, ``modified``, ``deleted`` or ``type_changed``."""
    old_type: Optional[str]
    new_type: Optional[str]
    size: Optional[int]
    binary: bool
    lines_added: Optional[int]
    lines_removed: Optional[int]
    raw: Dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, obj: Dict[str, Any]) -> "Change":
        return cls(
            path=str(obj.get("path", "")),
            kind=str(obj.get("kind", "")),
            old_type=_str(obj, "old_type"),
            new_type=_str(obj, "new_type"),
            size=_int(obj, "size"),
            binary=obj.get("binary") is True,
            lines_added=_int(obj, "lines_added"),
            lines_removed=_int(obj, "lines_removed"),
            raw=obj,
        )


@dataclass(frozen=True)
class Diff:
    """What a sandbox changed in its workspace overlay. ``digest`` names
    exactly this change: pass it to ``apply(expect=…)`` to write only what
    was reviewed."""

    digest: str
    stat: Dict[str, int]
    changes: List[Change]
    raw: Dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, obj: Dict[str, Any]) -> "Diff":
        stat = obj.get("stat")
        changes = obj.get("changes")
        return cls(
            digest=str(obj.get("digest", "")),
            stat={k: v for k, v in stat.items() if isinstance(v, int)} if isinstance(stat, dict) else {},
            changes=[Change.from_json(c) for c in changes if isinstance(c, dict)] if isinstance(changes, list) else [],
            raw=obj,
        )

    def __bool__(self) -> bool:
        return bool(self.changes)

    def __str__(self) -> str:
        lines = [f"{c.kind:<12} {c.path}" for c in self.changes] or ["no changes"]
        return "\n".join(lines + [f"change {self.digest}"])


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply`` wrote into the workspace."""

    applied: bool
    """False when there was nothing to write."""
    written: List[str]
    deleted: List[str]
    digest: str

    @classmethod
    def from_json(cls, obj: Dict[str, Any]) -> "ApplyResult":
        def paths(key: str) -> List[str]:
            value = obj.get(key)
            return [str(p) for p in value] if isinstance(value, list) else []

        return cls(
            applied=obj.get("applied") is True,
            written=paths("written"),
            deleted=paths("deleted"),
            digest=str(obj.get("digest", "")),
        )


@dataclass(frozen=True)
class NetEvent:
    """One decision of the sandbox's egress proxy, from its audit log."""

    ts: str
    via: str
    """``http``, ``socks``, ``transparent`` or ``dns``."""
    host: str
    port: int
    allowed: bool
    rule: str
    """The policy entry that decided, or why nothing allowed it."""
    method: Optional[str]
    path: Optional[str]
    bytes_out: int
    bytes_in: int
    raw: Dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, obj: Dict[str, Any]) -> "NetEvent":
        return cls(
            ts=str(obj.get("ts", "")),
            via=str(obj.get("via", "")),
            host=str(obj.get("host", "")),
            port=_int(obj, "port") or 0,
            allowed=obj.get("allowed") is True,
            rule=str(obj.get("rule", "")),
            method=_str(obj, "method"),
            path=_str(obj, "path"),
            bytes_out=_int(obj, "bytes_out") or 0,
            bytes_in=_int(obj, "bytes_in") or 0,
            raw=obj,
        )


@dataclass(frozen=True)
class Event:
    """One entry of the daemon's event log (``created``, ``exec_ended``, …)."""

    id: int
    ts: str
    sandbox: Optional[str]
    kind: str
    detail: Dict[str, Any]

    @classmethod
    def from_json(cls, obj: Dict[str, Any]) -> "Event":
        detail = obj.get("detail")
        return cls(
            id=_int(obj, "id") or 0,
            ts=str(obj.get("ts", "")),
            sandbox=_str(obj, "sandbox"),
            kind=str(obj.get("kind", "")),
            detail=detail if isinstance(detail, dict) else {},
        )
