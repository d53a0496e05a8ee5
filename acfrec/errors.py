"""Exceptions raised across acfrec.

Every error a user can trigger with bad input is one of these, and its message names the file,
column, id or shape at fault, so the fix is obvious from the message alone.
"""

from __future__ import annotations


class AcfrecError(Exception):
    """Base class of every acfrec error."""


class DataValidationError(AcfrecError, ValueError):
    """Input data is malformed: missing column, wrong type, null ids, empty file, bad shape."""


class UnknownIdError(AcfrecError, KeyError):
    """An external user or item id (or a dense index) that the id map does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class NotFittedError(AcfrecError, RuntimeError):
    """A model was asked to score or save before `fit` (or `load`)."""


class ArtifactError(AcfrecError, OSError):
    """A saved artefact (split, model, index) is missing files or does not match its metadata."""
