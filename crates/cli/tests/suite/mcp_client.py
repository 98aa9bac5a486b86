"""An MCP client for suite/mcp.rs: drives `airlock mcp` with the official
Python SDK (`mcp` from PyPI) the way an agent's host would, and checks every
answer. Prints `ok: STEP` for each step that held; exits non-zero with the
reason at the first that did not.

    mcp_client.py stdio AIRLOCK_BIN WORKSPACE [--allow-apply]
    mcp_client.py http URL WORKSPACE
"""

import asyncio
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

REQUIRED = {
    "create_sandbox": set(),
    "list_sandboxes": set(),
    "exec": {"sandbox"},
    "read_file": {"sandbox", "path"},
    "write_file": {"sandbox", "path", "content"},
    "list_files": {"sandbox", "path"},
    "diff": {"sandbox"},
    "network_log": {"sandbox"},
    "stop_sandbox": {"sandbox"},
    "destroy_sandbox": {"sandbox"},
}
APPLY_REQUIRED = {"sandbox", "expect"}


def fail(step, why):
    print(f"FAILED: {step}: {why}", flush=True)
    sys.exit(1)


def ok(step):
    print(f"ok: {step}", flush=True)


def check(step, cond, why):
    if not cond:
        fail(step, why)


async def call(session, name, args):
    """A tool's result that must have succeeded: its structured content."""
    result = await session.call_tool(name, args)
    if result.is_error:
        fail(name, f"error result: {result.content}")
    return result.structured_content


async def refused(session, step, name, args, mentions):
    """A call that must come back as an error result naming `mentions`."""
    result = await session.call_tool(name, args)
    text = " ".join(getattr(c, "text", "") for c in result.content)
    check(step, result.is_error, f"expected an error result, got {result}")
    check(step, mentions.lower() in text.lower(), f"the error does not mention {mentions!r}: {text}")
    ok(step)


async def unknown_tool(session, step, name):
    try:
        await session.call_tool(name, {"sandbox": "x", "expect": "sha256:" + "0" * 64})
    except MCPError as e:
        check(step, "not found" in e.message or "unknown" in e.message.lower(), f"message: {e.message}")
        ok(step)
        return
    fail(step, f"calling {name} did not raise an MCP error")


async def tools_listed(session, allow_apply):
    listed = await session.list_tools()
    tools = {t.name: t for t in listed.tools}
    want = dict(REQUIRED)
    if allow_apply:
        want["apply"] = APPLY_REQUIRED
    check("tools", set(tools) == set(want), f"tools {sorted(tools)}, expected {sorted(want)}")
    for name, required in want.items():
        tool = tools[name]
        schema = tool.input_schema
        check("tools", schema.get("type") == "object", f"{name}: schema {schema}")
        check("tools", set(schema.get("required", [])) == required, f"{name}: required {schema.get('required')}")
        check("tools", len(tool.description or "") > 40, f"{name}: description {tool.description!r}")
    props = tools["exec"].input_schema["properties"]
    for field in ("argv", "command", "timeout_secs", "max_output_bytes"):
        check("tools", field in props, f"exec has no {field}: {props}")
    ok("tools listed with their schemas" + (" (apply among them)" if allow_apply else " (no apply)"))


async def full_scenario(session, workspace, allow_apply):
    await tools_listed(session, allow_apply)

    box = await call(session, "create_sandbox", {
        "name": "mcp-box", "policy": "dev", "workspace": workspace, "timeout": "10m",
    })
    check("create", box["name"] == "mcp-box" and box["state"] == "running", box)
    ok("create_sandbox")

    r = await call(session, "exec", {"sandbox": "mcp-box", "argv": ["sh", "-c", "echo out; echo err >&2; exit 3"]})
    check("exec", (r["exit_code"], r["stdout"], r["stderr"]) == (3, "out\n", "err\n"), r)
    check("exec", not r["timed_out"] and not r["stdout_truncated"], r)
    ok("exec: non-zero exit with stdout and stderr")

    r = await call(session, "exec", {"sandbox": "mcp-box", "command": "echo $((6 * 7))"})
    check("exec command", (r["exit_code"], r["stdout"]) == (0, "42\n"), r)
    ok("exec: a shell command")

    r = await call(session, "exec", {"sandbox": "mcp-box", "argv": ["sleep", "30"], "timeout_secs": 1})
    check("exec timeout", r["timed_out"] and r["exit_code"] == 124, r)
    ok("exec: timeout")

    r = await call(session, "exec", {
        "sandbox": "mcp-box", "command": "head -c 5000 /dev/zero | tr '\\0' a", "max_output_bytes": 100,
    })
    check("exec cap", r["stdout_truncated"] and r["stdout_bytes"] == 5000, r)
    check("exec cap", r["stdout"].startswith("a" * 100) and "truncated: 100 of 5000 bytes" in r["stdout"], r)
    ok("exec: output cut at the cap, with a marker")

    w = await call(session, "write_file", {"sandbox": "mcp-box", "path": "/tmp/note.txt", "content": "hi there\n"})
    check("write_file", w["size"] == 9, w)
    rd = await call(session, "read_file", {"sandbox": "mcp-box", "path": "/tmp/note.txt"})
    check("read_file", rd["content"] == "hi there\n" and not rd["truncated"], rd)
    cut = await call(session, "read_file", {"sandbox": "mcp-box", "path": "/tmp/note.txt", "max_bytes": 2})
    check("read_file cap", cut["content"] == "hi" and cut["truncated"] and cut["size"] == 9, cut)
    ls = await call(session, "list_files", {"sandbox": "mcp-box", "path": "/tmp"})
    names = {e["name"]: e["type"] for e in ls["entries"]}
    check("list_files", names.get("note.txt") == "file", ls)
    ok("write_file, read_file, list_files")

    await call(session, "write_file", {"sandbox": "mcp-box", "path": f"{workspace}/README", "content": "changed\n"})
    d = await call(session, "diff", {"sandbox": "mcp-box"})
    check("diff", "-hello" in d["diff"] and "+changed" in d["diff"], d)
    check("diff", (d["digest"] or "").startswith("sha256:"), d)
    digest = d["digest"]
    ok("diff of the overlay workspace")

    r = await call(session, "exec", {
        "sandbox": "mcp-box",
        "command": "curl -s -o /dev/null -w '%{http_code}' --max-time 20 http://example.net/; echo",
    })
    # The refusal reaches the audit log through the sandbox's supervisor, a
    # moment after curl has its 403: asked until it is there (10 s at most).
    for _ in range(200):
        log = await call(session, "network_log", {"sandbox": "mcp-box"})
        hits = [e for e in log["entries"] if e.get("host") == "example.net"]
        if hits:
            break
        await asyncio.sleep(0.05)
    check("network_log", hits and all(e["allowed"] is False for e in hits), f"{log} (curl: {r})")
    ok("network_log has the refused request")

    await refused(session, "unknown sandbox", "exec", {"sandbox": "no-such-box", "argv": ["true"]}, "no-such-box")
    await refused(session, "bad arguments (type)", "exec", {"sandbox": 5, "argv": ["true"]}, "invalid type")
    await refused(session, "bad arguments (neither argv nor command)", "exec", {"sandbox": "mcp-box"}, "argv")
    await refused(session, "bad arguments (unknown field)", "diff", {"sandbox": "mcp-box", "colour": 1}, "colour")
    await unknown_tool(session, "unknown tool", "no_such_tool")

    stopped = await call(session, "stop_sandbox", {"sandbox": "mcp-box"})
    check("stop", stopped["state"] == "stopped", stopped)
    ok("stop_sandbox")
    await refused(session, "exec after stop", "exec", {"sandbox": "mcp-box", "argv": ["true"]}, "not running")

    if allow_apply:
        await refused(session, "apply of another change", "apply",
                      {"sandbox": "mcp-box", "expect": "sha256:" + "0" * 64}, "sha256:")
        a = await call(session, "apply", {"sandbox": "mcp-box", "expect": digest})
        check("apply", a["applied"] and any(p.endswith("README") for p in a["written"]), a)
        ok("apply with the reviewed digest")
    else:
        await unknown_tool(session, "apply is not offered", "apply")

    gone = await call(session, "destroy_sandbox", {"sandbox": "mcp-box"})
    check("destroy", gone["removed"] is True, gone)
    listed = await call(session, "list_sandboxes", {})
    check("destroy", all(s["name"] != "mcp-box" for s in listed["sandboxes"]), listed)
    ok("destroy_sandbox")

    # Left running on purpose: it must outlive this session.
    kept = await call(session, "create_sandbox", {"name": "mcp-kept", "timeout": "10m"})
    check("kept", kept["state"] == "running", kept)
    ok("a sandbox left running")


async def http_scenario(session):
    await tools_listed(session, False)
    box = await call(session, "create_sandbox", {"name": "mcp-http", "timeout": "5m"})
    check("create", box["state"] == "running", box)
    r = await call(session, "exec", {"sandbox": "mcp-http", "argv": ["sh", "-c", "echo over http; exit 7"]})
    check("exec", (r["exit_code"], r["stdout"]) == (7, "over http\n"), r)
    await refused(session, "unknown sandbox", "diff", {"sandbox": "no-such-box"}, "no-such-box")
    gone = await call(session, "destroy_sandbox", {"sandbox": "mcp-http"})
    check("destroy", gone["removed"] is True, gone)
    ok("streamable HTTP: create, exec, destroy")


def readme_server(readme):
    """The `airlock` server of the README's MCP client configuration."""
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    for block in text.split("```json\n")[1:]:
        snippet = block.split("```", 1)[0]
        if "mcpServers" in snippet:
            return json.loads(snippet)["mcpServers"]["airlock"]
    fail("README", "no ```json block with mcpServers")


async def main():
    mode = sys.argv[1]
    if mode == "stdio":
        readme, workspace = sys.argv[2], sys.argv[3]
        allow_apply = "--allow-apply" in sys.argv[4:]
        # Started as the README's client configuration says (airlock on PATH).
        configured = readme_server(readme)
        args = configured["args"] + (["--allow-apply"] if allow_apply else [])
        server = StdioServerParameters(command=configured["command"], args=args, env=dict(os.environ))
        async with stdio_client(server) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                await full_scenario(session, workspace, allow_apply)
    elif mode == "http":
        async with streamable_http_client(sys.argv[2]) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                await http_scenario(session)
    else:
        fail("arguments", json.dumps(sys.argv))
    print("done", flush=True)


asyncio.run(main())
