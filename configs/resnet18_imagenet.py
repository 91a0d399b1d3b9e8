"""BinaryDuo ResNet-18 on ImageNet with the authors' settings.

    python -m duo_jax.main --config=configs/resnet18_imagenet.py --workdir=runs/r18 \
        --config.data.data_dir=/path/to/tensorflow_datasets

Needs imagenet2012 prepared for tfds in array_record format:
``tfds build imagenet2012 --file_format=array_record --manual_dir=...``.
Binary weights (sign * mean|w| per layer) and activations in every block
conv; float stem, 1x1 shortcuts and classifier. SGD Nesterov 0.9, lr 0.1,
wd 1e-4, batch 256; x0.1 at epochs 71, 91, 111 (coupled, 120 epochs) and 21,
31, 36 (fine-tune, 40 epochs); the paper's total epoch counts were not
available, these are the smallest that cover every decay step. Input:
random-resized crop 224 + flip; eval resize 256, centre crop 224. The paper
reports about 60 % top-1 for BinaryDuo ResNet-18 (Bi-Real Net-18: 56.4 %);
not reproduced here (no ImageNet run has been made with this code).

``:runlocal`` shrinks everything (64x64 crops, width/16, a few steps) for a
CPU smoke run.
"""

from duo_jax import config_lib as cl


def get_config(arg: str | None = None):
    c = cl.base_config()
    c.name = "resnet18_imagenet"
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.augment = "imagenet"
    c.data.image_size = 224
    c.model.name = "resnet18"
    c.model.options.binarize_weights = True
    c.log_every = 100
    c.checkpoint_every = 5000
    c.phases = "coupled,decouple,finetune"
    c.coupled = cl.train_phase("coupled", 120, cl.sgd(0.1, decay_epochs=(71, 91, 111)), label="BinaryDuo coupled (ternary)")
    c.decouple = cl.decouple_phase("coupled", label="BinaryDuo decoupled")
    c.finetune = cl.train_phase("decoupled", 40, cl.sgd(0.1, decay_epochs=(21, 31, 36)), parent="decouple",
                                label="BinaryDuo fine-tuned (binary)")
    if arg == "runlocal":
        cl.shrink_for_cpu(c, image_size=64, width_mult=1 / 16)
    return c
