"""What a run leaves for people and tools: results.json, TensorBoard events, a PNG, a table.

Everything here is written by process 0 only.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax


def is_lead() -> bool:
    return jax.process_index() == 0


def write_json_atomic(path: str, data: Mapping[str, Any]) -> None:
    """Writes JSON through a temporary file and ``os.replace`` (never half-written)."""
    if not is_lead():
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=float)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


class ScalarWriter:
    """TensorBoard scalars under ``logdir`` (tensorboardX; no-op off process 0).

    The event file is created with the first scalar, so a run that stops
    before it has anything to log leaves no file behind.
    """

    def __init__(self, logdir: str):
        self._logdir = logdir
        self._w = None

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        if not is_lead():
            return
        if self._w is None:
            from tensorboardX import SummaryWriter

            self._w = SummaryWriter(self._logdir)
        for k, v in values.items():
            self._w.add_scalar(f"{prefix}{k}", float(v), int(step))
        self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.close()


def plot_curves(results: Mapping[str, Mapping[str, Any]], path: str) -> None:
    """One PNG: training loss and eval top-1 of every training phase.

    Phases with a parent continue the parent's x axis (fine-tuning is drawn
    after the coupled phase), so the recipe reads left to right.
    """
    if not is_lead():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    offsets: dict[str, int] = {}
    for name, r in results.items():
        offset = offsets.get(r.get("parent") or "", 0)
        offsets[name] = offset + int(r.get("steps", 0))
        train, evals = r.get("train_history", []), r.get("eval_history", [])
        label = r.get("label") or name
        if train:
            ax_loss.plot([offset + h["step"] for h in train], [h["loss"] for h in train], label=label)
        if evals:
            ax_acc.plot([offset + h["step"] for h in evals], [100 * h["top1"] for h in evals], "o-", label=label)
        if r.get("kind") == "decouple":
            ax_acc.plot([offset], [100 * r["top1"]], "k*", markersize=12, label=f"{label} (after decoupling)")
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title="training loss")
    ax_acc.set(xlabel="step", ylabel="eval top-1 (%)", title="evaluation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def summary_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A short plain-text table of the phases' accuracies."""
    rows = [("phase", "model", "top-1 %", "top-5 %", "best top-1 %", "steps", "time s")]
    for name, r in results.items():
        if r.get("kind") == "decouple":
            rows.append((name, "decoupled (before fine-tune)", f"{100 * r['top1']:.2f}", f"{100 * r['top5']:.2f}",
                         f"coupled {100 * r['coupled_top1']:.2f}", "0", f"{r.get('wall_time', 0):.0f}"))
        else:
            rows.append((name, r.get("label") or r.get("mode", ""), f"{100 * r['top1']:.2f}", f"{100 * r['top5']:.2f}",
                         f"{100 * r['best_top1']:.2f}", str(r.get("steps", "")), f"{r.get('wall_time', 0):.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
