"""One case in a new interpreter's host worker server: for what only a fresh server shows (its
preload, the variables it starts with), which this process's server has settled already."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = """
import os
import sys
from pathlib import Path

from pytest_vram.worker import Job, Worker

{seen}

if __name__ == "__main__":
    result = Worker("host").run(Job("host", fn=seen, args=(sys.argv[1],)), timeout_s=300)
    print(type(result).__name__, result)
"""


def seen_by_a_case(tmp_path: Path, seen: str, env: dict[str, str]) -> str:
    """What ``seen(path)`` (its source; it writes its observation to ``path``) wrote in a case
    of a host server started by a new interpreter with ``env`` beside this environment."""
    script, out = tmp_path / "case.py", tmp_path / "seen.txt"
    script.write_text(SCRIPT.format(seen=textwrap.dedent(seen)))
    done = subprocess.run(
        [sys.executable, str(script), str(out)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.startswith("MemoryResult"), (
        done.stdout + done.stderr
    )
    return out.read_text()
