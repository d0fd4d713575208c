"""Upper bounds checked before work: model sizes (built on the ``meta`` device, no memory) and input sizes.

A size option that torch would try to allocate (``--width-mult 1e12``, ``--in-channels 100000000``) fails
here with :class:`~lmckit.errors.LmcError` naming the setting, instead of after minutes of allocation or
with a ``RuntimeError`` traceback.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from .errors import LmcError

#: most parameters a model may have (float32: 4 GB)
MAX_PARAMS = 1_000_000_000
#: most elements in one input batch of check-spec (batch x channels x height x width)
MAX_INPUT_ELEMENTS = 100_000_000

#: documented upper bounds of the count and size options, for the CLI flags and the matching methods' options alike
#: (``--option``, recipe ``match.options``; see the README's reliability section)
MAX_POINTS = 1001  # lambdas of a barrier curve
MAX_GRID = 201  # points per side of a landscape grid (201 x 201 evaluations)
MAX_SEED = 2**63 - 1
MAX_BATCH = 1_000_000
MAX_ITER = 100_000  # sweeps, steps, passes
MAX_RESTARTS = 10_000
MAX_EPOCHS = 100_000
MAX_SAMPLES = 10_000_000
MAX_BATCHES = 100_000  # training batches a method draws (activation matching's statistics)
MAX_JOBS = 256  # stages in parallel (reproduce --jobs)


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity set where the OS has one, else ``os.cpu_count()``).

    The one count behind ``reproduce --jobs auto`` (one stage per core) and the torch threads each pool
    worker gets (cores // jobs), so the two never disagree inside a CPU-limited container.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def check_model_size(name: str, options: Mapping[str, Any], where: str = "model") -> int:
    """Build ``name(**options)`` on the meta device and refuse it above :data:`MAX_PARAMS` parameters.

    Returns the parameter count. Raises :class:`LmcError` naming the options when the model cannot be
    built (absurd sizes) or is too large.
    """
    import torch

    from .models import create_model

    try:
        with torch.device("meta"):
            model = create_model(name, **dict(options))
        n = sum(p.numel() for p in model.parameters())
    except LmcError:
        raise
    except (RuntimeError, ValueError, OverflowError, MemoryError, TypeError) as e:
        raise LmcError(
            f"{where}: model {name} with {dict(options)} cannot be built ({type(e).__name__}: {e})",
            "use smaller sizes (width, width_mult, in_channels, image_size)",
        ) from None
    if n > MAX_PARAMS:
        raise LmcError(
            f"{where}: model {name} with {dict(options)} would have {n:,} parameters, more than the "
            f"{MAX_PARAMS:,} lmckit allows",
            "use smaller sizes (width, width_mult, in_channels, image_size)",
        )
    return n
