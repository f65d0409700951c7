"""Run every shell command shown in the README, in the README's order, and fail on the first that fails.

Commands come from the README's ```bash blocks (run as written) and ```text blocks (commands for a
user's own data, with placeholders), one per line, comments stripped. The install and test commands
are skipped (this CI script runs them itself). In ```text commands each placeholder is bound to what
the README's earlier demo commands produced, and a placeholder this script does not know fails the
run, so a new README command cannot go untested. Every command runs from the repository root with a
fresh MELD_CLARA_CACHE.
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
DEMO_DATA = "demo-data"  # where the README's `python -m meld.demo --out demo-data` writes the demo


def _newest(pattern: str) -> str:
    matches = sorted(ROOT.glob(pattern), key=lambda path: path.stat().st_mtime)
    if not matches:
        raise LookupError(f"nothing matches {pattern} yet: an earlier README command should have made it")
    return str(matches[-1].relative_to(ROOT))


# Placeholder -> what stands in for it, resolved when the command runs.
PLACEHOLDERS = {
    "/path/to/MELD.Raw": lambda: DEMO_DATA,
    "clara-medium.ckpt": lambda: "runs/clara-pretrain-demo/model",  # the demo pretraining's exported CLARA
    "runs/finetune-<stamp>": lambda: _newest("runs/finetune-*"),
    "clip.mp4": lambda: _newest(f"{DEMO_DATA}/**/dia0_utt0.mp4"),
}
UNBOUND = re.compile(r"/path/to/|<[a-z]+>|\.ckpt\b")


def readme_commands() -> list[tuple[str, str]]:
    """(kind, command) for each command line of the README's bash and text blocks, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for kind, block in re.findall(r"```(bash|text)\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append((kind, command))
    return commands


def bind(command: str) -> str:
    """The command with every known placeholder replaced; LookupError if one is left."""
    for placeholder, value in PLACEHOLDERS.items():
        if placeholder in command:
            command = command.replace(placeholder, value())
    if UNBOUND.search(command):
        raise LookupError(f"a placeholder in {command!r} has no binding in .ci/readme_commands.py")
    return command


def main() -> int:
    commands = readme_commands()
    if not any(kind == "bash" for kind, _ in commands):
        print("readme_commands: the README shows no bash commands", file=sys.stderr)
        return 1
    env = dict(os.environ, MELD_CLARA_CACHE=tempfile.mkdtemp(prefix="meld-clara-ci-"))
    for kind, command in commands:
        if command.startswith(RUN_BY_CI):
            print(f"[readme] {command}  (run by .ci/run itself)", flush=True)
            continue
        if kind == "text":
            try:
                bound = bind(command)
            except LookupError as err:
                print(f"[readme] FAILED: {err}", file=sys.stderr)
                return 1
            print(f"[readme] $ {command}\n[readme]   as $ {bound}", flush=True)
        else:
            bound = command
            print(f"[readme] $ {command}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(["bash", "-c", bound], cwd=ROOT, env=env)
        if result.returncode != 0:
            print(f"[readme] FAILED ({result.returncode}): {bound}", file=sys.stderr)
            return 1
        print(f"[readme] ok in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
