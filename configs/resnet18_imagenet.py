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
    return cl.imagenet_recipe("resnet18_imagenet", "resnet18", coupled=(120, (71, 91, 111)), finetune=(40, (21, 31, 36)), arg=arg)
