"""PyTorch twins of duo_jax's VGG-7 and ResNet-18, for speed comparisons.

Each twin has the layers, widths, padding and quantizers of the duo_jax model
of the same family and mode (``duo_jax.models``), so one training step of each
does the same arithmetic; ``benchmarks/train_throughput.py`` times them side
by side. Layout: PyTorch's NCHW tensors in ``channels_last`` memory (NHWC,
as XLA's), OIHW kernels.

Quantizers are autograd functions with duo_jax's forward and backward
(:mod:`duo_jax.quant`)::

    levels:  q(x) = #{k : x + offset >= (k - 1/2) / n} / n,   dq/dx = 1 on 0 < x + offset < 1
    weights: wq = sign(w) * mean|w| (sign(0) = +1),            dL/dw = dL/dwq

The thresholds used here (n = 1, 2; offsets 0, -1/4, +1/4) are exact in
float32; comparisons run in float32 whatever the activation dtype.

Modes: ``fp``, ``binary``, ``coupled`` for both families, ``decoupled`` for
VGG-7 (its two copies of every quantized tensor on the channel axis, as in
``duo_jax.layers``). Needs ``torch`` (the ``torch`` extra of the project).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from duo_jax.models import resnet as jax_resnet
from duo_jax.models import vgg as jax_vgg

DECOUPLE_OFFSETS = (-0.25, 0.25)
BN_MOMENTUM = 0.1  # PyTorch's convention: 1 - 0.9 (duo_jax / Torch-7's momentum)
BN_EPS = 1e-5


# ---------------------------------------------------------------------------
# Quantizers
# ---------------------------------------------------------------------------


class _Levels(torch.autograd.Function):
    """``n + 1`` levels of ``[0, 1]`` with the clipped straight-through estimator."""

    @staticmethod
    def forward(ctx, x, n: int, offset: float):
        ctx.save_for_backward(x)
        ctx.offset = offset
        xf = x.float()
        count = torch.zeros_like(xf)
        for k in range(1, n + 1):
            count += (xf >= (k - 0.5) / n - offset).float()
        return (count / n if n > 1 else count).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        xf = x.float()
        window = (xf > -ctx.offset) & (xf < 1.0 - ctx.offset)
        return g * window.to(g.dtype), None, None


class _BinarizeWeight(torch.autograd.Function):
    """``sign(w) * mean|w|`` forward, identity backward."""

    @staticmethod
    def forward(ctx, w):
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype) * w.abs().mean()

    @staticmethod
    def backward(ctx, g):
        return g


def levels(x: torch.Tensor, n: int, offset: float = 0.0) -> torch.Tensor:
    return _Levels.apply(x, n, offset)


def binarize_weight(w: torch.Tensor) -> torch.Tensor:
    return _BinarizeWeight.apply(w)


def activation(x: torch.Tensor, mode: str) -> torch.Tensor:
    """duo_jax's ``duo_activation`` on NCHW (or NC) tensors."""
    if mode == "fp":
        return F.relu(x)
    if mode == "binary":
        return levels(x, 1)
    if mode == "coupled":
        return levels(x, 2)
    c = x.shape[1] // 2
    lo, hi = DECOUPLE_OFFSETS
    return torch.cat([levels(x[:, :c], 1, lo), levels(x[:, c:], 1, hi)], dim=1)


def duplicate(x: torch.Tensor, mode: str) -> torch.Tensor:
    return torch.cat([x, x], dim=1) if mode == "decoupled" else x


def merge(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode != "decoupled":
        return x
    c = x.shape[1] // 2
    return (x[:, :c] + x[:, c:]) * 0.5


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA's ``'SAME'`` padding (low, high) of one spatial axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_init_std(k: int, c_in: int, c_out: int, stride: int) -> float:
    """The authors' conv init (``duo_jax.layers.conv_init``)."""
    return math.sqrt(4.0 / (k * k * c_in + math.ceil(k / stride) ** 2 * c_out))


class QConv(nn.Module):
    """Conv without bias; ``padding`` is ``'SAME'``, ``'VALID'`` or an int; optional binary kernel."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, padding: str | int = "SAME",
                 binarize: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k) * conv_init_std(k, c_in, c_out, stride))
        self.k, self.stride, self.padding, self.binarize = k, stride, padding, binarize

    def forward(self, x):
        w = binarize_weight(self.weight) if self.binarize else self.weight
        if isinstance(self.padding, int):
            return F.conv2d(x, w, stride=self.stride, padding=self.padding)
        if self.padding == "SAME":
            (t, b), (l, r) = (same_padding(s, self.k, self.stride) for s in x.shape[2:])
            if (t, l) != (b, r):
                x = F.pad(x, (l, r, t, b))
                t = l = 0
            return F.conv2d(x, w, stride=self.stride, padding=(t, l))
        return F.conv2d(x, w, stride=self.stride)


def bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


def max_pool_same(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """``flax.linen.max_pool(x, (k, k), (s, s), padding='SAME')`` (pads with -inf)."""
    (t, b), (l, r) = (same_padding(n, k, s) for n in x.shape[2:])
    if (t, l) != (b, r):
        x = F.pad(x, (l, r, t, b), value=-math.inf)
        t = l = 0
    return F.max_pool2d(x, k, s, padding=(t, l))


def avg_pool_same(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """``flax.linen.avg_pool(x, (k, k), (s, s), padding='SAME')`` (zero padding counted)."""
    (t, b), (l, r) = (same_padding(n, k, s) for n in x.shape[2:])
    if (t, l, b, r) != (0, 0, 0, 0):
        x = F.pad(x, (l, r, t, b))
    return F.avg_pool2d(x, k, s)


def _check(mode: str, allowed: Sequence[str]) -> str:
    if mode not in allowed:
        raise ValueError(f"the twin supports modes {', '.join(allowed)}; got {mode!r}")
    return mode


def _widths(spec, mode: str, widths, width_mult: float) -> tuple[int, ...]:
    base = widths or spec["duo" if mode in ("coupled", "decoupled") else "baseline"]
    return tuple(int(round(w * width_mult)) for w in base)


# ---------------------------------------------------------------------------
# VGG-7
# ---------------------------------------------------------------------------


class VGG7(nn.Module):
    """Twin of ``duo_jax.models.VGG7`` (same widths, layer order and names)."""

    def __init__(self, mode: str = "binary", num_classes: int = 10, widths: Sequence[int] | None = None,
                 width_mult: float = 1.0, binarize_weights: bool = False, in_channels: int = 3):
        super().__init__()
        self.mode = _check(mode, ("fp", "binary", "coupled", "decoupled"))
        w = _widths(jax_vgg.WIDTHS, mode, widths, width_mult)
        d = 2 if mode == "decoupled" else 1  # copies of every quantized tensor
        kq = binarize_weights and mode != "fp"
        self.conv1 = QConv(in_channels, w[0], 3)
        self.bn1 = bn(d * w[0])
        self.conv2 = QConv(d * w[0], w[1], 3, binarize=kq)
        self.bn2 = bn(d * w[1])
        self.conv3 = QConv(d * w[1], w[2], 3, binarize=kq)
        self.bn3 = bn(d * w[2])
        self.conv4 = QConv(d * w[2], w[3], 3, binarize=kq)
        self.bn4 = bn(d * w[3])
        self.conv5 = QConv(d * w[3], w[4], 4, stride=4, binarize=kq)
        self.bn5 = bn(d * w[4])
        self.conv6 = QConv(d * w[4], w[5], 1, binarize=kq)
        self.bn6 = bn(w[5])
        self.classifier = nn.Linear(w[5], num_classes)

    def _bn_act(self, x, norm):
        return activation(norm(duplicate(x, self.mode)), self.mode)

    def forward(self, x):
        x = self._bn_act(self.conv1(x), self.bn1)
        x = self._bn_act(F.max_pool2d(self.conv2(x), 2), self.bn2)
        x = self._bn_act(F.max_pool2d(self.conv3(x), 2), self.bn3)
        x = self._bn_act(F.max_pool2d(self.conv4(x), 2), self.bn4)
        x = self._bn_act(self.conv5(x), self.bn5)
        x = F.relu(self.bn6(self.conv6(x)))
        # duo_jax flattens NHWC; the twin flattens in the same (h, w, c) order.
        return self.classifier(x.permute(0, 2, 3, 1).flatten(1)).float()


# ---------------------------------------------------------------------------
# ResNet-18
# ---------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, mode: str, in_width: int, width: int, out_width: int, stride: int, last: bool, kq: bool):
        super().__init__()
        self.mode, self.stride, self.last = mode, stride, last
        self.in_width, self.out_width = in_width, out_width
        self.conv1 = QConv(in_width, width, 3, stride, binarize=kq)
        self.bn1 = bn(width)
        self.conv2 = QConv(width, out_width, 3, 1, binarize=kq)
        self.bn2 = bn(out_width)
        if stride != 1:
            self.down = QConv(in_width, out_width, 1, 1)
            self.down_bn = bn(out_width)

    def forward(self, x):
        y = self.conv1(activation(x, self.mode))
        y = activation(self.bn1(y), self.mode)
        y = self.bn2(self.conv2(y))
        if self.stride != 1:
            s = self.down_bn(self.down(avg_pool_same(x, 2, 2)))
        elif self.last:
            s = x
            if self.out_width > self.in_width:
                s = F.pad(s, (0, 0, 0, 0, 0, self.out_width - self.in_width))
        else:
            s = x
        return y + s


class ResNet18(nn.Module):
    """Twin of ``duo_jax.models.ResNet18`` in ``fp``, ``binary`` or ``coupled`` mode."""

    def __init__(self, mode: str = "binary", num_classes: int = 1000, widths: Sequence[int] | None = None,
                 width_mult: float = 1.0, binarize_weights: bool = True, in_channels: int = 3):
        super().__init__()
        self.mode = _check(mode, ("fp", "binary", "coupled"))
        w = _widths(jax_resnet.WIDTHS, mode, widths, width_mult)
        final = max(1, int(round(jax_resnet.FINAL_WIDTH * width_mult)))
        kq = binarize_weights and mode != "fp"
        self.stem = QConv(in_channels, w[0], 7, 2, padding=3)
        self.stem_bn = bn(w[0])
        blocks = []
        in_width, n_blocks, b = w[0], sum(jax_resnet.BLOCKS_PER_STAGE), 0
        for stage, n in enumerate(jax_resnet.BLOCKS_PER_STAGE):
            for i in range(n):
                b += 1
                last = b == n_blocks
                blocks.append(_Block(mode, in_width, w[stage], final if last else w[stage],
                                     2 if (stage > 0 and i == 0) else 1, last, kq))
                in_width = w[stage]
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(final, num_classes)
        self.block_names = [f"stage{s + 1}_block{i + 1}" for s, n in enumerate(jax_resnet.BLOCKS_PER_STAGE)
                            for i in range(n)]

    def forward(self, x):
        x = max_pool_same(self.stem_bn(self.stem(x)), 3, 2)
        for block in self.blocks:
            x = block(x)
        return self.classifier(x.mean(dim=(2, 3))).float()


FAMILIES = {"vgg7": VGG7, "resnet18": ResNet18}


def create_model(name: str, *, mode: str, num_classes: int, **options) -> nn.Module:
    """The twin of ``duo_jax.models.create_model(name, mode=..., num_classes=..., **options)``."""
    if name not in FAMILIES:
        raise ValueError(f"no PyTorch twin of {name!r}; twins: {', '.join(FAMILIES)}")
    options = {k: v for k, v in options.items() if k != "dtype"}
    return FAMILIES[name](mode=mode, num_classes=num_classes, **options)


def duo_jax_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The twin's layers by the names of the duo_jax model's variables."""
    if isinstance(model, ResNet18):
        out = {"stem": model.stem, "stem_bn": model.stem_bn, "classifier": model.classifier}
        for name, block in zip(model.block_names, model.blocks):
            out.update({f"{name}_{k}": m for k, m in block.named_children()})
        return out
    return dict(model.named_children())


@torch.no_grad()
def load_duo_jax_variables(model: nn.Module, variables) -> None:
    """Copies a duo_jax model's ``params`` and ``batch_stats`` into its twin.

    HWIO kernels become OIHW, dense ``(in, out)`` kernels ``(out, in)``; BN
    ``scale``/``bias``/``mean``/``var`` become ``weight``/``bias``/``running_mean``/``running_var``.
    """
    import numpy as np

    modules = duo_jax_modules(model)
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))
    for name, p in variables["params"].items():
        m = modules[name]
        if isinstance(m, QConv):
            m.weight.copy_(t(p["kernel"]).permute(3, 2, 0, 1))
        elif isinstance(m, nn.Linear):
            m.weight.copy_(t(p["kernel"]).T)
            m.bias.copy_(t(p["bias"]))
        else:
            m.weight.copy_(t(p["scale"]))
            m.bias.copy_(t(p["bias"]))
    for name, s in variables.get("batch_stats", {}).items():
        modules[name].running_mean.copy_(t(s["mean"]))
        modules[name].running_var.copy_(t(s["var"]))


# ---------------------------------------------------------------------------
# Training step
# ---------------------------------------------------------------------------


def make_train_step(model: nn.Module, *, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
                    autocast_dtype: torch.dtype | None = None):
    """``step(images, labels) -> metrics``: what ``duo_jax.train.train_step`` does.

    SGD with Nesterov momentum and L2 weight decay (the authors' settings),
    mean cross-entropy, top-1/top-5 counts. ``autocast_dtype`` (e.g.
    ``torch.bfloat16`` on a GPU) runs the forward pass under autocast.
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    device_type = next(model.parameters()).device.type

    def step(images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        with torch.no_grad():
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top5 == labels[:, None]
            return {"loss": loss.detach(), "top1": hit[:, 0].sum(), "top5": hit.any(dim=1).sum()}

    return step
