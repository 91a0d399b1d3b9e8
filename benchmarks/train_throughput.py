r"""Training-step throughput: duo_jax's ``train_step`` against a PyTorch twin.

    python benchmarks/train_throughput.py --out=runs/bench/cpu.json        # the CPU table
    python benchmarks/train_throughput.py --quick                          # smoke test (seconds)
    python benchmarks/train_throughput.py --device=gpu --dtype=bfloat16 \
        --cases=resnet18_binary,resnet18_fp --batch=256                    # see gpu_check.sh

For each case (a model family, mode, batch and image shape, on synthetic
data) it builds duo_jax's real training step, ``jax.jit(train.train_step,
donate_argnums=0)`` on a ``train.create_state`` state with the authors' SGD
(as ``duo_jax.phases`` does), and the PyTorch twin of the same network
(``benchmarks/torch_twin.py``: same layers, widths and quantizers, SGD with
Nesterov momentum). After warm-up, the two are timed interleaved, A B A B,
``--rounds`` times ``--steps`` steps, and the medians are reported: images/s,
the ratio duo_jax / PyTorch, and the fraction of the machine's matmul rate
that the step reaches, with the step's FLOPs taken from XLA's cost analysis
of the compiled step. The matmul rate is measured in the same run (float32
on CPU, the ``--dtype`` on GPU): jax, NumPy and PyTorch, interleaved, the
best of them is the reference. Binary cases are compared with the same
network in ``fp`` mode (float ReLU, float weights): the quantizer overhead.

On CPU the process gets the XLA flags ``python -m duo_jax.main`` sets
(``DUO_JAX_YNN=0`` turns them off, as there). PyTorch is optional (the
``torch`` extra): without it the twin is reported as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (_ROOT, os.path.join(_ROOT, "benchmarks")) if p not in sys.path]


@dataclasses.dataclass(frozen=True)
class Case:
    """One training step to time."""

    family: str
    mode: str
    batch: int
    image: tuple[int, int, int]
    num_classes: int
    note: str
    fp_reference: str = ""  # the fp-mode case of the same network (quantizer overhead)


CASES = {
    "vgg7_binary": Case("vgg7", "binary", 128, (32, 32, 3), 10,
                        "binary VGG-7, baseline BNN widths 64-64-128-128-512-512, float weights", "vgg7_fp"),
    "vgg7_decoupled": Case("vgg7", "decoupled", 128, (32, 32, 3), 10,
                           "binary VGG-7, BinaryDuo decoupled widths 3-45, 90-45, 90-90, 180-90, 180-336, 672-512"),
    "vgg7_fp": Case("vgg7", "fp", 128, (32, 32, 3), 10, "VGG-7 baseline widths, float ReLU (reference)"),
    "resnet18_binary": Case("resnet18", "binary", 16, (224, 224, 3), 1000,
                            "binary ResNet-18 (baseline widths, binary weights), ImageNet shape", "resnet18_fp"),
    "resnet18_fp": Case("resnet18", "fp", 16, (224, 224, 3), 1000, "ResNet-18, float ReLU and weights (reference)"),
}
DEFAULT_CASES = ("vgg7_binary", "vgg7_fp", "vgg7_decoupled", "resnet18_binary", "resnet18_fp")
QUICK_CASES = ("vgg7_binary", "vgg7_fp")
TARGETS = {"ratio_vs_torch": 1.0, "fraction_of_matmul": 0.80, "quantizer_overhead": 0.05}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="computation dtype of both networks (parameters stay float32)")
    p.add_argument("--batch", type=int, default=0, help="batch size of every case (0: each case's own)")
    p.add_argument("--image-size", type=int, default=0, help="square image side of every case (0: each case's own)")
    p.add_argument("--width-mult", type=float, default=1.0, help="scales every width (smoke tests)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each network after compiling")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; each runs --steps steps of A, then of B")
    p.add_argument("--steps", type=int, default=2, help="steps per round and network")
    p.add_argument("--matmul-size", type=int, default=0, help="side of the square matmul (0: 2048 CPU, 8192 GPU)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="a datasheet peak to report utilisation against as well (e.g. 989 for an H100/H200 in bf16)")
    p.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure the input pipeline against the step (default: on for CPU, off for --quick)")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True, help="time the PyTorch twin")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny widths and batches, few steps (numbers mean nothing)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        if "--cases" not in " ".join(argv if argv is not None else sys.argv):
            args.cases = ",".join(QUICK_CASES)
        args.batch = args.batch or 8
        args.image_size = args.image_size or 32
        args.width_mult = min(args.width_mult, 0.125)
        args.warmup, args.rounds, args.steps = 1, 2, 1
        args.matmul_size = args.matmul_size or 256
    if args.pipeline is None:
        args.pipeline = args.device == "cpu" and not args.quick
    args.matmul_size = args.matmul_size or (2048 if args.device == "cpu" else 8192)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown or not names:
        p.error(f"unknown case(s) {', '.join(unknown) or '(none)'}; known: {', '.join(CASES)}")
    args.case_names = names
    for what in ("warmup", "rounds", "steps", "batch", "image_size", "matmul_size"):
        if getattr(args, what) < (0 if what in ("warmup", "batch", "image_size") else 1):
            p.error(f"--{what.replace('_', '-')} must be positive")
    if not args.width_mult > 0:
        p.error("--width-mult must be positive")
    return args


def speed_flags(device: str) -> None:
    """The XLA flags ``duo_jax.main`` sets, before jax starts."""
    if device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from duo_jax import main as duo_main

        duo_main._cpu_speed_flags()


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def interleaved(runners: dict[str, Callable[[int], None]], *, rounds: int, steps: int,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per step of each runner: ``rounds`` rounds of ``steps`` steps of A, then B, ...

    ``cpu``, when given, receives the process's CPU seconds per step (all threads) of
    each runner: on a machine shared with other work, the work done rather than the
    share of the cores that the process got.
    """
    out: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run(steps)
            out[name].append((time.perf_counter() - t0) / steps)
            if cpu is not None:
                cpu.setdefault(name, []).append((time.process_time() - c0) / steps)
    return out


def summary(times: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": list(times)}


# ---------------------------------------------------------------------------
# duo_jax
# ---------------------------------------------------------------------------


class JaxStep:
    """duo_jax's jitted ``train_step`` on a synthetic batch, state donated."""

    def __init__(self, case: Case, *, batch: int, image: tuple, width_mult: float, dtype: str):
        import jax
        import jax.numpy as jnp
        import numpy as np

        from duo_jax import config_lib, models, sharding, train

        opts: dict[str, Any] = {"width_mult": width_mult}
        if dtype != "float32":
            opts["dtype"] = jnp.dtype(dtype)
        self.model = models.create_model(case.family, mode=case.mode, num_classes=case.num_classes, **opts)
        mesh = sharding.make_mesh()
        self.put = lambda x: sharding.put_batch(x, sharding.batch_sharding(mesh))
        rng = np.random.default_rng(0)
        self.host_batch = {"image": rng.standard_normal((batch, *image), np.float32),
                           "label": rng.integers(0, case.num_classes, batch).astype(np.int32)}
        self.batch = {k: self.put(v) for k, v in self.host_batch.items()}
        key = jax.random.key(0, impl="rbg")
        variables = jax.jit(lambda k, x: self.model.init(k, x, train=False))(key, self.host_batch["image"][:1])
        tx = train.make_optimizer(config_lib.sgd(0.1), steps_per_epoch=1000, total_steps=100_000)
        self.state = sharding.put_replicated(train.create_state(self.model.apply, variables, tx, seed=0), mesh)
        # As duo_jax.phases runs it: replicated state (donated), batch split over the devices.
        self.step_fn = sharding.jit_train_step(train.train_step, mesh)
        t0 = time.perf_counter()
        self.compiled = self.step_fn.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - t0
        self.xla_flops = _xla_flops(self.compiled)
        self.model_flops = 3 * forward_matmul_flops(self.model, variables, self.batch["image"])
        self._jax = jax

    def __call__(self, n: int) -> None:
        state, metrics = self.state, None
        for _ in range(n):
            state, metrics = self.compiled(state, self.batch)
        self._jax.block_until_ready((state, metrics))
        self.state, self.metrics = state, metrics


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # pylint: disable=broad-except  # some backends have none
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


def forward_matmul_flops(model, variables, images) -> float:
    """2 x multiply-adds of every convolution and dot of one training-mode forward pass.

    Counted from the jaxpr (``conv_general_dilated``, ``dot_general``), so it is
    independent of the backend; ``3 x`` this is the usual "model FLOPs" of a
    training step (the backward pass does twice the forward's work).
    """
    import jax
    import numpy as np

    def fwd(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})

    return _jaxpr_flops(jax.make_jaxpr(fwd)(variables, images).jaxpr, np)


def _jaxpr_flops(jaxpr, np) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            lhs, rhs = (v.aval for v in eqn.invars[:2])
            out = eqn.outvars[0].aval
            dn = eqn.params["dimension_numbers"]
            kernel_in = rhs.shape[dn.rhs_spec[1]]
            window = np.prod([rhs.shape[d] for d in dn.rhs_spec[2:]])
            total += 2.0 * np.prod(out.shape) * kernel_in * window
        elif name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs.shape[d] for d in lc])
        for sub in _subjaxprs(eqn.params):
            total += _jaxpr_flops(sub, np)
    return total


def _subjaxprs(params):
    for v in params.values():
        for item in (v if isinstance(v, (list, tuple)) else (v,)):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


# ---------------------------------------------------------------------------
# PyTorch twin
# ---------------------------------------------------------------------------


def torch_or_reason() -> tuple[Any, str]:
    try:
        import torch
    except ImportError:
        return None, "torch is not installed (pip install -e '.[torch]')"
    return torch, ""


class TorchStep:
    """The twin's training step on a synthetic batch, NHWC (channels_last) memory."""

    def __init__(self, case: Case, *, batch: int, image: tuple, width_mult: float, dtype: str, device: str):
        import torch
        import torch_twin

        self.torch = torch
        self.device = "cuda" if device == "gpu" else "cpu"
        torch.manual_seed(0)
        model = torch_twin.create_model(case.family, mode=case.mode, num_classes=case.num_classes,
                                        width_mult=width_mult, in_channels=image[2])
        self.model = model.to(self.device, memory_format=torch.channels_last)
        autocast = torch.bfloat16 if dtype == "bfloat16" else None
        self.step = torch_twin.make_train_step(self.model, autocast_dtype=autocast)
        g = torch.Generator().manual_seed(0)
        h, w, c = image
        self.images = torch.randn(batch, c, h, w, generator=g).to(self.device, memory_format=torch.channels_last)
        self.labels = torch.randint(0, case.num_classes, (batch,), generator=g).to(self.device)

    def __call__(self, n: int) -> None:
        metrics = None
        for _ in range(n):
            metrics = self.step(self.images, self.labels)
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        self.metrics = {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------
# Matmul rate
# ---------------------------------------------------------------------------


class Matmul:
    """Square ``size`` matmuls in jax, NumPy (CPU) and PyTorch: runners for :func:`interleaved`."""

    def __init__(self, size: int, *, dtype: str, device: str, torch):
        import jax
        import jax.numpy as jnp
        import numpy as np

        rng = np.random.default_rng(1)
        a_np, b_np = (rng.standard_normal((size, size), np.float32) for _ in range(2))
        a, b = (jax.device_put(m.astype(jnp.dtype(dtype))) for m in (a_np, b_np))
        mm = jax.jit(jnp.matmul)
        reps = 10 if device == "gpu" else 1  # one GPU matmul is too short to time alone
        self.size, self.dtype, self.flops = size, dtype, 2.0 * size**3 * reps
        self.runners: dict[str, Callable[[int], None]] = {}

        def run_jax(n):
            out = None
            for _ in range(n * reps):
                out = mm(a, b)
            out.block_until_ready()

        self.runners["matmul_jax"] = run_jax
        if device == "cpu":
            self.runners["matmul_numpy"] = lambda n: [a_np @ b_np for _ in range(n)]
        if torch is not None:
            tdev = "cuda" if device == "gpu" else "cpu"
            at, bt = (torch.from_numpy(m).to(tdev, getattr(torch, dtype)) for m in (a_np, b_np))

            def run_torch(n):
                for _ in range(n * reps):
                    torch.mm(at, bt)
                if tdev == "cuda":
                    torch.cuda.synchronize()

            self.runners["matmul_torch"] = run_torch
        for run in self.runners.values():
            run(1)  # warm-up: compilation, library start-up

    def rates(self, times: dict[str, list[float]]) -> dict[str, float]:
        """FLOP/s of each library (median over rounds) from :func:`interleaved`'s times."""
        return {k.removeprefix("matmul_"): self.flops / statistics.median(times[k]) for k in self.runners}


# ---------------------------------------------------------------------------
# Input pipeline
# ---------------------------------------------------------------------------


def pipeline_rates(case: Case, *, batch: int, image: tuple, jax_step: JaxStep, rounds: int, steps: int) -> dict:
    """Can ``duo_jax.input_pipeline`` feed the step? Its batch rate alone, and the
    real ``train_loop`` fed by its prefetching iterator vs by one resident batch."""
    import ml_collections
    import numpy as np

    from duo_jax import input_pipeline, train

    imagenet = image[0] > 64
    data_cfg = ml_collections.ConfigDict(dict(
        source="synthetic", image_shape=(256, 256, image[2]) if imagenet else image, num_classes=case.num_classes,
        num_train=max(4 * batch, 512), num_eval=batch, augment="imagenet" if imagenet else "cifar",
        image_size=image[0] if imagenet else None))
    data = input_pipeline.create_dataset(data_cfg, global_batch_size=batch, eval_batch_size=batch, seed=0)
    data.train_batch(0)
    t0, n_batches = time.perf_counter(), max(3, rounds)
    for s in range(n_batches):
        data.train_batch(s + 1)
    host_s = (time.perf_counter() - t0) / n_batches

    resident = jax_step.host_batch

    def loop(batch_iter):
        def run(n):
            start = int(jax_step.state.step)
            jax_step.state = train.train_loop(
                jax_step.state, num_steps=start + n, batch_iter=batch_iter, step_fn=jax_step.compiled,
                put=jax_step.put,                save=lambda s: None, log_every=n, checkpoint_every=10**9, on_log=lambda *a: None, phase="bench")
        return run

    def constant(start):
        while True:
            yield resident

    runners = {"pipeline": loop(data.train_iter), "resident": loop(constant)}
    for run in runners.values():
        run(1)  # warm-up: the loop's own jitted checks compile here
    times = interleaved(runners, rounds=rounds, steps=steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"augment": data_cfg.augment, "host_batch_s": host_s, "host_images_per_s": batch / host_s,
            "loop_step_s": med, "loop_slowdown": med["pipeline"] / med["resident"] - 1.0,
            "times_s": times}


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    speed_flags(args.device)
    import jax

    platform_name = jax.devices()[0].platform
    want = "cpu" if args.device == "cpu" else "gpu"
    if platform_name != want:
        raise SystemExit(f"error: --device={args.device} but jax runs on {platform_name}; "
                         "install jax for that device or pick the other --device")
    torch, skip_reason = torch_or_reason() if args.torch else (None, "--no-torch")
    if torch is not None and args.device == "gpu":
        if not torch.cuda.is_available():
            torch, skip_reason = None, "torch has no CUDA device"
        else:
            torch.backends.cudnn.benchmark = True

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": args.device, "dtype": args.dtype, "jax_device": str(jax.devices()[0].device_kind),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "jax": jax.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "warmup": args.warmup, "rounds": args.rounds, "steps": args.steps, "quick": args.quick,
        "load_average_at_start": os.getloadavg()[0],
    }
    print(f"# {meta['date']}  jax {meta['jax']} on {meta['jax_device']}  torch {meta['torch'] or '(skipped)'}  "
          f"XLA_FLAGS={meta['xla_flags']!r}", flush=True)

    # The matmul rate is timed in every round of every case, next to the steps (load changes).
    matmul = Matmul(args.matmul_size, dtype="float32" if args.device == "cpu" else args.dtype,
                    device=args.device, torch=torch)
    print(f"matmul {matmul.size}^3 {matmul.dtype}: " + ", ".join(
        f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in matmul.rates(interleaved(matmul.runners, rounds=3, steps=1)).items()),
          flush=True)

    results: dict[str, Any] = {}
    pipeline: dict[str, Any] = {}
    overhead: dict[str, Any] = {}
    out = {"meta": meta, "matmul": {"size": matmul.size, "dtype": matmul.dtype}, "cases": results,
           "quantizer_overhead": overhead, "pipeline": pipeline, "targets": {}}
    for group in case_groups(args.case_names):
        steps: dict[str, tuple[JaxStep, TorchStep | None]] = {}
        runners: dict[str, Callable[[int], None]] = {}
        for name in group:
            case = CASES[name]
            batch = args.batch or case.batch
            image = (args.image_size, args.image_size, case.image[2]) if args.image_size else case.image
            jstep = JaxStep(case, batch=batch, image=image, width_mult=args.width_mult, dtype=args.dtype)
            tstep = None
            if torch is not None:
                tstep = TorchStep(case, batch=batch, image=image, width_mult=args.width_mult, dtype=args.dtype,
                                  device=args.device)
                runners[f"{name}/torch"] = tstep
            runners[f"{name}/duo_jax"] = jstep
            steps[name] = (jstep, tstep)
        for r in runners.values():
            r(max(1, args.warmup))
        # Every network of the group and the matmuls, interleaved: A B C ... A B C ...
        cpu: dict[str, list[float]] = {}
        times = interleaved({**runners, **matmul.runners}, rounds=args.rounds, steps=args.steps, cpu=cpu)
        for name, (jstep, tstep) in steps.items():
            results[name] = _case_result(CASES[name], jstep, tstep, name, times, cpu, matmul, args, skip_reason)
            print(_row(name, results[name]) + "  matmul " + ", ".join(
                f"{k} {v / 1e9:.0f}" for k, v in results[name]["matmul_flop_per_s"].items()) + " GFLOP/s", flush=True)
        for name in group:
            ref = CASES[name].fp_reference
            if ref in group:  # paired: the ratio of the two steps within each round, median over rounds
                overhead[name] = {"fp_case": ref, "overhead": _paired(times[f"{name}/duo_jax"], times[f"{ref}/duo_jax"]) - 1}
                if torch is not None:
                    overhead[name]["torch_overhead"] = _paired(times[f"{name}/torch"], times[f"{ref}/torch"]) - 1
        for name, (jstep, _) in steps.items():
            if args.pipeline and CASES[name].mode == "binary" and args.device == "cpu":
                case = CASES[name]
                pipeline[name] = pipeline_rates(case, batch=results[name]["batch"], image=tuple(results[name]["image"]),
                                                jax_step=jstep, rounds=args.rounds, steps=args.steps)
                p = pipeline[name]
                print(f"  input pipeline ({p['augment']}): {p['host_images_per_s']:.0f} images/s alone; "
                      f"train_loop fed by it {100 * p['loop_slowdown']:+.1f}% vs a resident batch", flush=True)
        del steps, runners
        out["targets"] = targets(results, overhead)
        meta["load_average_at_end"] = os.getloadavg()[0]
        _write(args.out, out)  # after every group: a run stopped early keeps what it measured
    print(table(out))
    return out


def case_groups(names: list[str]) -> list[list[str]]:
    """The cases, each binary one with its fp reference (timed together), in the given order."""
    groups: list[list[str]] = []
    placed: set[str] = set()
    for name in names:
        if name in placed:
            continue
        ref = CASES[name].fp_reference
        partner = next((n for n in names if n != name and (n == ref or CASES[n].fp_reference == name)), None)
        group = [name] + ([partner] if partner and partner not in placed else [])
        groups.append(group)
        placed.update(group)
    return groups


def _paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a[r] / b[r]`` (both timed in round r)."""
    return statistics.median(x / y for x, y in zip(a, b))


def _case_result(case: Case, jstep: JaxStep, tstep, name: str, times: dict, cpu: dict, matmul: Matmul,
                 args: argparse.Namespace, skip_reason: str) -> dict[str, Any]:
    """One case's numbers from the times of its group's interleaved rounds."""
    rates = matmul.rates(times)
    peaks = [max(matmul.flops / times[k][r] for k in matmul.runners) for r in range(args.rounds)]
    batch = jstep.batch["label"].shape[0]
    flops = jstep.xla_flops or jstep.model_flops
    jt_all = times[f"{name}/duo_jax"]
    res: dict[str, Any] = {
        "note": case.note, "family": case.family, "mode": case.mode, "batch": batch,
        "image": list(jstep.batch["image"].shape[1:]), "width_mult": args.width_mult, "compile_s": jstep.compile_s,
        "matmul_flop_per_s": rates, "matmul_peak_flop_per_s": max(rates.values()),
        "matmul_peak_flop_per_s_rounds": peaks,
        "xla_flops_per_step": jstep.xla_flops, "model_flops_per_step": jstep.model_flops,
        "duo_jax": summary(jt_all), "loss_after": float(jstep.metrics["loss"]) / batch,
    }

    def rates_of(t_all: list[float]) -> dict[str, float]:
        t = statistics.median(t_all)
        # Fractions are paired too: the step's FLOP/s in round r over the best matmul rate in round r.
        frac = statistics.median(flops / x / p for x, p in zip(t_all, peaks))
        out = {"images_per_s": batch / t, "fraction_of_matmul": frac,
               "mfu_vs_measured": frac * jstep.model_flops / flops}
        if args.peak_tflops:
            out["mfu_vs_datasheet"] = jstep.model_flops / t / (args.peak_tflops * 1e12)
        return out

    # The same in CPU time (all threads): the matmul's FLOP per CPU second against the step's.
    cpu_peak = max(matmul.flops / statistics.median(cpu[k]) for k in matmul.runners)
    res["matmul_peak_flop_per_cpu_s"] = cpu_peak

    def cpu_of(key: str) -> dict[str, float]:
        c = statistics.median(cpu[key])
        return {"cpu_s": c, "fraction_of_matmul_cpu_time": flops / c / cpu_peak}

    res["duo_jax"].update(rates_of(jt_all), **cpu_of(f"{name}/duo_jax"))
    if tstep is not None:
        tt_all = times[f"{name}/torch"]
        res["torch"] = {**summary(tt_all), **rates_of(tt_all), **cpu_of(f"{name}/torch")}
        res["ratio_vs_torch"] = _paired(tt_all, jt_all)
        res["ratio_vs_torch_cpu_time"] = _paired(cpu[f"{name}/torch"], cpu[f"{name}/duo_jax"])
    else:
        res["torch"] = {"skipped": skip_reason}
    return res


def _write(path: str, out: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def targets(results: dict, overhead: dict) -> dict[str, Any]:
    """The CPU targets, for the binary VGG-7 step: measured value and whether it is met."""
    out = {}
    res = results.get("vgg7_binary")
    if res is None:
        return out
    if "ratio_vs_torch" in res:
        out["ratio_vs_torch"] = {"target": TARGETS["ratio_vs_torch"], "value": res["ratio_vs_torch"]}
    out["fraction_of_matmul"] = {"target": TARGETS["fraction_of_matmul"], "value": res["duo_jax"]["fraction_of_matmul"]}
    if "vgg7_binary" in overhead:
        out["quantizer_overhead"] = {"target": TARGETS["quantizer_overhead"], "value": overhead["vgg7_binary"]["overhead"]}
    for k, t in out.items():
        t["met"] = t["value"] <= t["target"] if k == "quantizer_overhead" else t["value"] >= t["target"]
    return out


def _row(name: str, res: dict) -> str:
    j, t = res["duo_jax"], res["torch"]
    tor = f"{t['images_per_s']:8.1f}" if "images_per_s" in t else "  skipped"
    ratio = f"{res['ratio_vs_torch']:5.2f}" if "ratio_vs_torch" in res else "    -"
    ratio_cpu = f"{res['ratio_vs_torch_cpu_time']:5.2f}" if "ratio_vs_torch_cpu_time" in res else "    -"
    tfrac = f"{100 * t['fraction_of_matmul']:5.1f}" if "fraction_of_matmul" in t else "    -"
    return (f"| {name:16s} | {res['batch']:5d} | {j['images_per_s']:8.1f} | {tor} | {ratio} | {ratio_cpu} | "
            f"{100 * j['fraction_of_matmul']:5.1f} | {tfrac} | {res['xla_flops_per_step'] or 0:9.3e} |")


def table(out: dict) -> str:
    lines = ["| case             | batch | duo_jax img/s | torch img/s | jax/torch | jax/torch CPU time "
             "| jax % matmul | torch % matmul | XLA FLOP/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(n, r) for n, r in out["cases"].items()]
    for n, o in out["quantizer_overhead"].items():
        extra = f", PyTorch twin {100 * o['torch_overhead']:+.1f}%" if "torch_overhead" in o else ""
        lines.append(f"quantizer overhead {n} vs {o['fp_case']}: duo_jax {100 * o['overhead']:+.1f}%{extra}")
    for k, t in out["targets"].items():
        lines.append(f"target {k}: {t['value']:.3f} (target {t['target']}) {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
