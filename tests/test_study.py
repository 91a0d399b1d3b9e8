"""benchmarks/study.py: the --quick study end to end (every method, the decoupling
check, study.json/md/png), its costs and its statistics against NumPy."""

import json
import os
import subprocess
import sys

import jax
import matplotlib.image
import numpy as np
import pytest

from duo_jax import models
from duo_jax.errors import UserError
from duo_jax.models.common import resolve_widths
from duo_jax.models.vgg import WIDTHS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "study.py")


sys.path.insert(0, os.path.dirname(SCRIPT))
import study  # noqa: E402  (benchmarks/study.py)
import study_report  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Runs the smoke study once, as a user would: ``python benchmarks/study.py --quick``."""
    base = tmp_path_factory.mktemp("study")
    workdir, out = str(base / "runs"), str(base / "out")
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--workdir", workdir, "--out", out],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(out, "study.json")) as f:
        data = json.load(f)
    with open(os.path.join(workdir, "seed1", "results.json")) as f:
        runs = json.load(f)
    return {"workdir": workdir, "out": out, "study": data, "runs": runs, "stdout": proc.stdout}


def test_quick_study_reports_what_the_runs_gave(quick):
    s, r = quick["study"], quick["runs"]
    assert list(r) == ["fp", "baseline", "coupled", "decouple", "finetune"]
    assert s["plan"]["seeds"] == [1]
    expected = {"fp": r["fp"]["top1"], "baseline": r["baseline"]["top1"], "binaryduo": r["finetune"]["top1"],
                "decoupled": r["decouple"]["top1"], "coupled": r["coupled"]["top1"]}
    for method, top1 in expected.items():
        assert s["summary"][method]["values"] == [top1]
        assert 0.0 <= top1 <= 1.0
    # Every method trained for its planned number of steps; BinaryDuo's phases in sequence.
    for phase, method in (("fp", "fp"), ("baseline", "baseline"), ("coupled", "coupled"), ("finetune", "finetune")):
        assert r[phase]["steps"] == study.QUICK.steps[method]
    assert r["finetune"]["parent"] == "decouple" and r["decouple"]["parent"] == "coupled"
    assert r["fp"]["mode"] == "fp" and r["baseline"]["mode"] == "binary" and r["finetune"]["mode"] == "decoupled"
    # The decoupling check: accuracy right after decoupling equals the coupled model's.
    d = s["runs"][0]["decouple"]
    assert d["decoupled_top1"] == d["coupled_top1"] == r["coupled"]["top1"]
    assert d["exact"] and s["decouple_exact_all_seeds"]
    assert d["max_rel_logit_diff"] <= 1e-5
    # The paired difference, from the runs' own numbers; one seed has no interval.
    p = s["paired"]
    assert p["per_seed"] == pytest.approx([r["finetune"]["top1"] - r["baseline"]["top1"]], abs=1e-12)
    assert p["ci95"] is None and s["verdict"].startswith("one seed")
    wall = r["coupled"]["wall_time"] + r["decouple"]["wall_time"] + r["finetune"]["wall_time"]
    assert s["wall_time"]["binaryduo"]["mean"] == pytest.approx(wall)
    assert s["train_wall_s"] == pytest.approx(sum(phase["wall_time"] for phase in r.values()))
    # Quick mode uses its single learning rate per phase as it is.
    for phase, grid in study.QUICK.grid.items():
        assert s["selection"][phase] == {"grid": list(grid), "val_top1": [None], "chosen": grid[0]}


def _macs(widths, decoupled=False):
    """VGG-7 MACs per 28x28x1 image, by hand: 3x3 convs at 28, 28, 14, 7 pixels (each
    max-pool halves, flooring), a 4x4 stride-4 conv on 3x3 -> 1x1 (SAME), a 1x1 conv, dense."""
    w = list(widths)
    k = 2 if decoupled else 1  # a decoupled layer reads both binary copies of its input
    return (28 * 28 * 9 * 1 * w[0] + 28 * 28 * 9 * k * w[0] * w[1] + 14 * 14 * 9 * k * w[1] * w[2]
            + 7 * 7 * 9 * k * w[2] * w[3] + 16 * k * w[3] * w[4] + k * w[4] * w[5] + w[5] * 10)


def test_quick_costs_match_counts_by_hand(quick):
    c, wm = quick["study"]["costs"], study.QUICK.width_mult
    x = jax.numpy.zeros((1, 28, 28, 1))
    for mode in ("fp", "binary", "coupled", "decoupled"):
        model = models.create_model("vgg7", mode=mode, num_classes=10, width_mult=wm)
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x))["params"]
        params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))
        assert c[mode]["params"] == params, mode
        macs = _macs(resolve_widths(WIDTHS, mode, None, wm), decoupled=mode == "decoupled")
        assert c[mode]["float_macs"] == macs and c[mode]["bops"] == 0, mode  # float weights
        assert c[mode]["ops"] == macs, mode
    assert _macs((4, 4, 8, 8, 32, 32)) == 231232  # the arithmetic itself, once


def test_quick_writes_table_and_plot(quick):
    out, s = quick["out"], quick["study"]
    with open(os.path.join(out, "study.md")) as f:
        md = f.read()
    for method, label in study_report.LABELS.items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
        assert f"{100 * s['summary'][method]['mean']:.2f} ± " in row
    assert "Paired difference BinaryDuo − baseline BNN" in md and "| 1 |" in md and "| yes |" in md
    assert f"| baseline BNN | {s['costs']['binary']['params']:,} |" in md
    assert md.strip().splitlines()[0] in quick["stdout"]
    image = matplotlib.image.imread(os.path.join(out, "study.png"))
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_report_only_rebuilds_the_outputs_from_the_runs(quick, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DUO_JAX_YNN", "0")  # main() would otherwise add an XLA flag to this process's environment
    out = str(tmp_path / "again")
    study.main(["--quick", "--report-only", "--workdir", quick["workdir"], "--out", out])
    with open(os.path.join(out, "study.json")) as f:
        again = json.load(f)
    for key in ("summary", "paired", "runs", "costs", "selection", "train_wall_s", "command"):
        assert again[key] == quick["study"][key], key
    assert os.path.getsize(os.path.join(out, "study.png")) > 10_000
    with pytest.raises(SystemExit) as exit_info:  # nothing to report: one line, exit 2
        study.main(["--quick", "--report-only", "--workdir", str(tmp_path / "empty"), "--out", out])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "without --report-only" in err and err.strip().count("\n") == 0


def test_paired_difference_t_interval():
    a = np.array([0.90, 0.91, 0.88, 0.93, 0.90])
    b = np.array([0.89, 0.92, 0.85, 0.90, 0.90])
    p = study_report.paired_difference(a.tolist(), b.tolist())
    d = a - b
    half = 2.7764451051977987 * d.std(ddof=1) / np.sqrt(5)  # t quantile 0.975, 4 degrees of freedom
    assert p["per_seed"] == pytest.approx(d.tolist())
    assert p["mean"] == pytest.approx(d.mean()) and p["std"] == pytest.approx(d.std(ddof=1))
    assert p["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert (p["n"], p["wins"], p["losses"]) == (5, 3, 1)
    assert study_report.verdict(p).startswith("does not support")  # the interval [-0.010, 0.034] holds 0
    better, worse = [0.9, 0.91, 0.92], [0.8, 0.8, 0.8]
    assert study_report.verdict(study_report.paired_difference(better, worse)).startswith("supports")
    assert study_report.verdict(study_report.paired_difference(worse, better)).startswith("contradicts")


def test_choose_takes_the_first_best_learning_rate():
    assert study.choose((1e-3, 3e-3, 1e-2), [0.5, 0.7, 0.7])["chosen"] == 3e-3
    assert study.choose((1e-3, 3e-3), [0.9, 0.1])["chosen"] == 1e-3
    assert study.choose((1e-3, 3e-3, 1e-2), [0.5, 0.6, None])["chosen"] == 3e-3  # None: diverged
    with pytest.raises(UserError, match="every learning rate of fp diverged"):
        study.choose((1e-2, 1e-1), [None, None], "fp")


def test_validation_split_is_carved_from_the_training_digits():
    from duo_jax import config_lib, input_pipeline

    x_train, y_train, _, _ = input_pipeline.load_bundled("mnist5k")
    cfg = config_lib.base_config().data
    cfg.validation = 1000
    data = input_pipeline.create_dataset(cfg, global_batch_size=200, eval_batch_size=400, seed=0)
    assert (data.info.num_train, data.info.num_eval) == (3000, 1000)
    batches = list(data.eval_batches())
    mask = np.concatenate([b["mask"] for b in batches]) > 0
    labels = np.concatenate([b["label"] for b in batches])[mask]
    np.testing.assert_array_equal(labels, y_train[3000:])  # the last 1,000 training digits, in order
    first = batches[0]["image"][0, ..., 0] * 0.3081 + 0.1307
    np.testing.assert_allclose(first, x_train[3000, ..., 0] / 255.0, atol=1e-6)
    seen = np.concatenate([data.train_batch(step)["label"] for step in range(15)])  # one epoch
    np.testing.assert_array_equal(np.bincount(seen, minlength=10), np.bincount(y_train[:3000], minlength=10))
    cfg.validation = 4000
    with pytest.raises(UserError, match="data.validation=4000 must be between 1 and 3999"):
        input_pipeline.create_dataset(cfg, global_batch_size=200, eval_batch_size=400, seed=0)


def test_bad_seed_count_is_one_line_error():
    proc = subprocess.run([sys.executable, SCRIPT, "--seeds", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: --seeds must be at least 1")
