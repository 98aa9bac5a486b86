"""A real `airlock daemon` for the tests: on a private Unix socket and a
TLS listener on loopback (a certificate made with openssl, one token), its
own state directory and cgroup parent, stopped with what it left removed.

The binary comes from AIRLOCK_BIN (crates/cli/tests/suite/python_sdk.rs
passes the one cargo built); AIRLOCK_TEST_ROOT is where the daemon's files
go (a directory the sandboxes' unprivileged root can walk through).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

import airlock


@dataclass
class Daemon:
    binary: str
    dir: Path
    socket: Path
    state: Path
    port: int
    cert: Path
    token: str
    env: dict[str, str]

    def log(self) -> str:
        return (self.dir / "daemon.log").read_text(errors="replace")

    def airlock(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The CLI, without a daemon, on this daemon's state directory."""
        return subprocess.run(
            [self.binary, *args], env=self.env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120
        )


def _binary() -> str:
    binary = os.environ.get("AIRLOCK_BIN")
    if not binary or not os.access(binary, os.X_OK):
        raise pytest.UsageError(
            "set AIRLOCK_BIN to a built airlock binary (cargo test -p airlock --test all -- suite::python_sdk runs "
            "these tests with it)"
        )
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _write_cert(dir: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (mode 0600)."""
    cert, key = dir / "cert.pem", dir / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    binary = _binary()
    root = Path(os.environ.get("AIRLOCK_TEST_ROOT") or tempfile.gettempdir())
    dir = Path(tempfile.mkdtemp(prefix="airlock-pysdk-", dir=root))
    # The sandbox's root is an unprivileged host uid that must reach its
    # mount points below the state directory.
    dir.chmod(0o755)
    cert, key = _write_cert(dir)
    token = secrets.token_hex(16)
    tokens = dir / "tokens"
    tokens.write_text(f"{os.geteuid()} {hashlib.sha256(token.encode()).hexdigest()} pytest\n")
    tokens.chmod(0o600)
    port = _free_port()
    env = dict(os.environ)
    env.update(
        AIRLOCK_STATE_DIR=str(dir / "state"),
        AIRLOCK_CGROUP_PARENT=f"airlock-pysdk-{os.getpid()}",
        AIRLOCK_SOCKET=str(dir / "no-daemon.sock"),
    )
    env.pop("AIRLOCK_LOG", None)
    d = Daemon(binary, dir, dir / "run" / "airlock.sock", dir / "state", port, cert, token, env)
    with open(dir / "daemon.log", "ab") as log:
        proc = subprocess.Popen(
            [binary, "daemon", "--socket", str(d.socket), "--listen", f"127.0.0.1:{port}",
             "--tls-cert", str(cert), "--tls-key", str(key), "--tokens", str(tokens)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    try:
        client = airlock.Client(socket=str(d.socket), timeout=5)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.health()
                break
            except airlock.DaemonUnavailable:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not come up on {d.socket}:\n{d.log()}") from None
                time.sleep(0.05)
        yield d
    finally:
        # Whatever a failed test left: removed through the daemon, then
        # the daemon stopped and `gc` run on its state directory.
        try:
            for info in airlock.Client(socket=str(d.socket)).list():
                airlock.Client(socket=str(d.socket)).sandbox(info.name).destroy()
        except airlock.AirlockError as e:
            print(f"removing leftover sandboxes failed: {e}")
        proc.terminate()
        proc.wait(timeout=30)
        d.airlock("gc")
        shutil.rmtree(dir, ignore_errors=True)


@pytest.fixture
def client(daemon: Daemon) -> airlock.Client:
    return airlock.Client(socket=str(daemon.socket))


@pytest.fixture
def workspace(daemon: Daemon) -> Iterator[Path]:
    """A directory with two files, for a sandbox's overlay workspace."""
    ws = Path(tempfile.mkdtemp(prefix="ws-", dir=daemon.dir))
    ws.chmod(0o755)
    (ws / "README").write_text("hello\n")
    (ws / "src").mkdir()
    (ws / "src" / "lib.c").write_text("int x;\n")
    yield ws
    shutil.rmtree(ws, ignore_errors=True)


def event_kinds(events: list[airlock.Event]) -> list[str]:
    return [e.kind for e in events]


def dump(value: object) -> str:
    return json.dumps(value, default=str, indent=1)
