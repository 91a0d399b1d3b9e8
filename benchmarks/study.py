r"""Study: does BinaryDuo beat the baseline BNN at equal cost? Several seeds, paired.

::

    python benchmarks/study.py                 # learning-rate selection, then 5 test seeds
    python benchmarks/study.py --quick         # smoke test: 1 seed, a few steps of each phase
    python benchmarks/study.py --report-only   # rebuild the outputs from the finished runs

Data: the 5,000 bundled MNIST digits (4,000 train / 1,000 test), random
shifts of up to 2 pixels. Model: VGG-7 with float weights and binary
activations (the authors' CIFAR-10 setting) at ``width_mult`` 0.1875 of the
authors' widths: baseline 12-12-24-24-96-96, coupled 8-8-17-17-63-96, so that
the binary bottleneck matters (at the quickstart's 0.375 the baseline BNN is
within 3 points of the float network and of the ceiling). Methods, all with
batch 200, Adam with a cosine schedule, and the same data order (a function
of seed and step):

* ``fp``: the float reference (ReLU), baseline widths, 12 epochs;
* ``baseline``: the baseline BNN, baseline widths, 12 epochs;
* ``binaryduo``: coupled (ternary) 8 epochs -> decouple -> fine-tune
  (binary) 4 epochs: 12 epochs in all, as the baseline;
* ``decoupled``: BinaryDuo right after decoupling (must equal ``coupled``);
* ``coupled``: the coupled ternary model itself (not deployable), the upper
  reference.

Learning rates are chosen on a validation split (the last 1,000 of the 4,000
training digits; training on the other 3,000; seed 0), never on the test
digits: for ``fp``, ``baseline`` and ``coupled`` the best final validation
top-1 over a grid; for the fine-tuning, the best over its grid starting from
the chosen coupled model. The test runs (seeds 1..N) train on all 4,000
digits and report top-1 on the 1,000 test digits. Writes ``study.json``,
``study.md`` (mean +- std, the paired difference BinaryDuo - baseline with
its 95 % t-interval over seeds, costs side by side) and ``study.png`` into
``--out``; the runs go to ``--workdir`` (rerunning the command resumes and
skips finished phases; a learning rate whose loss diverges counts as lost).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # study_report.py, beside this file, also when this file is imported
    sys.path.insert(0, HERE)
MODES = {"fp": "fp", "baseline": "binary", "coupled": "coupled", "finetune": "decoupled"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the study runs. ``epochs`` per trained phase; ``steps`` (if set) overrides them."""

    width_mult: float
    batch_size: int
    eval_batch_size: int
    epochs: dict[str, float]
    grid: dict[str, tuple[float, ...]]
    validation: int
    seeds: tuple[int, ...]
    selection_seed: int = 0
    select: bool = True  # False: one learning rate per phase, used as it is (no validation runs)
    steps: dict[str, int] | None = None
    num_train: int | None = None
    num_eval: int | None = None


FULL = Plan(
    width_mult=0.1875, batch_size=200, eval_batch_size=500,
    epochs={"fp": 12, "baseline": 12, "coupled": 8, "finetune": 4},
    grid={"fp": (3e-3, 1e-2, 3e-2, 1e-1), "baseline": (3e-3, 1e-2, 3e-2, 1e-1), "coupled": (3e-3, 1e-2, 3e-2, 1e-1),
          "finetune": (1e-4, 3e-4, 1e-3, 3e-3)},
    validation=1000, seeds=(1, 2, 3, 4, 5))
QUICK = Plan(
    width_mult=0.0625, batch_size=50, eval_batch_size=100,
    epochs={"fp": 1, "baseline": 1, "coupled": 1, "finetune": 1},
    steps={"fp": 3, "baseline": 3, "coupled": 2, "finetune": 1},
    grid={"fp": (2e-3,), "baseline": (2e-3,), "coupled": (2e-3,), "finetune": (5e-4,)},
    validation=100, seeds=(1,), num_train=300, num_eval=100, select=False)


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


def make_config(plan: Plan, seed: int, *, validation: bool):
    """An empty-phased config of the study's data, model and run settings."""
    from duo_jax import config_lib as cl

    c = cl.base_config()
    c.name = "study"
    c.seed = seed
    c.batch_size, c.eval_batch_size = plan.batch_size, plan.eval_batch_size
    c.log_every = 10
    c.checkpoint_every = 10**9  # one checkpoint, at the end of each phase
    c.eval_every = 10**9  # evaluate at the end of each phase only
    c.keep_checkpoints = 1
    c.data.augment = "shift"
    c.data.num_train, c.data.num_eval = plan.num_train, plan.num_eval
    c.data.validation = plan.validation if validation else 0
    c.model.name = "vgg7"
    c.model.options.width_mult = plan.width_mult
    c.model.options.binarize_weights = False
    c.phases = ""
    return c


def add_train(c, plan: Plan, name: str, method: str, lr: float, parent: str = "") -> None:
    """Appends a training phase of ``method`` (``fp``, ``baseline``, ``coupled``, ``finetune``)."""
    from duo_jax import config_lib as cl

    c[name] = cl.train_phase(MODES[method], plan.epochs[method], cl.adam(lr), parent=parent,
                             steps=(plan.steps or {}).get(method, 0), label=f"{method} lr={lr:g}")
    c.phases = ",".join([p for p in c.phases.split(",") if p] + [name])


def add_decouple(c, parent: str, name: str = "decouple") -> None:
    from duo_jax import config_lib as cl

    c[name] = cl.decouple_phase(parent)
    c.phases = f"{c.phases},{name}"


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def run_config(config, workdir: str, args: argparse.Namespace) -> dict[str, Any]:
    """``phases.run`` of one config (resumes, skips finished phases); prints a line.

    With ``args.report_only``, the results the run left instead (none: an error).
    """
    from duo_jax import phases, reporting
    from duo_jax.errors import UserError

    t0 = time.perf_counter()
    if args.report_only:
        results = reporting.read_json(os.path.join(workdir, "results.json")) or {}
        missing = [p for p in config.phases.split(",") if p not in results]
        if missing:
            raise UserError(f"{workdir} has no results of phase(s) {', '.join(missing)}; "
                            "run the study without --report-only first")
    else:
        results = phases.run(config, workdir, progress=args.progress)
    print(f"  {os.path.basename(workdir)}: {time.perf_counter() - t0:.0f} s "
          + ", ".join(f"{k} {100 * v['top1']:.1f}%" for k, v in results.items()), flush=True)
    return results


def run_point(config, workdir: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """:func:`run_config`, or None when the training loss diverged (recorded: a rerun skips it)."""
    from duo_jax import reporting
    from duo_jax.train import NonFiniteLoss

    marker = os.path.join(workdir, "diverged.json")
    if os.path.exists(marker):
        return None
    try:
        return run_config(config, workdir, args)
    except NonFiniteLoss as e:
        reporting.write_json_atomic(marker, {"error": str(e)})
        print(f"  {os.path.basename(workdir)}: diverged", flush=True)
        return None


def choose(grid: tuple[float, ...], val_top1: list[float | None], what: str = "") -> dict[str, Any]:
    """The learning rate of the best validation top-1 (the first of equals; None = diverged)."""
    from duo_jax.errors import UserError

    ok = [v for v in val_top1 if v is not None]
    if not ok:
        raise UserError(f"every learning rate of {what} diverged ({', '.join(map(str, grid))}); lower the grid")
    return {"grid": list(grid), "val_top1": list(val_top1), "chosen": grid[val_top1.index(max(ok))]}


def select_lrs(plan: Plan, args: argparse.Namespace) -> tuple[dict[str, dict], list[str]]:
    """Learning rates chosen on the validation split, and the run directories used.

    Per phase (``fp``, ``baseline``, ``coupled``, ``finetune``): the grid, the
    validation top-1 of each learning rate (None: diverged, or not selected),
    the chosen one. Each (method, learning rate) point has its own run
    directory, so a grid can be extended without rerunning its other points;
    the fine-tuning grid runs from the chosen coupled model.
    """
    if not plan.select:
        return {m: {"grid": list(g), "val_top1": [None] * len(g), "chosen": g[0]} for m, g in plan.grid.items()}, []
    root, out, dirs = os.path.join(args.workdir, "select"), {}, []
    for method in ("fp", "baseline", "coupled"):
        val = []
        for lr in plan.grid[method]:
            c = make_config(plan, plan.selection_seed, validation=True)
            add_train(c, plan, method, method, lr)
            dirs.append(os.path.join(root, f"{method}_lr{lr:g}"))
            r = run_point(c, dirs[-1], args)
            val.append(None if r is None else r[method]["top1"])
        out[method] = choose(plan.grid[method], val, method)
    c = make_config(plan, plan.selection_seed, validation=True)
    add_train(c, plan, "coupled", "coupled", out["coupled"]["chosen"])
    add_decouple(c, "coupled")
    for j, lr in enumerate(plan.grid["finetune"]):
        add_train(c, plan, f"finetune_{j}", "finetune", lr, parent="decouple")
    dirs.append(os.path.join(root, f"finetune_after_coupled_lr{out['coupled']['chosen']:g}"))
    r = run_config(c, dirs[-1], args)
    out["finetune"] = choose(plan.grid["finetune"], [r[f"finetune_{j}"]["top1"]
                                                      for j in range(len(plan.grid["finetune"]))], "finetune")
    return out, dirs


def run_seed(plan: Plan, seed: int, lrs: dict[str, dict], args: argparse.Namespace) -> dict[str, Any]:
    """Trains every method with seed ``seed`` on all training digits; test top-1 and times."""
    c = make_config(plan, seed, validation=False)
    for method in ("fp", "baseline", "coupled"):
        add_train(c, plan, method, method, lrs[method]["chosen"])
    add_decouple(c, "coupled")
    add_train(c, plan, "finetune", "finetune", lrs["finetune"]["chosen"], parent="decouple")
    r = run_config(c, os.path.join(args.workdir, f"seed{seed}"), args)
    d = r["decouple"]
    duo_wall = r["coupled"]["wall_time"] + d["wall_time"] + r["finetune"]["wall_time"]
    return {
        "top1": {"fp": r["fp"]["top1"], "baseline": r["baseline"]["top1"], "binaryduo": r["finetune"]["top1"],
                 "decoupled": d["top1"], "coupled": r["coupled"]["top1"]},
        "wall_time": {"fp": r["fp"]["wall_time"], "baseline": r["baseline"]["wall_time"], "binaryduo": duo_wall,
                      "decoupled": r["coupled"]["wall_time"] + d["wall_time"], "coupled": r["coupled"]["wall_time"]},
        "decouple": {"coupled_top1": d["coupled_top1"], "decoupled_top1": d["top1"],
                     "exact": d["top1"] == d["coupled_top1"] == r["coupled"]["top1"],
                     "max_rel_logit_diff": d["max_rel_logit_diff"]},
        "epochs": {k: r[k]["epochs"] for k in ("fp", "baseline", "coupled", "finetune")},
    }


def train_wall(dirs: list[str]) -> float:
    """Seconds the phases run in ``dirs`` took, as recorded (a resumed or rerun study counts them once)."""
    from duo_jax import reporting

    results = [reporting.read_json(os.path.join(d, "results.json")) or {} for d in dirs]
    return sum(r["wall_time"] for res in results for r in res.values())


def costs(plan: Plan, image_shape: tuple[int, int, int] = (28, 28, 1)) -> dict[str, dict]:
    """Parameters, MACs, binary ops, OPs and memory per image of each mode's model."""
    from duo_jax import models, summary

    out = {}
    for mode in ("fp", "binary", "coupled", "decoupled"):
        model = models.create_model("vgg7", mode=mode, num_classes=10, width_mult=plan.width_mult,
                                    binarize_weights=False)
        out[mode] = dict(summary.totals(model, image_shape))
    return out


# ---------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------


def study_main(args: argparse.Namespace) -> dict[str, Any]:
    """Chooses the learning rates, runs every seed, writes study.json, study.md and study.png."""
    import jax
    from study_report import METHODS, LABELS, describe, markdown, paired_difference, plot, verdict

    from duo_jax import reporting

    plan = QUICK if args.quick else dataclasses.replace(FULL, seeds=tuple(range(1, args.seeds + 1)))
    if not (args.report_only or os.environ.get("JAX_COMPILATION_CACHE_DIR")):  # seeds share compiled programs
        jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "jax_cache"))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    print(f"study: width_mult {plan.width_mult}, seeds {plan.seeds}; learning rates", flush=True)
    lrs, dirs = select_lrs(plan, args)
    print("  chosen: " + ", ".join(f"{m} {v['chosen']:g}" for m, v in lrs.items()), flush=True)
    runs = []  # one dict per seed, from run_seed
    for i, seed in enumerate(plan.seeds):
        print(f"seed {seed} ({i + 1}/{len(plan.seeds)})", flush=True)
        runs.append(run_seed(plan, seed, lrs, args))
    elapsed = time.perf_counter() - t0
    if args.report_only:  # the elapsed time of the command that trained, if it wrote one here
        elapsed = (reporting.read_json(os.path.join(args.out, "study.json")) or {}).get("elapsed_s")
    summary = {m: describe([r["top1"][m] for r in runs]) for m in METHODS}
    paired = paired_difference(summary["binaryduo"]["values"], summary["baseline"]["values"])
    study = {
        "command": "python benchmarks/study.py" + (" --quick" if args.quick else f" --seeds {args.seeds}"),
        "plan": dataclasses.asdict(plan), "labels": LABELS, "selection": lrs, "runs": runs,
        "summary": summary, "paired": paired, "verdict": verdict(paired),
        "decouple_exact_all_seeds": all(r["decouple"]["exact"] for r in runs),
        "wall_time": {m: describe([r["wall_time"][m] for r in runs]) for m in METHODS},
        "costs": costs(plan), "elapsed_s": elapsed,
        "train_wall_s": train_wall(dirs + [os.path.join(args.workdir, f"seed{s}") for s in plan.seeds]),
    }
    reporting.write_json_atomic(os.path.join(args.out, "study.json"), study)
    with open(os.path.join(args.out, "study.md"), "w") as f:
        f.write(markdown(study))
    plot(study, os.path.join(args.out, "study.png"))
    print(markdown(study))
    print(f"wrote {', '.join(os.path.join(args.out, n) for n in ('study.json', 'study.md', 'study.png'))}")
    return study


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse also prints the usage)
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = _Parser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, a few steps of each phase (smoke test)")
    ap.add_argument("--seeds", type=int, default=5, help="test seeds 1..N of the full study (default 5)")
    ap.add_argument("--workdir", default=None, help="runs go here (default runs/study or runs/study_quick)")
    ap.add_argument("--out", default=None, help="study.json/md/png go here (default benchmarks/study; "
                                                "with --quick, the workdir)")
    ap.add_argument("--progress", action="store_true", help="progress bars of every phase")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild study.json/md/png from the finished runs in --workdir; train nothing")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {args.seeds}; pass --seeds 5 (or more) for the study")
    args.workdir = args.workdir or os.path.join("runs", "study_quick" if args.quick else "study")
    args.out = args.out or (args.workdir if args.quick else os.path.join(HERE, "study"))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # XLA's YNNPACK dot fusions, as duo_jax.main sets them (DUO_JAX_YNN=0: off); before jax starts.
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("DUO_JAX_YNN", "1") != "0" and "ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_experimental_ynn_fusion_type=dot".strip()
    from absl import logging as absl_logging

    from duo_jax.errors import UserError
    from duo_jax.train import NonFiniteLoss

    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        study_main(args)
    except (UserError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
