"""BinaryDuo AlexNet on ImageNet with the authors' settings.

    python -m duo_jax.main --config=configs/alexnet_imagenet.py --workdir=runs/alexnet \
        --config.data.data_dir=/path/to/tensorflow_datasets

Needs imagenet2012 prepared for tfds in array_record format (see
resnet18_imagenet.py). Binary weights and activations in conv2..fc7, float
conv1 and classifier, dropout 0.1 after fc6 and fc7. SGD Nesterov 0.9, lr 0.1,
wd 1e-4, batch 256; x0.1 at epochs 41, 71, 91 (coupled, 100 epochs) and 16,
26, 36 (fine-tune, 40 epochs); the total epoch counts are this project's
choice (the paper's were not available). Not yet run on ImageNet.

``:runlocal`` shrinks everything (64x64 crops, width/16, a few steps) for a
CPU smoke run.
"""

from duo_jax import config_lib as cl


def get_config(arg: str | None = None):
    return cl.imagenet_recipe("alexnet_imagenet", "alexnet", coupled=(100, (41, 71, 91)), finetune=(40, (16, 26, 36)), arg=arg)
