"""The README's "Python SDK" example, run as it is written, in a workspace
directory, against the test daemon."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import Daemon

README = Path(__file__).resolve().parents[3] / "README.md"


def python_examples() -> list[str]:
    text = README.read_text()
    start = text.index("\n## Python SDK\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_readme_example_runs(daemon: Daemon, workspace: Path) -> None:
    examples = python_examples()
    assert examples, f"no python example in the Python SDK section of {README}"
    env = dict(os.environ, AIRLOCK_SOCKET=str(daemon.socket))
    for example in examples:
        run = subprocess.run(
            [sys.executable, "-c", example], cwd=workspace, env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, f"{example}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
        out = run.stdout
        assert "0 greeting.txt" in out, out
        assert "stdout 3" in out, out
        assert "added        greeting.txt" in out, out
        assert "example.org False" in out, out
        assert "404 not_found" in out, out
    # apply wrote the sandbox's change into the workspace.
    assert (workspace / "greeting.txt").read_text() == "hello\n"
