"""The training CLIs take key=value overrides on both sides of their flags."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("module, flag", [("clara.pretrain", "--config"), ("meld.finetune", "--out"),
                                          ("meld.sweep", "--study-dir")])
def test_overrides_after_a_flag_are_read_as_overrides(module, flag, tmp_path, capsys):
    """``a=1 --flag VALUE b=1`` stopped at argparse's "unrecognized arguments: b=1" (exit 2), so the last
    override was never seen; read as an override, the unknown key gets the config's own error."""
    main = importlib.import_module(module).main
    value = str(tmp_path / "config.yaml") if flag == "--config" else str(tmp_path / "run")
    if flag == "--config":
        (tmp_path / "config.yaml").write_text("{}\n")
    try:
        code = main(["train.seed=3", flag, value, "no_such_key=1"])
    except SystemExit as stop:  # argparse's own exit
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and "unrecognized arguments" not in err and "no_such_key" in err, err
    assert not (tmp_path / "run").exists()
