"""lmckit: linear mode connectivity and permutation-based model alignment.

Train SGD solutions, align them by weight matching (WM), activation matching
(AM) or the straight-through estimator (STE), measure barriers along linear
paths, and run the analyses of Ito, Yamada and Kumagai (distance reduction,
SVD alignment, rank-k truncation, Taylor estimate).
"""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """Load a model with its weights from a run folder or a .safetensors file.

    ``path``: a run folder (``model.safetensors`` + ``config.json``) or a ``.safetensors`` file written by
    lmckit; ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a ``torch.device``. Returns the
    ``torch.nn.Module`` with its weights. Raises :class:`lmckit.errors.LmcError` (a ``ValueError``) for a
    missing, corrupt, pickled or non-finite checkpoint, a bad path type, or a device that is not present.
    """
    import os

    from .checkpoint import load as _load
    from .errors import LmcError

    if not isinstance(path, (str, os.PathLike)):
        raise LmcError(f"path must be a file or folder path, got {type(path).__name__}")
    return _load(path, device)


__all__ = ["__version__", "load"]
