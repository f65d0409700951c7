"""The one exception type for problems in the user's MELD data."""

from __future__ import annotations


class MeldDataError(Exception):
    """A MELD file or folder is missing or malformed.

    The message is a single line naming the file (and the line/field where it applies) and what was
    expected, so the command-line layer can print it as is instead of a traceback.
    """
