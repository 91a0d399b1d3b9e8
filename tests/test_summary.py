"""duo_jax.summary: golden costs of the three families from the authors' widths, by hand formulas."""

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax.numpy as jnp
import pytest

from duo_jax import quant, summary, walk
from duo_jax.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 10


class Golden:
    """Accumulates per-image costs layer by layer (the module docstring's conventions)."""

    def __init__(self):
        self.t = dict(params_1bit=0, params_float=0, bops=0, float_macs=0, memory_bits=0, float_vars=0)

    def conv(self, out_pixels, k, c_in, c_out, binary, a_bits=1, bias=False):
        count, macs = k * k * c_in * c_out, out_pixels * k * k * c_in * c_out
        self.t["float_vars"] += count + (c_out if bias else 0)
        if bias:
            self.t["params_float"] += c_out
            self.t["memory_bits"] += 32 * c_out
        if binary:
            self.t["params_1bit"] += count
            self.t["bops"] += macs * a_bits
            self.t["memory_bits"] += 32 * math.ceil(count / 32) + 32  # words + one scale
        else:
            self.t["params_float"] += count
            self.t["float_macs"] += macs
            self.t["memory_bits"] += 32 * count

    def norm(self, features, folded_levels=0):
        self.t["params_float"] += 2 * features
        self.t["float_vars"] += 4 * features
        self.t["memory_bits"] += 40 * features * folded_levels if folded_levels else 4 * 32 * features

    def totals(self):
        t = self.t
        return {"params_1bit": t["params_1bit"], "params_float": t["params_float"],
                "params": t["params_1bit"] + t["params_float"], "bops": t["bops"],
                "float_macs": t["float_macs"], "ops": t["bops"] / 64 + t["float_macs"],
                "memory_bytes": t["memory_bits"] / 8, "float_bytes": 4 * t["float_vars"]}


# method.md, "Widths (from the authors' code)"
def mode_widths(baseline, duo, mode):
    d = 2 if mode == "decoupled" else 1  # binary layers read both copies
    a = 2 if mode == "coupled" else 1  # ternary: two bit planes
    lv = 2 if mode == "coupled" else 1  # thresholds per folded feature (per copy when decoupled)
    return (duo if mode in ("coupled", "decoupled") else baseline), d, a, lv


def vgg7(mode, size=32):
    w, d, a, lv = mode_widths((64, 64, 128, 128, 512, 512), (45, 45, 90, 90, 336, 512), mode)
    g = Golden()
    g.conv(size * size, 3, 3, w[0], False)
    g.norm(d * w[0])
    for i, s in zip((1, 2, 3), (size, size // 2, size // 4)):
        g.conv(s * s, 3, d * w[i - 1], w[i], True, a)
        g.norm(d * w[i], lv)
    g.conv(1, 4, d * w[3], w[4], True, a)
    g.norm(d * w[4], lv)
    g.conv(1, 1, d * w[4], w[5], True, a)
    g.norm(w[5])
    g.conv(1, 1, w[5], CLASSES, False, bias=True)
    return g.totals()


def resnet18(mode, size=32):
    w, d, a, lv = mode_widths((64, 128, 256, 512), (64, 90, 180, 360), mode)
    g = Golden()
    s = size // 2
    g.conv(s * s, 7, 3, w[0], False)
    g.norm(d * w[0])
    s //= 2
    in_w = w[0]
    for stage in range(4):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            last = stage == 3 and block == 1
            out_w = 512 if last else w[stage]
            s //= stride
            g.conv(s * s, 3, d * in_w, w[stage], True, a)
            g.norm(d * w[stage], lv)
            g.conv(s * s, 3, d * w[stage], out_w, True, a)
            g.norm(out_w if last else d * out_w)
            if stride == 2:
                g.conv(s * s, 1, in_w, out_w, False)
                g.norm(d * out_w)
            in_w = w[stage]
    g.conv(1, 1, 512, CLASSES, False, bias=True)
    return g.totals()


def alexnet(mode, size=224):
    w, d, a, lv = mode_widths((96, 256, 384, 384, 256, 4096, 4096), (88, 192, 256, 256, 192, 2400, 4096), mode)
    g = Golden()
    s1 = (size + 4 - 11) // 4 + 1  # conv1 11x11/4, pad 2 (224 -> 55); 3x3/2 max pools: 55 -> 27 -> 13 -> 6
    s2 = (s1 - 3) // 2 + 1
    s3 = (s2 - 3) // 2 + 1
    s6 = (s3 - 3) // 2 + 1
    g.conv(s1 * s1, 11, 3, w[0], False)
    g.norm(d * w[0])
    for i, (k, s) in enumerate(((5, s2), (3, s3), (3, s3), (3, s3)), start=1):
        g.conv(s * s, k, d * w[i - 1], w[i], True, a)
        g.norm(d * w[i], lv)
    g.conv(1, s6, d * w[4], w[5], True, a)  # fc6: a conv over the whole map
    g.norm(d * w[5], lv)
    g.conv(1, 1, d * w[5], w[6], True, a)  # fc7
    g.norm(w[6])
    g.conv(1, 1, w[6], CLASSES, False, bias=True)
    return g.totals()


@pytest.mark.parametrize("name,size,golden", [("resnet18", 32, resnet18), ("alexnet", 96, alexnet)])
def test_decoupled_resnet_and_alexnet_totals_match_hand_formulas(name, size, golden):
    model = create_model(name, mode="decoupled", num_classes=CLASSES)
    assert summary.totals(model, (size, size, 3)) == pytest.approx(golden("decoupled", size), rel=1e-12)


def test_cli_prints_the_three_models_and_writes_vgg7_goldens(tmp_path):
    out = tmp_path / "costs.json"
    proc = subprocess.run(
        [sys.executable, "-m", "duo_jax.summary", "--config=configs/vgg7_cifar10.py",
         "--config.model.options.binarize_weights=True", "--input_shape=32,32,3", "--layers=false", f"--json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "baseline BNN" in proc.stdout and "decoupled (binary) / baseline BNN" in proc.stdout
    results = json.loads(out.read_text())
    assert list(results) == [label for _, label in summary.MODELS]
    for (mode, label) in summary.MODELS:
        assert results[label]["totals"] == pytest.approx(vgg7(mode), rel=1e-12), mode
    base, duo = (results[label]["totals"] for label in ("baseline BNN", "decoupled (binary)"))
    # The authors' widths: same 1-bit parameters and BOPs within 1.1 %; the narrower first conv
    # makes the decoupled model cheaper in float MACs and total OPs.
    assert duo["params_1bit"] / base["params_1bit"] == pytest.approx(1, abs=0.011)
    assert duo["bops"] / base["bops"] == pytest.approx(1, abs=0.011)
    assert duo["ops"] < base["ops"]


def test_cli_bad_input_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "duo_jax.summary", "--config=configs/vgg7_cifar10.py",
                           "--input_shape=32,32"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--input_shape must be H,W,C" in lines[0], proc.stderr


def test_float_weights_count_as_float_macs():
    """VGG-7 as the authors trained it on CIFAR-10: binary activations, float weights."""
    model = create_model("vgg7", mode="decoupled", num_classes=CLASSES, width_mult=0.125)
    result = summary.summarize(model, (32, 32, 3))
    rows = {r["path"]: r for r in result["layers"]}
    assert rows["conv2"]["activation_bits"] == 1 and rows["conv2"]["weight_bits"] == 32
    assert result["totals"]["bops"] == 0 and result["totals"]["params_1bit"] == 0
    c = [6, 6, 11, 11, 42, 64]  # 1/8 of the BinaryDuo widths, rounded
    binary_macs = 1024 * 9 * 12 * c[1] + 256 * 9 * 12 * c[2] + 64 * 9 * 22 * c[3] + 16 * 22 * c[4] + 84 * c[5]
    assert result["totals"]["float_macs"] == 1024 * 27 * c[0] + binary_macs + 10 * c[5]
    assert not any(r["folded"] for r in result["layers"])


def test_any_linen_model_with_inline_quantizers_is_walked():
    """A user's model: plain nn.Dense and a parameter of its own; every parameter is counted."""

    class TinyBNN(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Dense(16, use_bias=False)(x.reshape(x.shape[0], -1))
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = quant.binary(x)
            w = self.param("w", nn.initializers.lecun_normal(), (16, 10))
            return x @ quant.binarize_weight(w)

    result = summary.summarize(TinyBNN(), (4, 4, 1))
    rows = {r["path"]: r for r in result["layers"]}
    assert rows["Dense_0"]["float_macs"] == 16 * 16 and rows["Dense_0"]["activation_bits"] is None
    assert rows["(other parameters)"]["params_float"] == 160
    assert result["totals"]["params"] == 16 * 16 + 2 * 16 + 160


def test_levels_is_exact():
    assert walk.levels(jnp.asarray([0.0, 1.0, 1.0])) == 1
    assert walk.levels(quant.ternary(jnp.linspace(-1, 2, 101))) == 2
    assert walk.levels(quant.uniform(jnp.linspace(-1, 2, 101), bits=2)) == 3
    assert walk.levels(jnp.asarray([0.0, 0.5001, 1.0])) is None
    assert walk.levels(jnp.arange(256) / 255.0) is None  # an 8-bit image is float input
    assert walk.levels(jnp.asarray([-1.0, 0.0])) is None
