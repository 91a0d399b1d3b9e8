"""Model families, one definition each, in four modes: fp, binary, coupled, decoupled."""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from duo_jax.models.alexnet import AlexNet
from duo_jax.models.common import DuoNet, resolve_widths
from duo_jax.models.resnet import ResNet18
from duo_jax.models.vgg import VGG7

FAMILIES: dict[str, type[DuoNet]] = {"vgg7": VGG7, "alexnet": AlexNet, "resnet18": ResNet18}


def create_model(name: str, *, mode: str, num_classes: int, **options) -> nn.Module:
    """Builds a model of family ``name`` in ``mode``.

    Args:
      name: ``'vgg7'``, ``'alexnet'`` or ``'resnet18'``.
      mode: ``'fp'``, ``'binary'``, ``'coupled'`` or ``'decoupled'``.
      num_classes: classifier outputs.
      **options: the family's other attributes (``width_mult``, ``widths``,
        ``binarize_weights``, ``per_channel_scale``, ``surrogate``, ``dtype``,
        and ``dropout_rate`` for AlexNet).

    Returns:
      A Linen module: ``model.init(rng, x, train=False)`` and
      ``model.apply(variables, x, train=...)`` (with ``mutable=['batch_stats']``
      and a ``'dropout'`` rng when training).

    Raises:
      ValueError: unknown family, mode, option or surrogate.
    """
    from duo_jax import layers, quant

    if name not in FAMILIES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(FAMILIES))}")
    layers.check_mode(mode)
    cls = FAMILIES[name]
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"model {name!r} takes no option(s) {', '.join(unknown)}; it takes: {', '.join(sorted(fields - {'mode', 'num_classes'}))}"
        )
    if "surrogate" in options:
        quant.get(options["surrogate"])  # validates the name early
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return cls(mode=mode, num_classes=num_classes, **options)


__all__ = ["AlexNet", "DuoNet", "FAMILIES", "ResNet18", "VGG7", "create_model", "resolve_widths"]
