"""Progress reporting: a tqdm bar on a TTY, plain log lines otherwise.

Set ``LMCKIT_NO_PROGRESS=1`` to silence it (the tests do).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def enabled() -> bool:
    return os.environ.get("LMCKIT_NO_PROGRESS", "") in ("", "0")


class Progress:
    """``with Progress(total, desc) as p: p.update(1, loss=0.3)``.

    On a TTY this drives a tqdm bar on stderr; otherwise it prints a plain line
    at most every ``every`` seconds and at the end.
    """

    def __init__(self, total: int | None, desc: str, every: float = 10.0, unit: str = "it"):
        self.total, self.desc, self.every, self.n = total, desc, every, 0
        self._bar = None
        self._last = 0.0
        self._t0 = time.time()
        self._on = enabled()
        if self._on and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if not self._on:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(
                    {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}, refresh=False
                )
            return
        now = time.time()
        if now - self._last >= self.every or (self.total is not None and self.n >= self.total):
            self._last = now
            extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
            tot = f"/{self.total}" if self.total is not None else ""
            print(f"[{self.desc}] {self.n}{tot} {extra} ({now - self._t0:.1f}s)", file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        if not self._on:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class NullProgress:
    """A :class:`Progress` that reports nothing (for ``progress=False``)."""

    def update(self, *a: Any, **k: Any) -> None:
        pass

    def write(self, msg: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass
