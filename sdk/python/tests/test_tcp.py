"""The SDK over the daemon's TLS listener with a bearer token."""

from __future__ import annotations

import pytest

import airlock
from conftest import Daemon


def tcp_client(daemon: Daemon, token: str) -> airlock.Client:
    return airlock.Client(url=f"https://127.0.0.1:{daemon.port}", token=token, ca=daemon.cert, timeout=60)


def test_a_sandbox_over_tls_with_a_token(daemon: Daemon) -> None:
    client = tcp_client(daemon, daemon.token)
    assert client.health()["status"] == "ok"
    with airlock.Sandbox(policy="ci", client=client) as sb:
        r = sb.exec(["sh", "-c", "echo over tcp"])
        assert (r.exit_code, r.stdout) == (0, "over tcp\n"), r
        chunks = [c.text for c in sb.exec_stream(["sh", "-c", "echo a; echo b >&2"])]
        assert "".join(chunks) in ("a\nb\n", "b\na\n"), chunks
        sb.files.write("/tmp/t", b"tls")
        assert sb.files.read("/tmp/t") == b"tls"
        assert sb.name in [s.name for s in client.list()]
        # The same sandbox, seen on the Unix socket: the token acts as this uid.
        assert airlock.Client(socket=str(daemon.socket)).sandbox(sb.name).info().state == "running"
        assert "created" in [e.kind for e in sb.events()]
    with pytest.raises(airlock.NotFound):
        client.sandbox(sb.name).info()


def test_an_unknown_token_is_unauthorized(daemon: Daemon) -> None:
    with pytest.raises(airlock.Unauthorized) as refused:
        tcp_client(daemon, "not-" + daemon.token).list()
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")


def test_a_certificate_not_trusted_is_refused(daemon: Daemon) -> None:
    untrusted = airlock.Client(url=f"https://127.0.0.1:{daemon.port}", token=daemon.token, timeout=60)
    with pytest.raises(airlock.DaemonUnavailable, match="TLS"):
        untrusted.health()


def test_urls_the_daemon_does_not_serve_are_refused_before_connecting() -> None:
    with pytest.raises(ValueError, match="https"):
        airlock.Client(url="http://127.0.0.1:1", token="t")
    with pytest.raises(ValueError, match="token"):
        airlock.Client(url="https://127.0.0.1:1")
