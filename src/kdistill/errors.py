"""The exceptions a user of kdistill can see.

Every failure caused by input (a bad config, mismatched shapes or vocabularies, an unknown name, a missing file)
is a :class:`KdistillError`. Its message is one sentence that names the field or the sizes involved; the CLI
prints it and exits with code 2. The subclasses also derive from the matching built-in exception, so code that
already catches ``ValueError`` or ``LookupError`` keeps working.
"""

from __future__ import annotations


class KdistillError(Exception):
    """Base class of every user-facing kdistill error."""


class ShapeMismatchError(KdistillError, ValueError):
    """Two tensors that must agree in shape do not; the message names both shapes."""


class VocabMismatchError(ShapeMismatchError):
    """Student and teacher vocabularies differ and no policy says what to do; the message names both sizes."""


class InvalidArgumentError(KdistillError, ValueError):
    """An argument is outside its allowed range or set; the message names the argument and the value."""


class UnknownNameError(KdistillError, LookupError):
    """A name (loss, schedule, ...) is not registered; the message lists the known names."""

    def __str__(self) -> str:  # LookupError would quote the message like a dict key
        return str(self.args[0]) if self.args else ""
