"""clara.cli: the --help description every command takes from its module docstring."""

from __future__ import annotations

from clara.cli import describe


def test_describe_is_the_first_paragraph_without_rst_backticks():
    doc = "Train: ``python -m x [--y Y]``.\nSecond line.\n\nDetails that --help leaves out."
    assert describe(doc) == "Train: `python -m x [--y Y]`.\nSecond line."
    assert describe(None) == ""
