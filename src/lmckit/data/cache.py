"""The user cache folder for datasets (``$XDG_CACHE_HOME/lmckit/datasets``).

Its own module because both the image registry (:mod:`lmckit.data.registry`,
the last stop of its search path) and the text corpora
(:mod:`lmckit.data.text`, where the KJV corpus is written once printed) use
it, and the registry imports the text module: the folder sits below both.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The folder that holds downloaded or generated datasets, one ``<name>/`` each.

    Returns
    -------
    Path
        ``$XDG_CACHE_HOME/lmckit/datasets``, with ``~/.cache`` when ``XDG_CACHE_HOME`` is unset; it may not exist.
    """
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmckit" / "datasets"
