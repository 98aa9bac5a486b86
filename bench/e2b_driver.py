"""The e2b section's client (bench/src/e2b.rs): E2B's own Python SDK, unmodified.

Started once by the harness with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY
naming its daemon's --e2b-listen. It imports the SDK once and says so with
one JSON line, {"ready": "<e2b version>"}; then, for every line it reads on
stdin, it creates a sandbox, runs `echo hi` in it and kills it (untimed), and
answers with one JSON line of milliseconds since just before Sandbox.create():

    {"create_ms": …, "first_output_ms": …, "exit_ms": …}

`first_output_ms` is when the SDK handed `hi` to the on_stdout callback,
`exit_ms` when commands.run returned (the exit seen). A failure answers
{"error": "…"} instead, and the driver goes on to the next line. It ends at
the end of stdin. Interpreter start-up and the import are in no time.
"""

import json
import sys
import time
from importlib.metadata import version


def say(**fields):
    print(json.dumps(fields), flush=True)


def once(sandbox_class):
    started = time.perf_counter()
    sandbox = sandbox_class.create()
    created = time.perf_counter()
    first_output = []

    def on_stdout(_data):
        if not first_output:
            first_output.append(time.perf_counter())

    try:
        result = sandbox.commands.run("echo hi", on_stdout=on_stdout)
        exited = time.perf_counter()
    finally:
        sandbox.kill()
    if result.exit_code != 0 or result.stdout != "hi\n" or not first_output:
        raise RuntimeError(
            f"echo hi: exit code {result.exit_code}, stdout {result.stdout!r}, stderr {result.stderr!r}"
        )

    def ms(at):
        return (at - started) * 1e3

    return {"create_ms": ms(created), "first_output_ms": ms(first_output[0]), "exit_ms": ms(exited)}


def main():
    from e2b import Sandbox

    say(ready=version("e2b"))
    for _ in sys.stdin:
        try:
            say(**once(Sandbox))
        except Exception as e:  # each run's failure is the harness's to report
            say(error=f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
