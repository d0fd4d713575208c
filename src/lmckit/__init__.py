"""lmckit: linear mode connectivity and permutation-based model alignment.

Train SGD solutions, align them by weight matching (WM), activation matching
(AM) or the straight-through estimator (STE), measure barriers along linear
paths, and run the analyses of Ito, Yamada and Kumagai (distance reduction,
SVD alignment, rank-k truncation, Taylor estimate).
"""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """Load a model with its weights from a run folder or a .safetensors file."""
    from .checkpoint import load as _load

    return _load(path, device)


__all__ = ["__version__", "load"]
