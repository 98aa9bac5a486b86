"""The SDK against a real daemon over its Unix socket: a sandbox's life as
a context manager, exec, files, diff and apply, the network log, events,
and the API's errors as exceptions."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

import airlock
from conftest import Daemon, dump, event_kinds


def test_a_sandbox_is_created_on_entering_and_destroyed_on_leaving(client: airlock.Client) -> None:
    with airlock.Sandbox(policy="ci", labels={"suite": "pysdk"}, client=client) as sb:
        name = sb.name
        info = sb.info()
        assert (info.name, info.state, info.policy) == (name, "running", "ci"), info
        listed = client.list(labels={"suite": "pysdk"}, states=["running"])
        assert [s.name for s in listed] == [name], listed
    with pytest.raises(airlock.NotFound) as gone:
        client.sandbox(name).info()
    assert (gone.value.status, gone.value.code) == (404, "not_found")
    assert name not in [s.name for s in client.list()]
    assert {"created", "destroyed"} <= set(event_kinds(list(client.events(sandbox=name))))


def test_a_failing_block_still_destroys_its_sandbox(client: airlock.Client) -> None:
    with pytest.raises(RuntimeError, match="the block failed"):
        with airlock.Sandbox(policy="ci", client=client) as sb:
            name = sb.name
            raise RuntimeError("the block failed")
    assert name not in [s.name for s in client.list()]


def test_exec_gives_exit_code_stdout_stderr_and_takes_stdin(client: airlock.Client) -> None:
    with client.create(policy="ci") as sb:
        r = sb.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (r.exit_code, r.stdout, r.stderr, r.ok) == (3, "out\n", "err\n", False), r
        binary = sb.exec(["sh", "-c", r"printf '\377\000x'"])
        assert binary.stdout_bytes == b"\xff\x00x" and binary.ok
        piped = sb.exec(["sh", "-c", "tr a-z A-Z; echo $GREETING"], stdin=b"from stdin\n", env={"GREETING": "hi"})
        assert (piped.exit_code, piped.stdout) == (0, "FROM STDIN\nhi\n"), piped
        timed = sb.exec(["sleep", "30"], timeout=1)
        assert (timed.exit_code, timed.timed_out) == (124, True), timed
        missing = sb.exec(["/no/such/program"])
        assert missing.exit_code == 127, missing


def test_exec_stream_delivers_output_while_the_process_runs(client: airlock.Client) -> None:
    with client.create(policy="ci") as sb:
        # The process cannot end before the test has seen its first line
        # and answered it with a file: output must arrive as it is written.
        script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second >&2; exit 7"
        with sb.exec_stream(["sh", "-c", script]) as stream:
            chunks = iter(stream)
            first = next(chunks)
            assert (first.stream, first.text) == ("stdout", "first\n")
            assert stream.exit is None
            sb.files.write("/tmp/go", b"")
            rest = list(chunks)
        assert [(c.stream, c.text) for c in rest] == [("stderr", "second\n")]
        assert stream.exit_code == 7 and stream.pid is not None


def test_closing_an_exec_stream_early_cancels_the_process(client: airlock.Client) -> None:
    with client.create(policy="ci") as sb:
        with sb.exec_stream(["sh", "-c", "echo started; sleep 60"]) as stream:
            assert next(iter(stream)).text == "started\n"
        ended = [e for e in sb.events() if e.kind == "exec_ended"]
        for _ in range(100):  # The daemon records the end once it has killed the process.
            if ended:
                break
            time.sleep(0.1)
            ended = [e for e in sb.events() if e.kind == "exec_ended"]
        assert ended and ended[-1].detail.get("cancelled") is True, dump([e.detail for e in ended])


def test_files_round_trip(client: airlock.Client) -> None:
    with client.create(policy="ci") as sb:
        data = bytes(range(256)) * 4
        assert sb.files.write("/tmp/data.bin", data, mode=0o600) == len(data)
        assert sb.files.read("/tmp/data.bin") == data
        entry = sb.files.stat("/tmp/data.bin")
        assert (entry.type, entry.size, entry.mode) == ("file", len(data), 0o600), entry
        sb.files.write("/tmp/text.txt", "naïve text\n")
        assert sb.files.read_text("/tmp/text.txt") == "naïve text\n"
        sb.files.write("/tmp/upload", io.BytesIO(b"skip:from a file object"[5:]))
        assert sb.files.read("/tmp/upload") == b"from a file object"
        # What a program in the sandbox sees is what the files API wrote.
        assert sb.exec(["cat", "/tmp/upload"]).stdout == "from a file object"
        sb.files.mkdir("/tmp/a/b", parents=True)
        sb.files.rename("/tmp/upload", "/tmp/a/b/moved")
        listing = sb.files.list("/tmp/a", depth=2)
        assert listing.names == ["b", "b/moved"] and not listing.truncated, listing
        assert {"data.bin", "text.txt", "a"} <= set(sb.files.list("/tmp").names)
        with pytest.raises(airlock.Conflict) as taken:
            sb.files.rename("/tmp/text.txt", "/tmp/data.bin", replace=False)
        assert taken.value.code == "file_exists"
        with pytest.raises(airlock.Conflict) as full:
            sb.files.remove("/tmp/a")
        assert full.value.code == "not_empty"
        sb.files.remove("/tmp/a", recursive=True)
        assert not sb.files.exists("/tmp/a")
        with pytest.raises(airlock.NotFound) as missing:
            sb.files.read("/tmp/a/b/moved")
        assert (missing.value.status, missing.value.code) == (404, "file_not_found")
        with pytest.raises(airlock.Unprocessable) as wrong:
            sb.files.read("/tmp")
        assert wrong.value.code == "wrong_file_type"
        with pytest.raises(airlock.BadRequest) as relative:
            sb.files.read("tmp/x")
        assert relative.value.code == "invalid_path"


def test_diff_then_apply_writes_the_reviewed_change(client: airlock.Client, workspace: Path) -> None:
    with airlock.Sandbox(policy="dev", workspace=workspace, client=client) as sb:
        r = sb.exec(["sh", "-c", "echo new > added.txt; echo more >> README; rm src/lib.c"], cwd=str(workspace))
        assert r.ok, r
        diff = sb.diff()
        assert {(c.path, c.kind) for c in diff.changes} == {
            ("added.txt", "added"),
            ("README", "modified"),
            ("src/lib.c", "deleted"),
        }, diff
        assert diff.digest.startswith("sha256:") and f"change {diff.digest}" in str(diff)
        patch = sb.patch()
        assert "+new" in patch and "+more" in patch and patch.rstrip().endswith(diff.digest), patch
        # Nothing reached the workspace yet, and a running sandbox is not applied.
        assert not (workspace / "added.txt").exists()
        with pytest.raises(airlock.Conflict) as running:
            sb.apply()
        assert running.value.code == "still_running"
        assert sb.stop().state == "stopped"
        with pytest.raises(airlock.Conflict) as other:
            sb.apply(expect="sha256:" + "0" * 64)
        assert other.value.code == "digest_mismatch"
        applied = sb.apply(expect=diff.digest)
        assert applied.applied and applied.digest == diff.digest, applied
        assert "added.txt" in " ".join(applied.written) and "src/lib.c" in " ".join(applied.deleted), applied
        assert (workspace / "added.txt").read_text() == "new\n"
        assert (workspace / "README").read_text() == "hello\nmore\n"
        assert not (workspace / "src" / "lib.c").exists()
        assert "applied" in event_kinds(sb.events())


def test_a_sandbox_without_overlay_has_no_diff(client: airlock.Client) -> None:
    with client.create(policy="ci") as sb:
        with pytest.raises(airlock.Conflict) as no_overlay:
            sb.diff()
        assert no_overlay.value.code == "no_overlay"


def test_net_log_records_a_refused_request(client: airlock.Client) -> None:
    with client.create(policy="dev") as sb:
        r = sb.exec(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "http://example.org/x"])
        assert r.stdout == "403", r
        # The proxy records the refusal before it answers, but the record
        # reaches the audit log through the sandbox's supervisor, a moment
        # after curl has its answer.
        deadline = time.monotonic() + 10
        while not (refused := [e for e in sb.net_log() if e.host == "example.org"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert refused, sb.net_log()
        assert (refused[0].allowed, refused[0].port) == (False, 80), refused
        assert refused[0].rule and refused[0].ts
        assert any(rec.get("event") == "network" for rec in sb.audit())


def test_events_follow_what_happened_to_a_sandbox(client: airlock.Client) -> None:
    with client.create(policy="ci") as sb:
        sb.exec(["true"])
        sb.files.write("/tmp/f", b"x")
        sb.files.read("/tmp/f")
        events = sb.events()
        kinds = event_kinds(events)
        assert kinds[0] == "created", kinds
        assert {"exec_started", "exec_ended", "file_written", "file_read"} <= set(kinds), kinds
        ended = next(e for e in events if e.kind == "exec_ended")
        assert ended.detail.get("argv") == ["true"] and ended.sandbox == sb.name, ended
        ids = [e.id for e in events]
        assert ids == sorted(ids)
        later = list(client.events(sandbox=sb.name, since=ids[-2]))
        assert [e.id for e in later] == ids[-1:]


def test_api_errors_are_exceptions_with_the_code(client: airlock.Client) -> None:
    unknown = client.sandbox("no-such-sandbox")
    for call in (unknown.info, lambda: unknown.exec(["true"]), unknown.stop, unknown.destroy):
        with pytest.raises(airlock.NotFound) as e:
            call()
        assert (e.value.status, e.value.code) == (404, "not_found")
        assert "no-such-sandbox" in e.value.message and isinstance(e.value, airlock.ApiError)
    with pytest.raises(airlock.BadRequest) as bad_name:
        airlock.Sandbox("Bad Name", client=client).create()
    assert bad_name.value.code == "invalid_name"
    with pytest.raises(airlock.BadRequest) as bad_policy:
        client.create(policy="no-such-policy")
    assert bad_policy.value.code == "invalid_policy"
    with client.create("pysdk-taken", policy="ci") as sb:
        with pytest.raises(airlock.Conflict) as taken:
            client.create("pysdk-taken", policy="ci")
        assert taken.value.code == "conflict"
        with pytest.raises(airlock.BadRequest) as empty:
            sb.exec([])
        assert empty.value.code == "invalid_request"
        sb.stop()
        with pytest.raises(airlock.Conflict) as stopped:
            sb.exec(["true"])
        assert stopped.value.code == "not_running"


def test_no_daemon_is_daemon_unavailable(daemon: Daemon) -> None:
    with pytest.raises(airlock.DaemonUnavailable, match="no-daemon.sock"):
        airlock.Client(socket=str(daemon.dir / "no-daemon.sock")).health()
