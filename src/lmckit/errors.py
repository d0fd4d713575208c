"""User-facing errors.

Every failure caused by the user's input (a missing dataset, a corrupt
checkpoint, a permutation that does not fit a model, a bad recipe) raises
:class:`LmcError`. The CLI turns it into a one-paragraph message and exit
status 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class LmcError(ValueError):
    """An error caused by the user's input, with an actionable fix.

    A subclass of :class:`ValueError` (a bad value given to lmckit), so a
    library caller needs one ``except ValueError`` clause for every bad
    argument, whether lmckit raised it or Python did.

    Parameters
    ----------
    message:
        What went wrong, naming the file or setting.
    hint:
        What to do about it (optional).
    """

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} {hint}")

    def render(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"
