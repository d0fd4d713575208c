"""The model zoo's names and one-line descriptions, without importing the zoo (torch).

``lmckit models`` lists the zoo from this table so that it starts in a fraction
of a second; :mod:`lmckit.models.registry` takes a factory's description from
here when its ``register_model`` call gives none, and
``tests/test_cli_light.py`` checks that the table equals the registry (names,
descriptions, tiny flags): a model added to the zoo must be added here too.
"""

from __future__ import annotations

import fnmatch

# Size options shared by the zoo: the smallest and largest value each may take (checked by
# lmckit.models.registry.check_size_options before a model is built; shown in `lmckit train --help`). The
# maxima are far above any model in the paper (an MLP of width 512 and depth 3, a ViT of depth 4 with 4
# heads) and keep a typo (``--depth 100000``) from building a model that passes the parameter cap
# (lmckit.limits.MAX_PARAMS) but trains for minutes before anything fails.
MAX_WIDTH = 65_536
MAX_DEPTH = 256
MAX_WIDTH_MULT = 256.0
MAX_IN_CHANNELS = 4_096
MAX_IMAGE_SIZE = 4_096
MAX_NUM_CLASSES = 1_000_000
MAX_HEADS = 1_024
MAX_MLP_RATIO = 64.0
SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "width": (1, MAX_WIDTH),
    "depth": (0, MAX_DEPTH),
    "in_channels": (1, MAX_IN_CHANNELS),
    "image_size": (1, MAX_IMAGE_SIZE),
    "num_classes": (1, MAX_NUM_CLASSES),
    "heads": (1, MAX_HEADS),
    "patch_size": (1, MAX_IMAGE_SIZE),
}
FLOAT_LIMITS: dict[str, float] = {"width_mult": MAX_WIDTH_MULT, "mlp_ratio": MAX_MLP_RATIO}

#: name -> (description, tiny test model)
MODEL_INDEX: dict[str, tuple[str, bool]] = {
    "hf-gpt2": (
        "Hugging Face GPT2LMHeadModel on byte tokens: width 64, depth 2, 4 heads, MLP 4x, context from the dataset "
        "(options width, depth, heads, mlp_ratio, width_mult, norm=layernorm; needs lmckit[hf])",
        False,
    ),
    "lstm": (
        "LSTM on image rows (28 steps of 28 pixels), hidden 128, 1 layer (options width, depth, width_mult, norm)",
        False,
    ),
    "lstm_tiny": ("LSTM with 2 layers of 6 hidden units, for tests", True),
    "mlp": ("MLP 784-512-512-512-10 (depth 3, width 512; options depth, width, width_mult, norm)", False),
    "mlp_tiny": ("MLP with 2 hidden layers of 16 units, for tests", True),
    "resnet20": ("ResNet-20 (CIFAR-style, norm on shortcuts; width_mult, norm)", False),
    "resnet32": ("ResNet-32 (CIFAR-style, norm on shortcuts; width_mult, norm)", False),
    "resnet44": ("ResNet-44 (CIFAR-style, norm on shortcuts; width_mult, norm)", False),
    "resnet_tiny": ("ResNet with 1 block per stage and width 1/4, for tests", True),
    "vgg11": ("VGG11 (CIFAR-style, one linear head; width_mult, norm)", False),
    "vgg13": ("VGG13 (CIFAR-style, one linear head; width_mult, norm)", False),
    "vgg16": ("VGG16 (CIFAR-style, one linear head; width_mult, norm)", False),
    "vgg_tiny": ("3-conv VGG with 4-8 channels, for tests", True),
    "vit": (
        "ViT: 7x7 patches (16 tokens + class token), pre-norm (LayerNorm unless norm is given), width 64, "
        "depth 4, 4 heads, MLP ratio 2 "
        "(options width, depth, heads, mlp_ratio, patch_size, width_mult, norm)",
        False,
    ),
    "vit_tiny": ("ViT with width 8, depth 1, 2 heads, for tests", True),
}


def list_index(pattern: str = "*", include_tiny: bool = True) -> list[str]:
    """Names in :data:`MODEL_INDEX` matching the glob ``pattern`` (as ``lmckit.models.list_models``)."""
    return sorted(
        n for n, (_, tiny) in MODEL_INDEX.items() if fnmatch.fnmatch(n, pattern) and (include_tiny or not tiny)
    )
