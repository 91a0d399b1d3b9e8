r"""Inference speed: the float eval forward against the bit-packed forward (duo_jax.bitpack).

    python benchmarks/inference.py                       # VGG-7 and ResNet-18, writes benchmarks/inference.json
    python benchmarks/inference.py --quick --out=/tmp/x.json   # smoke run (seconds)

For each case (a decoupled model with binarized weights, random variables
whose BatchNorms are calibrated on the benchmark batch, synthetic images) it
times, on the same batch:

* **whole model**: ``model.apply(variables, x, train=False)`` under ``jax.jit``
  (the float eval forward) against ``bitpack.forward(model, packed)`` (binary
  layers on packed bits, folded BatchNorms as integer thresholds, float
  first and last layers as usual);
* **binary part**: the model's binary convs / dense layers alone, on 0/1
  inputs of their shapes: the float computation (``lax.conv`` of the
  binarized kernel, as ``QConv`` does) against ``bitpack.binary_conv`` /
  ``binary_dense`` (packing, im2col, popcount GEMM, scale); all together
  and each layer alone.

After a warm-up, all are run interleaved (A B C D ..., ``--rounds`` times,
``--steps`` calls each) and the medians are reported as images/s and ratios;
it also records that the two forwards agree on the batch. On CPU the process
gets the XLA flags ``python -m duo_jax.main`` sets (``DUO_JAX_YNN=0`` turns
them off, as there). Times on a shared machine vary; the ratios are measured
within one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

CASES = {
    # name: (family, image size, batch, width_mult, options); decoupled mode, binarized weights
    "vgg7": ("vgg7", 32, 128, 1.0, {"binarize_weights": True}),
    # 128x128: at 64x64 the last stage's 2x2 maps hit a slow path of XLA's float conv (seconds per call)
    "resnet18": ("resnet18", 128, 32, 1.0, {}),
}
QUICK = {"vgg7": ("vgg7", 32, 8, 0.25, {"binarize_weights": True}), "resnet18": ("resnet18", 32, 8, 0.125, {})}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, few rounds (a smoke run)")
    p.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "inference.json"), help="JSON output path")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, quick 2)")
    p.add_argument("--steps", type=int, default=None, help="calls per timing (default 2, quick 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or not cases:
        p.error(f"unknown case(s) {', '.join(unknown) or '(none)'}; known: {', '.join(CASES)}")
    args.cases = cases
    args.rounds = args.rounds or (2 if args.quick else 7)
    args.steps = args.steps or (1 if args.quick else 2)
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be positive")
    return args


def speed_flags() -> None:
    """The XLA flags ``duo_jax.main`` sets on CPU, before jax starts."""
    from duo_jax import main as duo_main

    duo_main._cpu_speed_flags()


def calibrated_variables(model, x, seed: int):
    """Random variables; each BatchNorm's statistics are those of the batch it sees (as if trained)."""
    import jax
    import numpy as np

    from duo_jax import walk

    v = jax.device_get(jax.jit(model.init)(jax.random.key(seed, impl="rbg"), x[:1]))
    for call in walk.trace(model, v, x, calibrate=True, train=False):
        if walk.is_norm(call):
            node = v["batch_stats"]
            for part in call.path.split("/"):
                node = node[part]
            axes = tuple(range(call.x.ndim - 1))
            node["mean"], node["var"] = call.x.mean(axes), call.x.var(axes)
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), v)


def binary_part(model, variables, x, packed) -> tuple[Callable, Callable, list[dict]]:
    """The float and the packed computation of the binary layers alone (all, and one by one)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from duo_jax import bitpack, walk

    calls = {c.path: c for c in walk.trace(model, variables, x[:2], train=False)}
    rng = np.random.default_rng(0)
    specs, inputs, kernels, words, scales, info = [], [], [], [], [], []
    for path, spec in packed.layers.items():
        if spec["kind"] != "binary":
            continue
        call = calls[path]
        shape = (x.shape[0], *call.x.shape[1:])
        inputs.append(jnp.asarray(rng.integers(0, 2, shape), jnp.float32))
        kernels.append(jnp.asarray(call.kernel))
        words.append(jnp.asarray(bitpack.kernel_words(call.kernel >= 0)))
        scales.append(jnp.asarray(packed.arrays[f"binary/{path}/scale"]))
        specs.append(spec)
        info.append({"layer": path, "input": list(shape[1:]), "kernel": spec["kernel_shape"]})

    def pads(spec):
        p = spec["padding"]
        return p if isinstance(p, str) else tuple(map(tuple, p))

    def float_fn(xs, ks, which=None):
        out = []
        for spec, x_, k in zip(which or specs, xs, ks):
            if len(spec["kernel_shape"]) == 4:
                out.append(lax.conv_general_dilated(x_, k, spec["strides"], pads(spec),
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC")))
            else:
                out.append(x_ @ k)
        return out

    def packed_fn(xs, ws, ss, which=None):
        out = []
        for spec, x_, w, s in zip(which or specs, xs, ws, ss):
            if len(spec["kernel_shape"]) == 4:
                k = bitpack.binary_conv(x_, w, kernel_size=spec["kernel_shape"][:2], strides=spec["strides"],
                                        padding=pads(spec))
            else:
                k = bitpack.binary_dense(x_, w)
            out.append(k.astype(jnp.float32) * s)
        return out

    f, p = jax.jit(float_fn), jax.jit(packed_fn)
    per_layer = []
    for i, entry in enumerate(info):
        fi = jax.jit(lambda x_, k, i=i: float_fn([x_], [k], specs[i:i + 1]))
        pi = jax.jit(lambda x_, w, s_, i=i: packed_fn([x_], [w], [s_], specs[i:i + 1]))
        per_layer.append({**entry, "float": (lambda fi=fi, i=i: fi(inputs[i], kernels[i])),
                          "packed": (lambda pi=pi, i=i: pi(inputs[i], words[i], scales[i]))})
    return (lambda: f(inputs, kernels)), (lambda: p(inputs, words, scales)), per_layer


def interleaved(runners: dict[str, Callable[[], Any]], *, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per call of each runner: warm-up, then A B C ... ``rounds`` times, ``steps`` calls each."""
    import jax

    for fn in runners.values():
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            t = time.perf_counter()
            for _ in range(steps):
                jax.block_until_ready(fn())
            times[name].append((time.perf_counter() - t) / steps)
    return times


def run_case(name: str, spec: tuple, args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from duo_jax import bitpack
    from duo_jax.models import create_model

    family, size, batch, width_mult, opts = spec
    model = create_model(family, mode="decoupled", num_classes=10, width_mult=width_mult, **opts)
    x = jnp.asarray(np.random.default_rng(args.seed).standard_normal((batch, size, size, 3)), jnp.float32)
    variables = calibrated_variables(model, x, args.seed)
    t0 = time.perf_counter()
    packed = bitpack.pack(model, variables, x[:16])
    pack_s = time.perf_counter() - t0
    float_fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
    packed_fwd = bitpack.forward(model, packed)
    yf, yp = np.asarray(float_fwd(variables, x)), np.asarray(packed_fwd(x))
    float_part, packed_part, per_layer = binary_part(model, variables, x, packed)
    runners = {"float": lambda: float_fwd(variables, x), "packed": lambda: packed_fwd(x),
               "float_binary_part": float_part, "packed_binary_part": packed_part}
    for i, layer in enumerate(per_layer):
        runners[f"float_{i}"], runners[f"packed_{i}"] = layer["float"], layer["packed"]
    times = interleaved(runners, rounds=args.rounds, steps=args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    layers = [{**{k: v for k, v in layer.items() if k not in ("float", "packed")},
               "float_median_s": med[f"float_{i}"], "packed_median_s": med[f"packed_{i}"],
               "ratio": med[f"float_{i}"] / med[f"packed_{i}"]} for i, layer in enumerate(per_layer)]

    def entry(key):
        return {"median_s": med[key], "images_per_s": batch / med[key], "times_s": times[key]}

    kinds = [s["kind"] for s in packed.layers.values()]
    return {
        "model": {"family": family, "mode": "decoupled", "width_mult": width_mult, "image": [size, size, 3],
                  "options": opts},
        "batch": batch,
        "binary_layers": kinds.count("binary"), "folded_batchnorms": kinds.count("folded"), "pack_s": pack_s,
        "whole_model": {"float": entry("float"), "packed": entry("packed"), "ratio": med["float"] / med["packed"]},
        "binary_part": {"float": entry("float_binary_part"), "packed": entry("packed_binary_part"),
                        "ratio": med["float_binary_part"] / med["packed_binary_part"], "layers": layers},
        "agreement": {"argmax": float(np.mean(yf.argmax(-1) == yp.argmax(-1))),
                      "max_abs_logit_diff": float(np.abs(yf - yp).max()),
                      "max_abs_logit": float(np.abs(yf).max())},
    }


def table(cases: dict[str, dict]) -> str:
    rows = [("case", "part", "float img/s", "packed img/s", "packed / float")]
    for name, r in cases.items():
        for part, label in (("binary_part", "binary layers"), ("whole_model", "whole model")):
            p = r[part]
            rows.append((f"{name} (batch {r['batch']})", label, f"{p['float']['images_per_s']:,.0f}",
                         f"{p['packed']['images_per_s']:,.0f}", f"{p['ratio']:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    speed_flags()
    import jax

    load_before = os.getloadavg()
    specs = QUICK if args.quick else CASES
    cases = {}
    for name in args.cases:
        cases[name] = run_case(name, specs[name], args)
        a = cases[name]["agreement"]
        print(f"{name}: argmax agreement {100 * a['argmax']:.1f}%, max |logit diff| {a['max_abs_logit_diff']:.1e} "
              f"(max |logit| {a['max_abs_logit']:.2f})", flush=True)
    result = {
        "meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
                 "rounds": args.rounds, "steps": args.steps, "jax": jax.__version__,
                 "device": str(jax.devices()[0].device_kind), "cpu_count": os.cpu_count(),
                 "platform": platform.platform(), "processor": platform.processor(),
                 "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average_before": load_before,
                 "load_average_after": os.getloadavg(), "argv": sys.argv[1:]},
        "cases": cases,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(table(cases))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
