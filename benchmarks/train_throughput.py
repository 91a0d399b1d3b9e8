r"""Training-step throughput: duo_jax's ``train_step`` against a PyTorch twin.

    python benchmarks/train_throughput.py --out=runs/bench/cpu.json        # the CPU table
    python benchmarks/train_throughput.py --quick                          # smoke test (seconds)
    bash benchmarks/gpu_check.sh                                           # ResNet-18 on one GPU, bf16

For each case (a model family, mode, batch and image shape, on synthetic
data) it builds duo_jax's real training step, ``train.train_step`` jitted by
``sharding.jit_train_step`` on a ``train.create_state`` state with the
authors' SGD, as ``duo_jax.phases`` runs it (state donated), and the PyTorch
twin of the same network (``benchmarks/torch_twin.py``: same layers, widths
and quantizers, SGD with Nesterov momentum). After warm-up, a binary case and
its ``fp`` reference (float ReLU and weights), both libraries, and a square
matmul in jax, NumPy and PyTorch are run interleaved, A B C ..., for
``--rounds`` rounds (``benchmarks/timing.py``). Reported, as medians:
images/s, the ratio duo_jax / PyTorch (per-round ratios), the fraction of
the best matmul rate of the same round that the step reaches (the step's
FLOPs from XLA's cost analysis of the compiled step), the same in CPU time,
and the quantizer overhead (binary step / fp step - 1).

The machine may be shared: every round records how much of the CPUs other
processes used, and the statistics are given over all rounds and over the
quiet ones (others under 10 %); the targets are judged on the quiet rounds
when there are at least 3. On CPU the process gets the XLA flags
``python -m duo_jax.main`` sets (``DUO_JAX_YNN=0`` turns them off, as there).
PyTorch is optional (the ``torch`` extra): without it the twin is skipped.
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
from typing import Any, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (_ROOT, os.path.join(_ROOT, "benchmarks")) if p not in sys.path]

import timing  # noqa: E402  (benchmarks/timing.py)
from steps import JaxStep, TorchStep, torch_or_reason  # noqa: E402  (benchmarks/steps.py)


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
    "vgg7_fp": Case("vgg7", "fp", 128, (32, 32, 3), 10, "VGG-7 baseline widths, float ReLU (reference)"),
    "vgg7_decoupled": Case("vgg7", "decoupled", 128, (32, 32, 3), 10,
                           "binary VGG-7, BinaryDuo decoupled widths 3-45, 90-45, 90-90, 180-90, 180-336, 672-512"),
    "resnet18_binary": Case("resnet18", "binary", 16, (224, 224, 3), 1000,
                            "binary ResNet-18 (baseline widths, binary weights), ImageNet shape", "resnet18_fp"),
    "resnet18_fp": Case("resnet18", "fp", 16, (224, 224, 3), 1000, "ResNet-18, float ReLU and weights (reference)"),
}
DEFAULT_CASES = ("vgg7_binary", "vgg7_fp", "vgg7_decoupled", "resnet18_binary", "resnet18_fp")
QUICK_CASES = ("vgg7_binary", "vgg7_fp")
TARGETS = {"ratio_vs_torch": 1.0, "fraction_of_matmul": 0.80, "quantizer_overhead": 0.05}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=None, help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="computation dtype of both networks (parameters stay float32)")
    p.add_argument("--batch", type=int, default=0, help="batch size of every case (0: each case's own)")
    p.add_argument("--image-size", type=int, default=0, help="square image side of every case (0: each case's own)")
    p.add_argument("--width-mult", type=float, default=1.0, help="scales every width (smoke tests)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each network after compiling")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds; each runs --steps steps of A, then of B, ...")
    p.add_argument("--steps", type=int, default=1, help="steps per round and network")
    p.add_argument("--matmul-size", type=int, default=0, help="side of the square matmul (0: 2048 CPU, 8192 GPU)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="a datasheet peak to report model FLOP utilisation against as well (989: H100/H200 bf16)")
    p.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure the input pipeline against the step (default: on for CPU, off for --quick)")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True, help="time the PyTorch twin")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny widths and batches, two rounds (the numbers mean nothing)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.cases = args.cases or ",".join(QUICK_CASES)
        args.batch = args.batch or 8
        args.image_size = args.image_size or 32
        args.width_mult = min(args.width_mult, 0.125)
        args.warmup, args.rounds, args.steps = 1, 2, 1
        args.matmul_size = args.matmul_size or 256
    if args.pipeline is None:
        args.pipeline = args.device == "cpu" and not args.quick
    args.matmul_size = args.matmul_size or (2048 if args.device == "cpu" else 8192)
    names = [c.strip() for c in (args.cases or ",".join(DEFAULT_CASES)).split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown or not names:
        p.error(f"unknown case(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(CASES)}")
    args.case_names = names
    for what in ("rounds", "steps", "matmul_size"):
        if getattr(args, what) < 1:
            p.error(f"--{what.replace('_', '-')} must be at least 1")
    for what in ("warmup", "batch", "image_size"):
        if getattr(args, what) < 0:
            p.error(f"--{what.replace('_', '-')} must not be negative")
    if not args.width_mult > 0:
        p.error("--width-mult must be positive")
    return args


def speed_flags(device: str) -> None:
    """The XLA flags ``duo_jax.main`` sets, before jax starts."""
    if device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from duo_jax import main as duo_main

        duo_main._cpu_speed_flags()  # pylint: disable=protected-access


# ---------------------------------------------------------------------------
# Input pipeline
# ---------------------------------------------------------------------------


def pipeline_rates(case: Case, *, batch: int, image: tuple, jax_step: JaxStep, rounds: int) -> dict[str, Any]:
    """Can ``duo_jax.input_pipeline`` feed the step? Its batch rate alone, and the
    real ``train_loop`` fed by its prefetching iterator vs by one resident batch."""
    import ml_collections

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

    def loop(batch_iter):
        def run(n):
            start = int(jax_step.state.step)
            jax_step.state = train.train_loop(
                jax_step.state, num_steps=start + n, batch_iter=batch_iter, step_fn=jax_step.compiled,
                put=jax_step.put, save=lambda s: None, log_every=n, checkpoint_every=10**9,
                on_log=lambda *a: None, phase="bench")
        return run

    def resident(start):
        while True:
            yield jax_step.host_batch

    runners = {"pipeline": loop(data.train_iter), "resident": loop(resident)}
    for run in runners.values():
        run(1)  # warm-up: the loop's own jitted checks compile here
    r = timing.interleaved(runners, rounds=rounds, steps=1)
    idx = timing.quiet_rounds(r)
    idx = idx if len(idx) >= timing.MIN_QUIET_ROUNDS else list(range(r.num_rounds))
    return {"augment": data_cfg.augment, "host_batch_s": host_s, "host_images_per_s": batch / host_s,
            "loop_slowdown": timing.paired([r.wall["pipeline"][i] for i in idx], [r.wall["resident"][i] for i in idx]) - 1,
            "rounds_used": len(idx), "wall_s": r.wall, "others_cpu_share": r.others_per_round()}


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def case_stats(rounds: timing.Rounds, idx: list[int], name: str, jstep: JaxStep, matmul: timing.Matmul,
               with_torch: bool, peak_tflops: float) -> dict[str, Any]:
    """A case's numbers over the rounds ``idx`` (medians; ratios and fractions paired by round)."""
    flops = jstep.xla_flops or jstep.model_flops
    batch = jstep.batch["label"].shape[0]
    best = matmul.best_per_round(rounds)
    cpu_best = matmul.best_per_cpu_second(rounds, idx)
    out: dict[str, Any] = {"rounds": len(idx), "matmul_flop_per_s": matmul.rates(rounds, idx)}
    for lib in ("duo_jax", "torch") if with_torch else ("duo_jax",):
        wall = [rounds.wall[f"{name}/{lib}"][i] for i in idx]
        cpu = [rounds.cpu[f"{name}/{lib}"][i] for i in idx]
        frac = statistics.median(flops / rounds.wall[f"{name}/{lib}"][i] / best[i] for i in idx)
        s = {"median_s": statistics.median(wall), "images_per_s": batch / statistics.median(wall),
             "fraction_of_matmul": frac, "mfu_vs_measured": frac * jstep.model_flops / flops,
             "cpu_s": statistics.median(cpu), "fraction_of_matmul_cpu_time": flops / statistics.median(cpu) / cpu_best}
        if peak_tflops:
            s["mfu_vs_datasheet"] = jstep.model_flops / s["median_s"] / (peak_tflops * 1e12)
        out[lib] = s
    if with_torch:
        pick = lambda d, lib: [d[f"{name}/{lib}"][i] for i in idx]
        out["ratio_vs_torch"] = timing.paired(pick(rounds.wall, "torch"), pick(rounds.wall, "duo_jax"))
        out["ratio_vs_torch_cpu_time"] = timing.paired(pick(rounds.cpu, "torch"), pick(rounds.cpu, "duo_jax"))
    return out


def headline(entry: dict[str, Any]) -> dict[str, Any]:
    """The quiet rounds' statistics where there are enough, else all rounds'."""
    return entry["quiet"] or entry["all"]


def targets(results: dict, overhead: dict) -> dict[str, Any]:
    """The CPU targets, for the binary VGG-7 step: measured value and whether it is met."""
    out: dict[str, Any] = {}
    res = results.get("vgg7_binary")
    if res is None:
        return out
    h = headline(res)
    rounds = f"{h['rounds']} quiet rounds" if res["quiet"] else f"all {h['rounds']} rounds, too few quiet"
    if "ratio_vs_torch" in h:
        out["ratio_vs_torch"] = {"target": TARGETS["ratio_vs_torch"], "value": h["ratio_vs_torch"]}
    out["fraction_of_matmul"] = {"target": TARGETS["fraction_of_matmul"], "value": h["duo_jax"]["fraction_of_matmul"]}
    if "vgg7_binary" in overhead:
        o = overhead["vgg7_binary"]
        out["quantizer_overhead"] = {"target": TARGETS["quantizer_overhead"], "value": headline(o)["duo_jax"]}
    for k, t in out.items():
        t["met"] = t["value"] <= t["target"] if k == "quantizer_overhead" else t["value"] >= t["target"]
        t["rounds"] = rounds
    return out


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
                         "install jax for that device or choose the other --device")
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
        "quiet_round": f"other processes under {timing.QUIET_OTHERS:.0%} of the CPUs",
        "load_average_at_start": os.getloadavg()[0],
    }
    print(f"# {meta['date']}  jax {meta['jax']} on {meta['jax_device']}  torch {meta['torch'] or '(skipped)'}  "
          f"XLA_FLAGS={meta['xla_flags']!r}", flush=True)
    matmul = timing.Matmul(args.matmul_size, dtype="float32" if args.device == "cpu" else args.dtype,
                           device=args.device, torch=torch)

    results: dict[str, Any] = {}
    overhead: dict[str, Any] = {}
    pipeline: dict[str, Any] = {}
    out = {"meta": meta, "matmul": {"size": matmul.size, "dtype": matmul.dtype}, "cases": results,
           "quantizer_overhead": overhead, "pipeline": pipeline, "targets": {}}
    for group in case_groups(args.case_names):
        steps: dict[str, JaxStep] = {}
        runners: dict[str, timing.Runner] = {}
        for name in group:
            case = CASES[name]
            batch = args.batch or case.batch
            image = (args.image_size, args.image_size, case.image[2]) if args.image_size else case.image
            steps[name] = JaxStep(case, batch=batch, image=image, width_mult=args.width_mult, dtype=args.dtype)
            print(f"  {name}: compiled in {steps[name].compile_s:.1f} s, "
                  f"{(steps[name].xla_flops or 0) / 1e9:.1f} GFLOP/step (XLA)", flush=True)
            runners[f"{name}/duo_jax"] = steps[name]
            if torch is not None:
                runners[f"{name}/torch"] = TorchStep(case, batch=batch, image=image, width_mult=args.width_mult,
                                                     dtype=args.dtype, device=args.device)
        for r in runners.values():
            r(max(1, args.warmup))
        # Every network of the group and the matmuls, interleaved: A B C ... A B C ...
        rounds = timing.interleaved({**runners, **matmul.runners}, rounds=args.rounds, steps=args.steps)
        quiet = timing.quiet_rounds(rounds)
        sets = {"all": list(range(args.rounds)), "quiet": quiet if len(quiet) >= timing.MIN_QUIET_ROUNDS else None}
        for name, jstep in steps.items():
            case = CASES[name]
            res = {"note": case.note, "family": case.family, "mode": case.mode, "batch": jstep.batch["label"].shape[0],
                   "image": list(jstep.batch["image"].shape[1:]), "width_mult": args.width_mult,
                   "compile_s": jstep.compile_s, "xla_flops_per_step": jstep.xla_flops,
                   "model_flops_per_step": jstep.model_flops, "loss_after": jstep.loss()}
            if torch is None:
                res["torch_skipped"] = skip_reason
            for key, idx in sets.items():
                res[key] = idx and case_stats(rounds, idx, name, jstep, matmul, torch is not None, args.peak_tflops)
            res["rounds"] = {"others_cpu_share": rounds.others_per_round(),
                             "matmul_best_flop_per_s": matmul.best_per_round(rounds),
                             **{f"{lib}_s": rounds.wall[f"{name}/{lib}"] for lib in ("duo_jax", "torch")
                                if f"{name}/{lib}" in rounds.wall},
                             **{f"{lib}_cpu_s": rounds.cpu[f"{name}/{lib}"] for lib in ("duo_jax", "torch")
                                if f"{name}/{lib}" in rounds.cpu}}
            results[name] = res
            print(_row(name, res), flush=True)
            ref = case.fp_reference
            if ref in steps:  # per-round ratio of the binary step to the fp step, median over rounds
                overhead[name] = {"fp_case": ref}
                for key, idx in sets.items():
                    overhead[name][key] = idx and {
                        lib: timing.paired([rounds.wall[f"{name}/{lib}"][i] for i in idx],
                                           [rounds.wall[f"{ref}/{lib}"][i] for i in idx]) - 1
                        for lib in ("duo_jax", "torch") if f"{name}/{lib}" in rounds.wall}
        for name, jstep in steps.items():
            if args.pipeline and CASES[name].mode == "binary":
                pipeline[name] = p = pipeline_rates(CASES[name], batch=results[name]["batch"],
                                                    image=tuple(results[name]["image"]), jax_step=jstep,
                                                    rounds=args.rounds)
                print(f"  input pipeline ({p['augment']}): {p['host_images_per_s']:.0f} images/s alone; "
                      f"train_loop fed by it {100 * p['loop_slowdown']:+.1f}% vs a resident batch", flush=True)
        del steps, runners
        out["targets"] = targets(results, overhead)
        meta["load_average_at_end"] = os.getloadavg()[0]
        _write(args.out, out)  # after every group: a run stopped early keeps what it measured
    print(table(out))
    return out


def case_groups(names: list[str]) -> list[list[str]]:
    """The cases, each binary one with its fp reference when both are asked for, in order."""
    groups: list[list[str]] = []
    placed: set[str] = set()
    for name in names:
        if name in placed:
            continue
        partner = next((n for n in names if n not in placed and n != name
                        and (n == CASES[name].fp_reference or CASES[n].fp_reference == name)), None)
        groups.append([name] + ([partner] if partner else []))
        placed.update(groups[-1])
    return groups


def _write(path: str, out: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def _row(name: str, res: dict) -> str:
    h = headline(res)
    j, t = h["duo_jax"], h.get("torch")
    fmt = lambda v, f: format(v, f) if v is not None else "-"
    return (f"| {name} | {res['batch']} | {h['rounds']} {'quiet' if res['quiet'] else 'all'} "
            f"| {j['images_per_s']:.1f} | {fmt(t and t['images_per_s'], '.1f')} "
            f"| {fmt(h.get('ratio_vs_torch'), '.2f')} | {fmt(h.get('ratio_vs_torch_cpu_time'), '.2f')} "
            f"| {100 * j['fraction_of_matmul']:.1f} | {fmt(t and 100 * t['fraction_of_matmul'], '.1f')} "
            f"| {100 * j['fraction_of_matmul_cpu_time']:.1f} | {res['xla_flops_per_step'] or 0:.3e} |")


def table(out: dict) -> str:
    lines = ["| case | batch | rounds | duo_jax img/s | PyTorch img/s | duo_jax / PyTorch | same, CPU time "
             "| duo_jax % of matmul | PyTorch % of matmul | duo_jax % of matmul, CPU time | XLA FLOP/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(n, r) for n, r in out["cases"].items()]
    for n, r in out["cases"].items():  # model FLOPs: 3x the forward pass's convolutions and dense layers
        h = headline(r)
        mfu = ", ".join(f"{lib} {100 * h[lib]['mfu_vs_measured']:.1f}% of the measured matmul rate"
                        + (f", {100 * h[lib]['mfu_vs_datasheet']:.1f}% of the datasheet peak"
                           if "mfu_vs_datasheet" in h[lib] else "")
                        for lib in ("duo_jax", "torch") if lib in h)
        lines.append(f"model FLOP utilisation {n} ({r['model_flops_per_step'] / 1e9:.1f} GFLOP/step): {mfu}")
    for n, o in out["quantizer_overhead"].items():
        h = headline(o)
        extra = f", PyTorch twin {100 * h['torch']:+.1f}%" if "torch" in h else ""
        lines.append(f"quantizer overhead {n} vs {o['fp_case']}: duo_jax {100 * h['duo_jax']:+.1f}%{extra}")
    for k, t in out["targets"].items():
        lines.append(f"target {k}: {t['value']:.3f} (target {t['target']}, {t['rounds']}) "
                     f"{'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
