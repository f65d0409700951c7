"""What the command-line entry points share: their ``--help`` description from a module docstring."""

from __future__ import annotations


def describe(doc: str | None) -> str:
    """The first paragraph of a module docstring as plain text for ``--help``: the docstrings quote
    code in reStructuredText's double backticks, which a terminal shows as they are."""
    return (doc or "").split("\n\n")[0].replace("``", "`")
