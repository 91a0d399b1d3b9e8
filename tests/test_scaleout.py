"""Scale-out: 8 fake devices vs 1, two processes vs one, checkpoints across device counts, launchers.

Every run is the real command, ``python -m duo_jax.main`` on the quickstart's
``:runlocal`` variant, in a subprocess whose device count is set before jax
starts (``--xla_force_host_platform_device_count``). The runs of the module
start together (the first test that needs one starts them all), each with a
hard time limit after which its process group is killed.

The runs train two phases for a few steps each: ``coupled``, turned into a
float-ReLU model trained with SGD (the strict comparison: parameters within a
relative 1e-5), and ``baseline``, the quickstart's binary-activation network
with Adam (compared on the loss).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from duo_jax import launch_env, phases
from duo_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # per run; a run on an unloaded 2-core machine takes well under a minute
FP, BINARY = "coupled", "baseline"  # phase names in the quickstart config; see TRAIN_ARGS
RTOL = 1e-5

TRAIN_ARGS = [
    "--config=configs/quickstart.py:runlocal", "--noprogress",
    "--config.log_every=1", "--config.checkpoint_every=2", "--config.keep_checkpoints=4",
    f"--config.phases={FP},{BINARY}",
    f"--config.{FP}.mode=fp", f"--config.{FP}.label=float reference", f"--config.{FP}.steps=4",
    f"--config.{FP}.optimizer.name=sgd", f"--config.{FP}.optimizer.lr=0.02",
    f"--config.{FP}.optimizer.weight_decay=0.0001",
    f"--config.{BINARY}.steps=3",
]
# The 2-process run: the quickstart's binary network only.
MULTI_ARGS = ["--config=configs/quickstart.py:runlocal", "--noprogress", "--config.log_every=1",
              f"--config.phases={BINARY}", f"--config.{BINARY}.steps=3"]


# ---------------------------------------------------------------------------
# Subprocess runs with a hard time limit
# ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """``python -m duo_jax.main ARGS`` with ``devices`` fake CPU devices, output to a log file."""

    def __init__(self, name: str, args: list[str], *, devices: int, logdir: pathlib.Path,
                 command: tuple[str, ...] = (sys.executable, "-m", "duo_jax.main"), **env):
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
        self.env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
                    "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]), **env}
        self.name, self.command, self.log = name, [*command, *args], logdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.deadline = 0.0

    def start(self) -> "Run":
        with open(self.log, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.command, cwd=ROOT, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.deadline = time.monotonic() + TIMEOUT_S
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the run and nothing else
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self) -> int:
        """The exit status; kills the run and fails the test past its deadline."""
        try:
            return self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not finish in {TIMEOUT_S} s; killed. Output:\n{self.output()[-3000:]}")

    def check(self) -> str:
        code = self.wait()
        assert code == 0, f"{self.name} exited {code}:\n{self.output()[-4000:]}"
        return self.output()


def wait_all(runs: list[Run]) -> None:
    """Waits for runs that depend on each other: one failing kills the others."""
    while any(r.proc.poll() is None for r in runs):
        failed = [r for r in runs if r.proc.poll() not in (None, 0)]
        late = time.monotonic() > max(r.deadline for r in runs)
        if failed or late:
            for r in runs:
                r.kill()
            culprit = failed[0] if failed else runs[0]
            pytest.fail(f"{culprit.name} {'failed' if failed else 'timed out'}; all killed. "
                        f"Output:\n{culprit.output()[-4000:]}")
        time.sleep(0.1)
    for r in runs:
        r.check()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts every run of the module at once; kills whatever is left at the end."""
    base = tmp_path_factory.mktemp("scaleout")
    port = _free_port()
    cache = str(base / "jax_cache_1dev")  # shared by the two 1-device runs
    one_dev_cache = dict(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                         JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    # YNN dot fusions off for the device-count comparisons (see test_8_devices_train_like_1).
    r = {
        "d1": Run("d1", [*TRAIN_ARGS, f"--workdir={base / 'd1'}"], devices=1, logdir=base, DUO_JAX_YNN="0",
                  **one_dev_cache),
        "d8": Run("d8", [*TRAIN_ARGS, f"--workdir={base / 'd8'}"], devices=8, logdir=base, DUO_JAX_YNN="0"),
        "p1x4": Run("p1x4", [*MULTI_ARGS, f"--workdir={base / 'p1x4'}"], devices=4, logdir=base),
        "bad_batch": Run("bad_batch", [*MULTI_ARGS, "--config.batch_size=12", f"--workdir={base / 'bad'}"],
                         devices=8, logdir=base),
        "bad_id": Run("bad_id", [*MULTI_ARGS, f"--workdir={base / 'bad_id'}", "--coordinator_address=127.0.0.1:1",
                                 "--num_processes=2", "--process_id=2"], devices=1, logdir=base),
    }
    # Two processes x 2 devices: process 0 set up by the environment, process 1 by the
    # multi-node launcher (which passes the explicit flags).
    multi = [*MULTI_ARGS, f"--workdir={base / 'p2x2'}"]
    r["p2x2_0"] = Run("p2x2_0", multi, devices=2, logdir=base, DUO_JAX_COORDINATOR=f"127.0.0.1:{port}",
                      DUO_JAX_NUM_PROCESSES="2", DUO_JAX_PROCESS_ID="0")
    r["p2x2_1"] = Run("p2x2_1", multi, devices=2, logdir=base, command=("bash", str(ROOT / "launch" / "multi_node.sh")),
                      PYTHON=sys.executable, COORDINATOR=f"127.0.0.1:{port}", NUM_PROCESSES="2", PROCESS_ID="1")
    # Resumes d8's float phase on one device; started by the test once d8 is done.
    r["resume"] = Run("resume", [*TRAIN_ARGS, f"--workdir={base / 'resume'}"], devices=1, logdir=base,
                      DUO_JAX_YNN="0", **one_dev_cache)
    for name, run in r.items():
        if name != "resume":
            run.start()
    yield base, r
    for run in r.values():
        run.kill()


# ---------------------------------------------------------------------------
# What a run left on disk
# ---------------------------------------------------------------------------


def results(workdir: pathlib.Path) -> dict:
    return json.loads((workdir / "results.json").read_text())


def losses(res: dict, phase: str) -> np.ndarray:
    return np.array([h["loss"] for h in res[phase]["train_history"]])


@functools.lru_cache(maxsize=None)
def final_variables(workdir: pathlib.Path, phase: str) -> dict:
    """The phase's final variables, restored here (one device) through the pipeline's own restore."""
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    return jax.device_get(phases.Runner(config, str(workdir), progress=False).final_variables(phase))


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest over leaves of ``max|a - b| / max|b|``."""
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                     / max(float(np.max(np.abs(np.asarray(y, np.float64)))), 1e-30)) for x, y in pairs)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.abs(b)))


def mesh_sizes(step_dir: pathlib.Path) -> set[int]:
    """Device counts of the meshes the arrays of a checkpoint step were saved from (orbax's record)."""
    record = json.loads((step_dir / "state" / "_sharding").read_text())
    return {int(np.prod(json.loads(v)["shape"])) for v in record.values()}


def steps_on_disk(phase_dir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in phase_dir.iterdir() if p.name.isdigit())


def error_lines(run: Run) -> list[str]:
    code = run.wait()
    out = run.output()
    assert code == 2, f"{run.name} exited {code}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    return [line for line in out.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_batch_not_divisible_by_the_devices_is_one_line_error(runs):
    lines = error_lines(runs[1]["bad_batch"])
    assert len(lines) == 1, lines
    assert "batch_size=12 is not divisible by the 8 devices" in lines[0] and "--config.batch_size=8" in lines[0]


def test_bad_process_id_is_one_line_error(runs):
    lines = error_lines(runs[1]["bad_id"])
    assert lines == ["error: process id 2 is not in [0, 2); number the processes 0 to 1"]


def test_distributed_settings_from_flags_and_environment():
    env = {"DUO_JAX_COORDINATOR": "10.0.0.2:1234", "DUO_JAX_NUM_PROCESSES": "4", "DUO_JAX_PROCESS_ID": "3"}
    assert launch_env.resolve(env={}) is None
    assert launch_env.resolve(env=env) == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4,
                                           "process_id": 3}
    # A flag wins over its environment variable, setting by setting.
    assert launch_env.resolve("h:1", None, 0, env=env) == {"coordinator_address": "h:1", "num_processes": 4,
                                                         "process_id": 0}
    assert launch_env.resolve(env={"DUO_JAX_DISTRIBUTED": "auto"}) == {}
    assert launch_env.resolve("h:1", 1, 0, env={}) is None  # one process: nothing to start
    for args, env_, message in [
        (("h:1", 2, None), {}, "need all three"),
        ((None, 2, 0), {}, "need all three"),
        (("nohost", 2, 0), {}, "is not HOST:PORT"),
        (("h:1", 0, 0), {}, "at least 1"),
        ((None, None, None), {**env, "DUO_JAX_PROCESS_ID": "x"}, "must be an integer"),
        ((None, None, None), {"DUO_JAX_DISTRIBUTED": "yes"}, "set it to 'auto'"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            launch_env.resolve(*args, env=env_)


# ---------------------------------------------------------------------------
# 8 devices vs 1
# ---------------------------------------------------------------------------


def test_8_devices_train_like_1(runs):
    """Same parameters and metrics on 8 fake devices as on 1.

    The batch is split 8 ways and BatchNorm's statistics and the gradient are
    reduced over the global batch, so only the order of floating-point sums
    differs (measured: parameters within 4e-6 after 4 steps). Two things are
    kept out of the comparison on purpose:

    * XLA's YNN dot fusions (on by default on CPU) round differently at
      different per-device shapes; measured, they moved the float model's
      parameters by 1e-3 after 3 steps on 1 device and not on 8 (batch of 2
      per device), so these runs turn them off (``DUO_JAX_YNN=0``).
    * The binary network trains with Adam, whose first update is about
      ``lr * sign(gradient)``: a gradient entry that rounding moves across
      zero gets the opposite update, and a rounding difference at a binary
      threshold flips an activation. So for it the loss is compared (within
      1e-5 over its 3 steps), not the parameters.
    """
    base, r = runs
    wait_all([r["d1"], r["d8"]])
    assert mesh_sizes(base / "d1" / FP / "4") == {1} and mesh_sizes(base / "d8" / FP / "4") == {8}
    one, eight = results(base / "d1"), results(base / "d8")

    np.testing.assert_allclose(losses(eight, FP), losses(one, FP), rtol=RTOL)
    np.testing.assert_allclose(eight[FP]["loss"], one[FP]["loss"], rtol=RTOL)
    assert (eight[FP]["top1"], eight[FP]["top5"]) == (one[FP]["top1"], one[FP]["top5"])
    diff = max_rel_diff(final_variables(base / "d8", FP), final_variables(base / "d1", FP))
    print(f"\nfloat model, 8 vs 1 devices: parameters and BN statistics within a relative {diff:.1e}")
    assert diff <= RTOL

    assert len(losses(one, BINARY)) == 3
    np.testing.assert_allclose(losses(eight, BINARY), losses(one, BINARY), rtol=RTOL)
    np.testing.assert_allclose(eight[BINARY]["loss"], one[BINARY]["loss"], rtol=RTOL)
    print(f"training losses, 8 vs 1 devices: float within {_rel(losses(eight, FP), losses(one, FP)):.1e}, "
          f"binary within {_rel(losses(eight, BINARY), losses(one, BINARY)):.1e}")


# ---------------------------------------------------------------------------
# Saved on 8 devices, resumed on 1
# ---------------------------------------------------------------------------


def test_saved_on_8_devices_resumes_on_1_like_never_stopping(runs):
    """The 8-device run's workdir as a kill after step 2 of the float phase leaves it, resumed on 1 device.

    The resumed run restores step 2 (saved from the 8-device mesh) onto one
    device, trains steps 3 and 4 there and must end where the 8-device run
    that never stopped ended.
    """
    base, r = runs
    r["d8"].check()
    src, dst = base / "d8", base / "resume"
    shutil.copytree(src, dst)
    for step in steps_on_disk(dst / FP):
        if step > 2:
            shutil.rmtree(dst / FP / str(step))
    for name in (f"{FP}/complete.json", "results.json", "curves.png"):
        (dst / name).unlink()
    assert mesh_sizes(dst / FP / "2") == {8}
    r["resume"].start().check()

    assert "unreadable" not in r["resume"].output()
    assert mesh_sizes(dst / FP / "4") == {1}  # steps 3 and 4 ran on one device
    never, resumed = results(src), results(dst)
    # Steps 1-2 come from the checkpoint's record, bit for bit; 3-4 were recomputed.
    assert list(losses(resumed, FP)[:2]) == list(losses(never, FP)[:2])
    np.testing.assert_allclose(losses(resumed, FP), losses(never, FP), rtol=RTOL)
    np.testing.assert_allclose(resumed[FP]["loss"], never[FP]["loss"], rtol=RTOL)
    assert resumed[BINARY] == never[BINARY]  # complete: skipped, its summary kept
    diff = max_rel_diff(final_variables(dst, FP), final_variables(src, FP))
    print(f"\nsaved on 8, resumed on 1 vs never stopped on 8: parameters within a relative {diff:.1e}")
    assert diff <= RTOL


# ---------------------------------------------------------------------------
# Two processes x 2 devices vs one process x 4 devices
# ---------------------------------------------------------------------------


def test_2_processes_train_like_1_process(runs):
    """``jax.distributed`` over two local processes (gloo) gives the 4-device single-process result.

    Same global batch, same per-device shapes; the cross-process sums go
    through gloo in another order than the in-process all-reduce, so the
    comparison allows float rounding (measured: losses within 2e-7,
    parameters within 2e-6).
    """
    base, r = runs
    pair = [r["p2x2_0"], r["p2x2_1"]]
    wait_all(pair)
    r["p1x4"].check()
    multi, single = base / "p2x2", base / "p1x4"
    last = multi / BINARY / "3"
    assert mesh_sizes(last) == {4} and mesh_sizes(single / BINARY / "3") == {4}
    # Orbax wrote the checkpoint collectively: each process its own part.
    assert {p.name for p in (last / "state").glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}
    # The summary table is printed by process 0 only.
    assert "baseline BNN (binary)" in pair[0].output() and "baseline BNN" not in pair[1].output()

    a, b = results(multi), results(single)
    np.testing.assert_allclose(losses(a, BINARY), losses(b, BINARY), rtol=RTOL)
    np.testing.assert_allclose(a[BINARY]["loss"], b[BINARY]["loss"], rtol=RTOL)
    assert (a[BINARY]["top1"], a[BINARY]["top5"]) == (b[BINARY]["top1"], b[BINARY]["top5"])
    diff = max_rel_diff(final_variables(multi, BINARY), final_variables(single, BINARY))
    print(f"\n2 processes x 2 devices vs 1 x 4: parameters within a relative {diff:.1e}, "
          f"training losses within {_rel(losses(a, BINARY), losses(b, BINARY)):.1e}")
    assert diff <= RTOL


def test_sigterm_to_one_process_stops_all_at_the_same_step_and_the_rerun_finishes(tmp_path):
    """A preemption notice that reaches one process only (processes agree at sync points).

    Without the agreement the signalled process waits in the collective save
    while the other waits for it in its next training step: a hang.
    """
    steps = 120
    args = ["--config=configs/quickstart.py:runlocal", "--noprogress", f"--config.phases={BINARY}",
            f"--config.{BINARY}.steps={steps}", "--config.log_every=10", "--config.checkpoint_every=5",
            f"--workdir={tmp_path / 'w'}"]

    def pair(name):
        env = dict(DUO_JAX_COORDINATOR=f"127.0.0.1:{_free_port()}", DUO_JAX_NUM_PROCESSES="2")
        return [Run(f"{name}_{i}", args, devices=2, logdir=tmp_path, DUO_JAX_PROCESS_ID=str(i), **env).start()
                for i in (0, 1)]

    first = pair("stop")
    phase_dir = tmp_path / "w" / BINARY
    while not (phase_dir / "5").exists():  # the first periodic checkpoint is complete
        assert all(r.proc.poll() is None for r in first), first[0].output()[-3000:] + first[1].output()[-3000:]
        assert time.monotonic() < first[0].deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(first[1].proc.pid, signal.SIGTERM)
    for r in first:
        assert r.wait() == 3, f"{r.name}:\n{r.output()[-3000:]}"
    # The stop is at a log step, a periodic save or an evaluation (every 12 steps), whichever comes
    # first after the signal; between evaluations the message is "stopped ... at saved step N".
    stopped = {int(m) for r in first for m in re.findall(r"SIGTERM received.*saved step (\d+)", r.output())}
    assert len(stopped) == 1, stopped  # both processes name the same step
    (step,) = stopped
    assert 5 <= step < steps and steps_on_disk(phase_dir)[-1] == step
    assert {p.name for p in (phase_dir / str(step) / "state").glob("ocdbt.process_*")} == {
        "ocdbt.process_0", "ocdbt.process_1"}

    second = pair("rerun")
    wait_all(second)
    res = results(tmp_path / "w")[BINARY]
    assert res["steps"] == steps and res["train_history"][-1]["step"] == steps
    logged = [h["step"] for h in res["train_history"]]
    assert logged == sorted(set(logged)) and step in logged  # resumed after the saved step, nothing repeated


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

LAUNCH = ROOT / "launch"


def test_launch_scripts_pass_bash_n():
    scripts = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
    assert {p.name for p in scripts} >= {"tpu_vm.sh", "multi_gpu.sh", "slurm.sbatch", "multi_node.sh"}
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
        assert "-m duo_jax.main" in script.read_text(), script.name


def test_colab_notebook_installs_and_runs_the_quickstart():
    nb = json.loads((LAUNCH / "quickstart_colab.ipynb").read_text())
    assert nb["nbformat"] == 4 and isinstance(nb["cells"], list)
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    for c in nb["cells"]:
        assert c["cell_type"] in ("code", "markdown") and isinstance(c["source"], list)
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and "execution_count" in c
    install = next(i for i, c in enumerate(code) if re.search(r"pip install (-q )?-e", c))
    run = next(i for i, c in enumerate(code) if re.search(r"^!python -m duo_jax\.main\b", c, re.M))
    assert install < run
    assert "--config=configs/quickstart.py" in code[run] and "--workdir=runs/quickstart" in code[run]
