"""What the study writes: statistics over seeds, ``study.md``'s tables, ``study.png``.

The inputs are :func:`study.study_main`'s results (plain dicts, as in ``study.json``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

METHODS = ("fp", "baseline", "binaryduo", "decoupled", "coupled")
LABELS = {
    "fp": "float reference (fp, baseline widths)",
    "baseline": "baseline BNN (binary, baseline widths)",
    "binaryduo": "BinaryDuo: coupled -> decouple -> fine-tune (binary)",
    "decoupled": "BinaryDuo right after decoupling (binary)",
    "coupled": "BinaryDuo coupled model (ternary, not deployable)",
}


def describe(values: list[float]) -> dict[str, Any]:
    """Values, mean and sample standard deviation (0 for one value)."""
    v = np.asarray(values, float)
    return {"values": v.tolist(), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def paired_difference(a: list[float], b: list[float]) -> dict[str, Any]:
    """Per-seed ``a - b``, its mean and two-sided 95 % t-interval (None with one seed)."""
    from scipy import stats

    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    out = {"per_seed": d.tolist(), "n": n, "mean": float(d.mean()), "wins": int((d > 0).sum()),
           "losses": int((d < 0).sum()), "std": None, "t_quantile": None, "ci95": None}
    if n > 1:
        sd, t = float(d.std(ddof=1)), float(stats.t.ppf(0.975, n - 1))
        half = t * sd / np.sqrt(n)
        out.update(std=sd, t_quantile=t, ci95=[float(d.mean() - half), float(d.mean() + half)])
    return out


def verdict(p: dict[str, Any]) -> str:
    """What the paired difference says about the paper's claim (BinaryDuo > baseline)."""
    if p["ci95"] is None:
        return "one seed: no interval, no verdict"
    lo, hi = p["ci95"]
    if lo > 0:
        return "supports the paper's claim: BinaryDuo is better than the baseline BNN at equal cost"
    if hi < 0:
        return "contradicts the paper's claim: the baseline BNN is better than BinaryDuo at equal cost"
    return "does not support the paper's claim: the 95 % interval contains 0 (no significant difference)"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


MODE_OF = {"fp": "fp", "baseline": "binary", "binaryduo": "decoupled", "decoupled": "decoupled", "coupled": "coupled"}
COST_ROWS = (("binary", "baseline BNN"), ("decoupled", "BinaryDuo decoupled"), ("coupled", "BinaryDuo coupled"),
             ("fp", "float reference"))


def markdown(study: dict[str, Any]) -> str:
    """The study's tables: accuracy, paired difference, costs, learning rates, decoupling."""
    s, plan, p, c = study["summary"], study["plan"], study["paired"], study["costs"]
    seeds = ", ".join(map(str, plan["seeds"]))
    lines = [f"VGG-7 x {plan['width_mult']} on MNIST-5k (4,000 train / 1,000 test digits), "
             f"{len(plan['seeds'])} seed(s) ({seeds}); test top-1 in %.", ""]
    lines += _table(["method", "params", "OPs / image", "test top-1 % (mean ± std)", "per seed", "wall s (mean)"], [
        [LABELS[m], f"{c[MODE_OF[m]]['params']:,}", f"{c[MODE_OF[m]]['ops']:,.0f}",
         f"{_pct(s[m]['mean'])} ± {_pct(s[m]['std'])}", " ".join(_pct(v) for v in s[m]["values"]),
         f"{study['wall_time'][m]['mean']:.0f}"] for m in METHODS])
    ci = "n/a (one seed)" if p["ci95"] is None else f"[{100 * p['ci95'][0]:+.2f}, {100 * p['ci95'][1]:+.2f}]"
    lines += ["", f"**Paired difference BinaryDuo − baseline BNN** (points of top-1): mean {100 * p['mean']:+.2f}, "
              f"95 % t-interval {ci}; per seed {', '.join(f'{100 * v:+.2f}' for v in p['per_seed'])}; "
              f"BinaryDuo better in {p['wins']} of {p['n']} seeds, worse in {p['losses']}. "
              f"Verdict: {study['verdict']}.", "",
              "Equal-cost check (per image; float weights, so every MAC is a float MAC):", ""]
    lines += _table(["model", "params", "float MACs", "binary ops", "OPs", "memory (bytes, as deployed)"], [
        [label, f"{c[m]['params']:,}", f"{c[m]['float_macs']:,}", f"{c[m]['bops']:,}", f"{c[m]['ops']:,.0f}",
         f"{c[m]['memory_bytes']:,.0f}"] for m, label in COST_ROWS])
    rel = [f"{k} {100 * (c['decoupled'][k] / c['binary'][k] - 1):+.1f} %"
           for k in ("params", "float_macs", "ops", "memory_bytes") if c["binary"][k]]
    how = (f"chosen on the validation split (seed {plan['selection_seed']}, the last {plan['validation']:,} "
           "training digits held out)") if plan["select"] else "one per phase, used as given (no selection runs)"
    lines += ["", "Decoupled vs baseline: " + ", ".join(rel) + ".", "", f"Learning rates (Adam, cosine), {how}:", ""]
    lines += _table(["phase", "grid", "validation top-1 %", "chosen"], [
        [m, ", ".join(f"{lr:g}" for lr in sel["grid"]),
         ", ".join("not run" if v is None else _pct(v) for v in sel["val_top1"]), f"{sel['chosen']:g}"]
        for m, sel in study["selection"].items()])
    lines += ["", "Decoupling (test top-1 %):", ""]
    lines += _table(["seed", "coupled", "right after decoupling", "equal", "max relative logit difference"], [
        [seed, _pct(r["decouple"]["coupled_top1"]), _pct(r["decouple"]["decoupled_top1"]),
         "yes" if r["decouple"]["exact"] else "NO", f"{r['decouple']['max_rel_logit_diff']:.1e}"]
        for seed, r in zip(plan["seeds"], study["runs"])])
    took = "" if study.get("elapsed_s") is None else f"; the command took {study['elapsed_s'] / 60:.1f} min"
    lines += ["", f"Command: `{study['command']}`; training and evaluation took {study['train_wall_s'] / 60:.1f} min "
              f"(every phase's wall time, learning-rate selection included){took}."]
    return "\n".join(lines) + "\n"


def plot(study: dict[str, Any], path: str) -> None:
    """Test top-1 per method (seed points, mean +- std) and the paired differences (mean, 95 % CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, p = study["summary"], study["paired"]
    fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    for i, m in enumerate(METHODS):
        v = 100 * np.asarray(s[m]["values"])
        x = i + np.linspace(-0.12, 0.12, len(v)) if len(v) > 1 else np.full(1, float(i))
        ax.plot(x, v, "o", alpha=0.6)
        ax.errorbar([i + 0.3], [v.mean()], yerr=[100 * s[m]["std"]], fmt="k_", capsize=5, markersize=14)
    ax.set_xticks(range(len(METHODS)), ["float", "baseline BNN", "BinaryDuo\n(fine-tuned)", "BinaryDuo\n(decoupled)",
                                         "coupled\n(ternary)"])
    ax.set(ylabel="test top-1 (%)", title="accuracy per seed (dots) and mean ± std (bars)")
    d = 100 * np.asarray(p["per_seed"])
    ax_d.plot(np.zeros_like(d), d, "o", alpha=0.6)
    if p["ci95"] is not None:
        lo, hi = 100 * np.asarray(p["ci95"])
        ax_d.errorbar([0.15], [d.mean()], yerr=[[d.mean() - lo], [hi - d.mean()]], fmt="ks", capsize=5)
    ax_d.axhline(0, color="gray", lw=1)
    ax_d.set(xlim=(-0.5, 0.5), xticks=[], ylabel="points", title="BinaryDuo − baseline\n(per seed; mean, 95 % CI)")
    for a in (ax, ax_d):
        a.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
