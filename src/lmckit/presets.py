"""Named training recipes and the optimiser / schedule names of :class:`lmckit.train.TrainConfig`.

Plain data, importable without torch, so ``lmckit train --help`` lists the choices without loading
torch (benchmarks/bench_cli.py); :mod:`lmckit.train` re-exports all three names.
"""

from __future__ import annotations

from typing import Any

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine")

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's MLP recipe (MNIST / Fashion-MNIST).
    "mlp-fmnist": dict(
        model="mlp",
        model_kwargs={},
        dataset="fashion-mnist",
        epochs=5,
        batch_size=500,
        optimizer="adam",
        lr=1e-3,
        weight_decay=0.0,
        schedule="constant",
        warmup_epochs=0.0,
        augment=False,
    ),
    # The paper's CIFAR-10 recipes (need a GPU).
    "vgg11-cifar10": dict(
        model="vgg11",
        model_kwargs={"width_mult": 4.0, "norm": "batchnorm"},
        dataset="cifar10",
        epochs=100,
        batch_size=500,
        optimizer="sgd",
        lr=0.4,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="linear",
        warmup_epochs=5.0,
        augment=True,
    ),
    "resnet20-cifar10": dict(
        model="resnet20",
        model_kwargs={"width_mult": 16.0, "norm": "batchnorm"},
        dataset="cifar10",
        epochs=100,
        batch_size=500,
        optimizer="sgd",
        lr=0.4,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="linear",
        warmup_epochs=5.0,
        augment=True,
    ),
    # CPU-sized conv recipes on Fashion-MNIST: the CIFAR recipe's shape (SGD, warm-up, linear
    # decay) shortened. One epoch of VGG-11 (width 1) costs about 5 min on 2 CPU cores, ResNet-20 about 2 min.
    "vgg11-fmnist": dict(
        model="vgg11",
        model_kwargs={"width_mult": 1.0, "norm": "batchnorm"},
        dataset="fashion-mnist",
        epochs=3,
        batch_size=500,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="linear",
        warmup_epochs=0.5,
        augment=False,
    ),
    "resnet20-fmnist": dict(
        model="resnet20",
        model_kwargs={"width_mult": 1.0, "norm": "batchnorm"},
        dataset="fashion-mnist",
        epochs=3,
        batch_size=500,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="linear",
        warmup_epochs=0.5,
        augment=False,
    ),
    # Transformer and recurrent models on Fashion-MNIST, sized for a CPU (about 1-2 min an epoch on 2 cores).
    "vit-fmnist": dict(
        model="vit",
        model_kwargs={},
        dataset="fashion-mnist",
        epochs=5,
        batch_size=256,
        optimizer="adam",
        lr=1e-3,
        weight_decay=0.0,
        schedule="constant",
        warmup_epochs=0.0,
        augment=False,
    ),
    "lstm-fmnist": dict(
        model="lstm",
        model_kwargs={},
        dataset="fashion-mnist",
        epochs=5,
        batch_size=256,
        optimizer="adam",
        lr=2e-3,
        weight_decay=0.0,
        schedule="constant",
        warmup_epochs=0.0,
        augment=False,
    ),
    # Seconds-long recipe for tests and smoke runs.
    "gpt2-text": dict(  # the gpt2-text recipe: a tiny HF GPT-2 on a CPU-sized sample of the KJV (1 epoch, 128 steps)
        model="hf-gpt2",
        model_kwargs={},
        dataset="kjv-mini",
        epochs=1,
        batch_size=32,
        optimizer="adamw",
        lr=3e-3,
        weight_decay=0.01,
        schedule="cosine",
        warmup_epochs=0.1,
        augment=False,
        eval_batch_size=256,
    ),
    "tiny": dict(
        model="mlp_tiny",
        model_kwargs={},
        dataset="synthetic",
        epochs=2,
        batch_size=100,
        optimizer="adam",
        lr=1e-2,
        weight_decay=0.0,
        schedule="constant",
        warmup_epochs=0.0,
        augment=False,
        eval_batch_size=500,
    ),
}
