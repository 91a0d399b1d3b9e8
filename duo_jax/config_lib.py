"""Building blocks of the ``configs/*.py`` files.

A config is an ``ml_collections.ConfigDict``:

* ``seed``, ``batch_size`` (global), ``eval_batch_size``, ``log_every``,
  ``checkpoint_every`` (steps), ``keep_checkpoints``;
* ``data``: see :func:`duo_jax.input_pipeline.create_dataset`;
* ``model``: ``name`` (a :data:`duo_jax.models.FAMILIES` key) and ``options``
  (the family's options, e.g. ``width_mult``);
* ``phases``: the phases to run, comma-separated, in order;
* one sub-config per phase name, made by :func:`train_phase` or
  :func:`decouple_phase`.

The BinaryDuo recipe is ``'coupled,decouple,finetune'``; a baseline is one
``binary`` (or ``fp``) training phase.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def sgd(lr: float = 0.1, *, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 1e-4,
        schedule: str = "step", decay_epochs: tuple = (), decay_factor: float = 0.1,
        warmup_epochs: float = 0.0) -> ml_collections.ConfigDict:
    """SGD settings; the defaults are the authors' (Nesterov 0.9, lr 0.1, wd 1e-4)."""
    return ml_collections.ConfigDict(dict(
        name="sgd", lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
        schedule=schedule, decay_epochs=tuple(decay_epochs), decay_factor=decay_factor,
        warmup_epochs=warmup_epochs))


def adam(lr: float = 1e-3, *, weight_decay: float = 0.0, schedule: str = "cosine", decay_epochs: tuple = (),
         decay_factor: float = 0.1, warmup_epochs: float = 0.0) -> ml_collections.ConfigDict:
    """Adam settings (L2 weight decay added to the gradient when non-zero)."""
    return ml_collections.ConfigDict(dict(
        name="adam", lr=lr, momentum=0.0, nesterov=False, weight_decay=weight_decay, schedule=schedule,
        decay_epochs=tuple(decay_epochs), decay_factor=decay_factor, warmup_epochs=warmup_epochs))


def train_phase(mode: str, epochs: float, optimizer: ml_collections.ConfigDict, *, parent: str = "",
                steps: int = 0, label: str = "") -> ml_collections.ConfigDict:
    """A training phase of the model in ``mode``.

    Args:
      mode: ``'fp'``, ``'binary'``, ``'coupled'`` or ``'decoupled'``.
      epochs: length in epochs (``steps`` overrides it when non-zero).
      optimizer: :func:`sgd` or :func:`adam`.
      parent: phase whose final variables start this one ('' = fresh init).
      steps: length in steps (0 = use ``epochs``).
      label: name shown in the summary table.
    """
    return ml_collections.ConfigDict(dict(
        kind="train", mode=mode, epochs=float(epochs), steps=int(steps), optimizer=optimizer,
        parent=parent, label=label))


def decouple_phase(parent: str = "coupled", label: str = "") -> ml_collections.ConfigDict:
    """Converts the ``parent`` (coupled) phase's final model into the decoupled one."""
    return ml_collections.ConfigDict(dict(kind="decouple", mode="decoupled", parent=parent, label=label))


def base_config() -> ml_collections.ConfigDict:
    """Run-wide defaults every config starts from."""
    return ml_collections.ConfigDict(dict(
        seed=0,
        batch_size=256,
        eval_batch_size=500,
        log_every=50,
        checkpoint_every=1000,
        keep_checkpoints=2,
        # Typed placeholders (None until set) so that --config.data.data_dir=DIR and the like can override them.
        data=ml_collections.ConfigDict(dict(
            source="bundled", name="mnist5k", data_dir=placeholder(str), train_split="train",
            eval_split=placeholder(str), augment="auto", image_size=placeholder(int), num_train=placeholder(int),
            num_eval=placeholder(int))),
        # The options every family takes (duo_jax.models.common.DuoNet), so that each can be overridden.
        model=ml_collections.ConfigDict(dict(name="vgg7", options=ml_collections.ConfigDict(dict(
            width_mult=1.0, binarize_weights=False, per_channel_scale=False, surrogate="clipped")))),
        phases="coupled,decouple,finetune",
    ))


def shrink_for_cpu(config: ml_collections.ConfigDict, *, image_size: int | None = None,
                   num_train: int = 64, num_eval: int = 32, width_mult: float = 1 / 16,
                   steps: int = 4) -> ml_collections.ConfigDict:
    """The ``:runlocal`` variant: same phases, tiny sizes, a few steps each."""
    config.batch_size = 16
    config.eval_batch_size = 16
    config.log_every = 2
    config.checkpoint_every = 2
    config.data.num_train = num_train
    config.data.num_eval = num_eval
    if image_size is not None:
        config.data.image_size = image_size
    config.model.options.width_mult = width_mult
    for name in config.phases.split(","):
        if config[name].kind == "train":
            config[name].steps = steps
    return config


def imagenet_recipe(name: str, model: str, *, coupled: tuple[float, tuple], finetune: tuple[float, tuple],
                    arg: str | None) -> ml_collections.ConfigDict:
    """The authors' ImageNet recipe for ``model`` (binarized weights, SGD Nesterov,
    lr 0.1, wd 1e-4, batch 256, random-resized crop 224 + flip).

    Args:
      name: config name (the default workdir is ``runs/<name>``).
      model: a :data:`duo_jax.models.FAMILIES` key.
      coupled, finetune: ``(epochs, decay_epochs)`` of each phase.
      arg: ``'runlocal'`` shrinks it to a CPU smoke run (64x64 crops, width/16).
    """
    c = base_config()
    c.name = name
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.augment = "imagenet"
    c.data.image_size = 224
    c.model.name = model
    c.model.options.binarize_weights = True
    c.log_every = 100
    c.checkpoint_every = 5000
    c.phases = "coupled,decouple,finetune"
    c.coupled = train_phase("coupled", coupled[0], sgd(0.1, decay_epochs=coupled[1]), label="BinaryDuo coupled (ternary)")
    c.decouple = decouple_phase("coupled", label="BinaryDuo decoupled")
    c.finetune = train_phase("decoupled", finetune[0], sgd(0.1, decay_epochs=finetune[1]), parent="decouple",
                             label="BinaryDuo fine-tuned (binary)")
    if arg == "runlocal":
        shrink_for_cpu(c, image_size=64, width_mult=1 / 16)
    return c
