"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "the README should show how to use the library"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def _ci_runner():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_commands", README.parent / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_readme_command_is_run_by_ci(monkeypatch):
    """.ci/run executes each README command: bash blocks as written, text blocks with their
    placeholders bound to the demo's outputs. Every placeholder must have a binding."""
    runner = _ci_runner()
    commands = runner.readme_commands()
    kinds = {kind for kind, _ in commands}
    assert kinds == {"bash", "text"}
    monkeypatch.setattr(runner, "_newest", lambda pattern: pattern.replace("*", "X"))
    for kind, command in commands:
        if kind == "text":
            bound = runner.bind(command)
            assert "/path/to/" not in bound and "<stamp>" not in bound
    assert "demo-data" in runner.bind("python -m meld.prepare --data /path/to/MELD.Raw")
    try:
        runner.bind("python -m meld.finetune --checkpoint /path/to/other.ckpt --data <root>")
    except LookupError as err:
        assert "no binding" in str(err)
    else:
        raise AssertionError("an unknown placeholder must fail the CI run")
