"""Run every shell command shown in the README, as written, and fail on the first that fails.

Commands come from the README's ```bash blocks, one per line (comments stripped). Two kinds are not
run here, and each is named in the output: the install and test commands (this CI script runs them
itself), and commands with a placeholder path (`/path/to/...`), whose code paths the test suite runs
on generated data. Every command runs from the repository root with a fresh MELD_CLARA_CACHE.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_BY_CI = ("pip install", "pytest")


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def main() -> int:
    commands = readme_commands()
    if not commands:
        print("readme_commands: the README shows no bash commands", file=sys.stderr)
        return 1
    env = dict(os.environ, MELD_CLARA_CACHE=tempfile.mkdtemp(prefix="meld-clara-ci-"))
    for command in commands:
        if command.startswith(RUN_BY_CI):
            print(f"[readme] {command}  (run by .ci/run itself)", flush=True)
            continue
        if "/path/to/" in command:
            print(f"[readme] {command}  (placeholder path: covered by the test suite)", flush=True)
            continue
        print(f"[readme] $ {command}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env)
        if result.returncode != 0:
            print(f"[readme] FAILED ({result.returncode}): {command}", file=sys.stderr)
            return 1
        print(f"[readme] ok in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
