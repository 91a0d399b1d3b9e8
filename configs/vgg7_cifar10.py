"""BinaryDuo VGG-7 on CIFAR-10 with the authors' settings.

    python -m duo_jax.main --config=configs/vgg7_cifar10.py --workdir=runs/vgg7 \
        --config.data.data_dir=$HOME/tensorflow_datasets

Needs CIFAR-10 prepared for tfds in array_record format, once:
``tfds build cifar10 --file_format=array_record`` (needs TensorFlow on the
machine that prepares it). Float weights, binary activations (the authors'
CIFAR-10 setting); SGD Nesterov 0.9, lr 0.1, wd 1e-4, batch 256, x0.1 at
epochs 121 and 161 in both phases. The paper's total epoch counts were not
available; 200 per phase is used. The baseline BNN trains for the same 400
epochs. Expected: the paper reports BinaryDuo above the baseline BNN (not
reproduced here: no GPU run of this config has been made yet).

``:runlocal`` shrinks everything to a CPU smoke run.
"""

from duo_jax import config_lib as cl


def get_config(arg: str | None = None):
    c = cl.base_config()
    c.name = "vgg7_cifar10"
    c.data.source = "tfds"
    c.data.name = "cifar10"
    c.data.augment = "cifar"
    c.model.name = "vgg7"
    c.model.options.binarize_weights = False
    c.log_every = 100
    c.checkpoint_every = 2000
    c.phases = "coupled,decouple,finetune,baseline"
    c.coupled = cl.train_phase("coupled", 200, cl.sgd(0.1, decay_epochs=(121, 161)), label="BinaryDuo coupled (ternary)")
    c.decouple = cl.decouple_phase("coupled", label="BinaryDuo decoupled")
    c.finetune = cl.train_phase("decoupled", 200, cl.sgd(0.1, decay_epochs=(121, 161)), parent="decouple",
                                label="BinaryDuo fine-tuned (binary)")
    c.baseline = cl.train_phase("binary", 400, cl.sgd(0.1, decay_epochs=(242, 322)), label="baseline BNN (binary)")
    if arg == "runlocal":
        cl.shrink_for_cpu(c, width_mult=0.125)
    return c
