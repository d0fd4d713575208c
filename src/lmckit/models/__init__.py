"""Model zoo: MLP, VGG-11/13/16, ResNet-20/32/44, ViT, LSTM, a Hugging Face GPT-2 (+ tiny test variants).

Every model takes image batches ``(N, C, H, W)`` and knows its permutation
symmetry: ``model.permutation_rules(b)`` declares its groups and the axes they
move on a ``perm.SpecBuilder`` that :func:`lmckit.perm.spec_for` passes in
(models sit below ``perm`` in the layering and never import it), and
``model.hidden_modules()`` names the modules whose outputs are each group's
activations (for activation matching).
"""

from . import lstm, mlp, resnet, vgg, vit  # noqa: F401  (registration)
from .registry import create_model, list_models, model_entry, model_from_config, register_model

__all__ = ["create_model", "list_models", "model_entry", "model_from_config", "register_model"]
