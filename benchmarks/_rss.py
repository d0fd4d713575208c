"""Resident-memory measurement shared by the weight-matching benchmarks (Linux ``/proc``; fallbacks elsewhere).

Two starts are recorded, both after the imports and a solver warm-up:

* ``cold``: before anything ran; the peak above it includes the first paging-in
  of torch's, MKL's and scipy's code (file-backed pages, about 12 MB here);
* ``warm``: after :func:`warm_up` ran the measured matching once on a tiny
  pair (so that code is resident) and its memory was handed back. The models
  are made after it, so their bytes count in both.

The peak is the kernel's high-water mark of the resident set (``VmHWM``),
reset after the warm-up when ``/proc/self/clear_refs`` accepts it (so the
warm-up's own peak never counts); otherwise ``ru_maxrss``.
"""

from __future__ import annotations

import resource


def rss_mb() -> float:
    """Current resident set size, MiB (``VmRSS``)."""
    return _status("VmRSS:")


def peak_mb() -> float:
    """Resident high-water mark since the last :func:`reset_peak` (or process start), MiB."""
    v = _status("VmHWM:")
    return v if v == v else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; no-op elsewhere)."""
    from lmckit.match.weight import _trim_heap

    _trim_heap()


def warm_up(match, pair) -> None:
    """Run ``match(spec, sd_a, sd_b, seed=0)`` on a tiny ``pair = (spec, sd_a, sd_b)``, then trim the heap."""
    spec, sd_a, sd_b = pair
    match(spec, sd_a, sd_b, seed=0, max_iter=100)
    del sd_a, sd_b
    trim()


def _status(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
