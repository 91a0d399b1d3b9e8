"""Interleaved timing on a machine that other work may share, and the matmul rate.

:func:`interleaved` runs A, B, C, ... once per round, for several rounds, and
records for every run its wall time, this process's CPU time (all threads),
and the share of the machine's CPUs that *other* processes used meanwhile
(from ``/proc/stat``, Linux only). Libraries suffer unequally from other
work on the cores (an OpenMP barrier waits for a descheduled thread, XLA's
work-stealing pool less so), so ratios measured under load are biased:
:func:`quiet_rounds` picks the rounds in which the machine was otherwise
idle, and reports prefer them.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable, Sequence

Runner = Callable[[int], None]  # run(n): n steps, synchronized at the end

#: A round is quiet when other processes used less than this share of the CPUs during each of its runs.
QUIET_OTHERS = 0.10
#: Fewest quiet rounds that statistics are computed from.
MIN_QUIET_ROUNDS = 3


def _busy_cpu_seconds() -> float | None:
    """CPU seconds every process has used since boot (``/proc/stat``), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Rounds:
    """Per runner, per round: seconds per step (wall and CPU) and the others' CPU share."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    others: dict[str, list[float | None]]

    @property
    def num_rounds(self) -> int:
        return len(next(iter(self.wall.values())))

    def others_per_round(self) -> list[float | None]:
        """The largest share of the CPUs that other processes used during any run of each round."""
        out = []
        for r in range(self.num_rounds):
            vals = [v[r] for v in self.others.values()]
            out.append(None if None in vals else max(vals))
        return out


def interleaved(runners: dict[str, Runner], *, rounds: int, steps: int) -> Rounds:
    """``rounds`` rounds of ``steps`` steps of A, then of B, ...: times per step."""
    res = Rounds({k: [] for k in runners}, {k: [] for k in runners}, {k: [] for k in runners})
    ncpu = os.cpu_count() or 1
    for _ in range(rounds):
        for name, run in runners.items():
            b0, t0, c0 = _busy_cpu_seconds(), time.perf_counter(), time.process_time()
            run(steps)
            wall, cpu, b1 = time.perf_counter() - t0, time.process_time() - c0, _busy_cpu_seconds()
            res.wall[name].append(wall / steps)
            res.cpu[name].append(cpu / steps)
            others = None if b0 is None or b1 is None else max(0.0, (b1 - b0 - cpu) / (wall * ncpu))
            res.others[name].append(others)
    return res


def quiet_rounds(rounds: Rounds, threshold: float = QUIET_OTHERS) -> list[int]:
    """Indices of the rounds in which other processes used under ``threshold`` of the CPUs."""
    return [r for r, o in enumerate(rounds.others_per_round()) if o is not None and o < threshold]


def paired(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of ``a[r] / b[r]`` (both measured in round r): robust to slow drifts."""
    return statistics.median(x / y for x, y in zip(a, b))


class Matmul:
    """Square ``size`` matmuls in jax, NumPy (CPU) and PyTorch, as runners for :func:`interleaved`."""

    def __init__(self, size: int, *, dtype: str, device: str, torch=None):
        import jax
        import jax.numpy as jnp
        import numpy as np

        rng = np.random.default_rng(1)
        a_np, b_np = (rng.standard_normal((size, size), np.float32) for _ in range(2))
        a, b = (jax.device_put(m.astype(jnp.dtype(dtype))) for m in (a_np, b_np))
        mm = jax.jit(jnp.matmul)
        reps = 10 if device == "gpu" else 1  # one GPU matmul is too short to time alone
        self.size, self.dtype, self.flops = size, dtype, 2.0 * size**3 * reps
        self.runners: dict[str, Runner] = {}

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

    def best_per_round(self, rounds: Rounds) -> list[float]:
        """FLOP/s of the fastest library in each round."""
        return [max(self.flops / rounds.wall[k][r] for k in self.runners) for r in range(rounds.num_rounds)]

    def rates(self, rounds: Rounds, idx: Sequence[int]) -> dict[str, float]:
        """FLOP/s of each library, median over the rounds ``idx``."""
        return {k.removeprefix("matmul_"): self.flops / statistics.median(rounds.wall[k][r] for r in idx)
                for k in self.runners}

    def best_per_cpu_second(self, rounds: Rounds, idx: Sequence[int]) -> float:
        """FLOP per CPU second of the most efficient library, median over the rounds ``idx``."""
        return max(self.flops / statistics.median(rounds.cpu[k][r] for r in idx) for k in self.runners)
