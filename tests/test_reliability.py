"""Reliability of the command line: kill anywhere, preemption, NaN, full disk, bad input, no pickle.

Every run is the real command, ``python -m duo_jax.main``, in a subprocess, on
the quickstart's ``:runlocal`` variant shrunk further (``SMALL``): the three
phase kinds of the recipe (train, decouple, train from a decoupled parent) and
six checkpoints per training phase. Interruptions come from outside (SIGKILL,
SIGTERM), triggered by what appears in the workdir, never by hooks in the
code. One uninterrupted reference run is shared by every test that needs one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from duo_jax import phases, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "--config=configs/quickstart.py:runlocal"
SMALL = {"phases": "coupled,decouple,finetune", "coupled.steps": 6, "finetune.steps": 6,
         "checkpoint_every": 1, "log_every": 1, "data.num_eval": 32}
PHASES = SMALL["phases"].split(",")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
TIMEOUT = 600
NICE = ["nice", "-n", "10"] if shutil.which("nice") else []  # nice execs the command: same pid

# When a restore reads a truncated array, orbax leaves reads pending in an event loop it has
# closed; Python reports them when they are collected. That is orbax's noise, not a failure.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _args(workdir, overrides=SMALL) -> list[str]:
    return [CONFIG, f"--workdir={workdir}", "--noprogress", *(f"--config.{k}={v}" for k, v in overrides.items())]


def _launch(workdir, log: pathlib.Path, overrides=SMALL, *, nice: bool = False) -> subprocess.Popen:
    """``python -m duo_jax.main`` in the background; ``nice``: leave the CPU to the kill chain first."""
    with open(log, "w") as err:
        return subprocess.Popen([*(NICE if nice else []), sys.executable, "-m", "duo_jax.main",
                                 *_args(workdir, overrides)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)


def _config():
    """The config the command builds from ``CONFIG`` and ``SMALL``."""
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "configs" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    for key, value in SMALL.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _steps(phase_dir: pathlib.Path) -> list[int]:
    """Finalized checkpoint steps (orbax renames ``<step>.orbax-checkpoint-tmp`` to ``<step>`` when done)."""
    return sorted(int(e) for e in os.listdir(phase_dir) if e.isdigit()) if phase_dir.is_dir() else []


def _writing(phase_dir: pathlib.Path) -> list[int]:
    """Steps whose save is in flight (or was cut short)."""
    if not phase_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for e in os.listdir(phase_dir) if (m := re.match(r"(\d+)\.orbax-checkpoint-tmp", e)))


def _interrupt(workdir: pathlib.Path, log: pathlib.Path, when, sig: int, what: str) -> tuple[int, str]:
    """Runs the command until ``when()`` holds, sends ``sig``; returns (exit status, stderr)."""
    proc = _launch(workdir, log)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not when():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.002)
        proc.send_signal(sig)
        rc = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, log.read_text()


def _tree_hash(path: pathlib.Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of ``path`` itself), by relative name."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _biggest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir: pathlib.Path) -> None:
    target = _biggest_array_file(step_dir)
    os.truncate(target, target.stat().st_size // 3)


def _final_variables(workdir: pathlib.Path) -> dict[str, dict]:
    runner = phases.Runner(_config(), str(workdir), progress=False)
    return {name: jax.device_get(runner.final_variables(name)) for name in PHASES}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


class _Background:
    """A command started now and waited for when its result is needed."""

    def __init__(self, workdir: pathlib.Path, overrides=SMALL, *, nice: bool = False):
        self.workdir, self.log = workdir, workdir.parent / f"{workdir.name}.stderr"
        self.proc = _launch(workdir, self.log, overrides, nice=nice)

    def wait(self) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return rc, self.log.read_text()


# ---------------------------------------------------------------------------
# Runs shared by the tests
# ---------------------------------------------------------------------------


class _Runs:
    """The runs the tests share, each started as soon as what it needs exists.

    At once: the reference and the NaN run, beside the kill chain (which the
    chain fixture runs). When the reference is complete: the bad-input cases and
    the full-disk run, which start from copies of its workdir. Runs off the
    chain's path are niced, so that the chain, the longest, is never starved.
    """

    def __init__(self, tmp: pathlib.Path):
        self.tmp = tmp
        self.reference = _Background(tmp / "reference")
        self.nan = _Background(tmp / "nan", dict(SMALL, **{"coupled.optimizer.lr": 1e30}), nice=True)
        self.bad = self.full_disk = None

    def kick(self, wait: bool = False) -> None:
        """Starts the runs that need the reference, if it is complete (``wait``: wait for it)."""
        if self.bad is not None or (not wait and self.reference.proc.poll() is None):
            return
        rc, err = self.reference.wait()
        assert rc == 0, err[-3000:]
        self.bad = _BadInputs(self.reference.workdir, self.tmp / "bad")
        self.full_disk = _FullDisk(self.reference.workdir, self.tmp / "full_disk")

    def close(self) -> None:
        """Stops whatever still runs (tests deselected or failed before waiting for it)."""
        for job in (self.reference, self.nan, self.bad, self.full_disk):
            proc = getattr(job, "proc", None)
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = _Runs(tmp_path_factory.mktemp("runs"))
    yield runs
    runs.close()


@pytest.fixture(scope="module")
def reference(runs) -> pathlib.Path:
    runs.kick(wait=True)
    return runs.reference.workdir


@pytest.fixture(scope="module")
def chain(runs, tmp_path_factory):
    """One workdir, interrupted at every kind of moment, then run to the end.

    1. coupled: SIGKILL while a checkpoint (not the first) is being written;
    2. SIGKILL between phases, when coupled/complete.json appears;
    3. SIGKILL during decoupling, while its result is being written;
    4. SIGTERM during decoupling (outside any training loop);
    5. SIGTERM during fine-tuning;
    6. fine-tuning: SIGKILL between two steps; then its newest checkpoint is truncated;
    7. the same command once more, to the end (falling back past the truncated checkpoint).
    """
    tmp = tmp_path_factory.mktemp("chain")
    w = tmp / "w"
    coupled, decouple, finetune = w / "coupled", w / "decouple", w / "finetune"
    rec: dict[str, dict] = {}

    # 1. If the write finished before the signal landed, try the next one.
    for attempt in range(3):
        runs.kick()
        rc, err = _interrupt(w, tmp / f"1-{attempt}.log", lambda: any(s >= 2 for s in _writing(coupled)),
                             signal.SIGKILL, "a coupled checkpoint write")
        if _writing(coupled):
            break
    rec["write"] = {"rc": rc, "writing": _writing(coupled), "steps": _steps(coupled), "attempts": attempt + 1,
                    "complete": (coupled / "complete.json").exists()}

    # 2.
    runs.kick()
    rc, err = _interrupt(w, tmp / "2.log", lambda: (coupled / "complete.json").exists(), signal.SIGKILL,
                         "the end of the coupled phase")
    rec["between"] = {"rc": rc, "decouple_complete": (decouple / "complete.json").exists()}

    # 3.
    runs.kick()
    rc, err = _interrupt(w, tmp / "3.log", lambda: _writing(decouple), signal.SIGKILL, "the decoupling")
    rec["decouple"] = {"rc": rc, "writing": _writing(decouple), "complete": (decouple / "complete.json").exists()}

    # 4. Its first TensorBoard scalars (a new event file) come after decoupling, before its save.
    runs.kick()
    events = set(os.listdir(w / "tensorboard"))
    rc, err = _interrupt(w, tmp / "4.log", lambda: set(os.listdir(w / "tensorboard")) - events, signal.SIGTERM,
                         "the decoupling")
    rec["decouple_sigterm"] = {"rc": rc, "stderr": err, "complete": (decouple / "complete.json").exists(),
                               "finetune": finetune.exists()}

    # 5.
    runs.kick()
    rc, err = _interrupt(w, tmp / "5.log", lambda: _steps(finetune), signal.SIGTERM, "a fine-tune checkpoint")
    rec["sigterm"] = {"rc": rc, "stderr": err, "steps": _steps(finetune),
                      "complete": (finetune / "complete.json").exists()}

    # 6.
    runs.kick()
    until = min(max(_steps(finetune), default=0) + 1, SMALL["finetune.steps"] - 1)
    rc, err = _interrupt(w, tmp / "6.log", lambda: max(_steps(finetune), default=0) >= until,
                         signal.SIGKILL, "one more fine-tune checkpoint")
    steps = _steps(finetune)
    _truncate(finetune / str(steps[-1]))
    rec["step"] = {"rc": rc, "steps": steps, "truncated": steps[-1], "complete": (finetune / "complete.json").exists()}

    # 7.
    proc = subprocess.run([sys.executable, "-m", "duo_jax.main", *_args(w)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT)
    rec["last"] = {"rc": proc.returncode, "stderr": proc.stderr}
    rec["workdir"] = w
    return rec


# ---------------------------------------------------------------------------
# 1. Kill anywhere, resume exactly
# ---------------------------------------------------------------------------


def test_kill_during_a_checkpoint_write(chain):
    r = chain["write"]
    assert r["rc"] == -signal.SIGKILL
    assert r["writing"], f"every write finished before SIGKILL landed ({r['attempts']} tries)"
    assert all(s > max(r["steps"], default=0) for s in r["writing"]), r  # never listed as a step
    assert not r["complete"]


def test_kill_between_phases(chain):
    r = chain["between"]
    assert r["rc"] == -signal.SIGKILL and not r["decouple_complete"]


def test_kill_during_decoupling(chain):
    r = chain["decouple"]
    assert r["rc"] == -signal.SIGKILL and not r["complete"]


def test_sigterm_during_decoupling_stops_after_it(chain):
    r = chain["decouple_sigterm"]
    lines = _error_lines(r["stderr"])
    assert r["rc"] == 3, r["stderr"][-3000:]
    assert lines[-1] == ("SIGTERM received; stopped after phase 'decouple' finished, before 'finetune'; "
                         "rerun the same command to resume")
    assert r["complete"] and not r["finetune"]


def test_sigterm_flags_nest_and_keep_a_signal_that_came_between_loops():
    before = signal.getsignal(signal.SIGTERM)
    with train.SigtermFlag() as outer:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert outer.raised  # the process lives on
        with train.SigtermFlag() as inner:
            assert inner.raised  # a loop started later sees it
    with train.SigtermFlag() as outer:
        with train.SigtermFlag():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        assert outer.raised  # handed back to the outer flag
    assert signal.getsignal(signal.SIGTERM) == before  # the handler from before is back


def test_sigterm_saves_at_the_next_step_and_exits_3(chain):
    r = chain["sigterm"]
    lines = _error_lines(r["stderr"])
    assert r["rc"] == 3, r["stderr"][-3000:]
    saved = re.fullmatch(r"phase 'finetune': SIGTERM received, saved step (\d+); rerun the same command to resume",
                         lines[-1])
    assert saved, lines[-1]
    assert int(saved.group(1)) in r["steps"] and not r["complete"]


def test_kill_between_steps_then_corrupted_newest_checkpoint_falls_back(chain):
    r = chain["step"]
    assert r["rc"] == -signal.SIGKILL and not r["complete"] and len(r["steps"]) >= 2
    # the last run warned about the truncated step and resumed from the one before it
    stderr = chain["last"]["stderr"]
    assert any(f"step {r['truncated']}" in line and "unreadable" in line for line in stderr.splitlines()), stderr[-3000:]
    assert f"from step {r['steps'][-2]} instead" in stderr


_UNPICKLED: list = []  # what an audit hook saw unpickled while _WATCH[0] was set
_WATCH = [False]


def _audit(event: str, args: tuple) -> None:
    if _WATCH[0] and event == "pickle.find_class":  # every unpickling of a class or function passes here
        _UNPICKLED.append(args)


@pytest.fixture(scope="module")
def restored(chain, reference):
    """The final variables of every phase of both runs, read with unpickling forbidden."""
    assert chain["last"]["rc"] == 0, chain["last"]["stderr"][-3000:]
    sys.addaudithook(_audit)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    with pytest.MonkeyPatch.context() as patch:
        for module in (pickle, sys.modules["_pickle"]):
            for attr in ("load", "loads", "Unpickler"):
                patch.setattr(module, attr, refuse)
        _WATCH[0] = True
        try:
            return _final_variables(chain["workdir"]), _final_variables(reference), list(_UNPICKLED)
        finally:
            _WATCH[0] = False


def test_interrupted_run_ends_bitwise_equal_to_the_uninterrupted_one(chain, reference, restored):
    got, want, _ = restored
    for name in PHASES:
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got[name]),
                                jax.tree_util.tree_leaves(want[name]), strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y), (name, jax.tree_util.keystr(path))
    a = json.loads((chain["workdir"] / "results.json").read_text())
    b = json.loads((reference / "results.json").read_text())
    assert list(a) == list(b) == PHASES
    for name in PHASES:
        drop = {"wall_time"}
        assert {k: v for k, v in a[name].items() if k not in drop} == {k: v for k, v in b[name].items() if k not in drop}


# ---------------------------------------------------------------------------
# 3. NaN / Inf guard
# ---------------------------------------------------------------------------


def test_nonfinite_loss_stops_naming_phase_and_step_and_keeps_last_good_checkpoint(runs):
    rc, err = runs.nan.wait()
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    m = re.fullmatch(r"error: phase 'coupled': the training loss became (nan|inf|-inf) by step (\d+); "
                     r"the last good checkpoint, step (\d+), is kept; lower the learning rate .*new --workdir",
                     lines[0])
    assert m, lines[0]
    bad, kept = int(m.group(2)), int(m.group(3))
    assert 0 < kept < bad
    workdir = runs.nan.workdir
    assert _steps(workdir / "coupled")[-1] == kept and not _writing(workdir / "coupled")
    assert not (workdir / "coupled" / "complete.json").exists()
    config = _config()
    config.coupled.optimizer.lr = 1e30
    variables = phases.Runner(config, str(workdir), progress=False).final_variables("coupled")
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(jax.device_get(variables)))


# ---------------------------------------------------------------------------
# Full disk during a checkpoint: a real (small, private) file system, filled up
# ---------------------------------------------------------------------------

_FULL_DISK = r'''
import hashlib, json, os, pathlib, shutil, subprocess, sys
mnt, reference, cmd = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), json.loads(sys.argv[3])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
w = mnt / "w"
w.mkdir()
shutil.copy(reference / "config.json", w)
shutil.copytree(reference / "coupled", w / "coupled")
(w / "coupled" / "complete.json").unlink()
steps = sorted(int(p.name) for p in (w / "coupled").iterdir() if p.name.isdigit())
shutil.rmtree(w / "coupled" / str(steps[-1]))  # resume from the step before the last
st = os.statvfs(mnt)
with open(mnt / "filler", "wb") as f:  # leave 48 KiB: enough for small files, not for a checkpoint
    f.write(b"\0" * (st.f_bavail * st.f_frsize - 48 * 1024))
def tree():
    return {str(p.relative_to(w)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(w.rglob("*")) if p.is_file()}
before = tree()
proc = subprocess.run(cmd + [f"--workdir={w}"], capture_output=True, text=True)
print(json.dumps({"rc": proc.returncode, "stderr": proc.stderr, "before": before, "after": tree(),
                  "kept": steps[-2]}))
'''


class _FullDisk:
    """The command, resuming a copy of the reference's unfinished coupled phase on a full tmpfs."""

    def __init__(self, reference: pathlib.Path, tmp: pathlib.Path):
        tmp.mkdir()
        self.skip = shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", str(tmp)],
            capture_output=True).returncode != 0
        if self.skip:
            return
        (tmp / "mnt").mkdir()
        cmd = [sys.executable, "-m", "duo_jax.main", *_args("W")[:1], *_args("W")[2:]]
        self.proc = subprocess.Popen([*NICE, "unshare", "-m", "--propagation", "private", sys.executable, "-c",
                                      _FULL_DISK, str(tmp / "mnt"), str(reference), json.dumps(cmd)], cwd=ROOT,
                                     env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, out, err


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(runs):
    runs.kick(wait=True)
    if runs.full_disk.skip:
        pytest.skip("needs a private mount namespace (root, unshare) to make a small file system to fill")
    rc, out, err = runs.full_disk.result()
    assert rc == 0, err[-3000:]
    r = json.loads(out.strip().splitlines()[-1])
    lines = _error_lines(r["stderr"])
    assert r["rc"] == 2 and len(lines) == 1 and "Traceback" not in r["stderr"], r["stderr"][-3000:]
    kept = r["kept"]
    assert re.fullmatch(rf"error: cannot write checkpoint step {kept + 1} in \S+/coupled: No space left on device "
                        rf"\(needs about [\d.]+ MiB, [\d.]+ MiB free; the last complete one, step {kept}, is kept\); "
                        "free disk space, then rerun the same command to resume", lines[0]), lines[0]
    # nothing that was there changed: the previous checkpoint is intact, byte for byte
    assert {k: v for k, v in r["after"].items() if k in r["before"]} == r["before"]
    assert any(k.startswith(f"coupled/{kept}/") for k in r["before"])
    assert not any(k.startswith(f"coupled/{kept + 1}") for k in r["after"])  # not started


# ---------------------------------------------------------------------------
# 4. Bad input: one line, exit 2, no traceback, nothing in the workdir touched
# ---------------------------------------------------------------------------

# Runs the cases in children forked from one process that has imported duo_jax (and jax,
# without starting a backend): each child is `python -m duo_jax.main ARGS` minus the imports.
_FORK_SERVER = r'''
import json, os, sys, traceback
cases = json.load(open(sys.argv[1]))
import duo_jax.main, duo_jax.phases, tensorflow_datasets  # before any fork; no jax backend yet
results, running = {}, {}
def reap():
    pid, status, _ = os.wait4(-1, 0)
    results[running.pop(pid)] = os.waitstatus_to_exitcode(status)
for case in cases:
    while len(running) >= 2:
        reap()
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            os.environ.update(case["env"])
            sys.argv = ["duo_jax.main", *case["args"]]
            duo_jax.main.run()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    running[pid] = case["name"]
while running:
    reap()
print(json.dumps(results))
'''


def _copy_reference(reference, w, *, coupled_from="coupled", keep=("coupled",), truncate=(), incomplete=False):
    """A workdir holding the reference run's config and some of its phases."""
    w.mkdir(parents=True)
    shutil.copy(reference / "config.json", w)
    shutil.copytree(reference / coupled_from, w / "coupled")
    for name in keep[1:]:
        shutil.copytree(reference / name, w / name)
    steps = _steps(w / "coupled")
    if incomplete:
        (w / "coupled" / "complete.json").unlink()
    for i in truncate:
        _truncate(w / "coupled" / str(steps[i]))


# name -> (extra args, setup of the workdir, what the one line must say)
BAD_INPUTS = {
    "unknown_model": (["--config.model.name=vgg8"], None, ["unknown model 'vgg8'", "known: alexnet, resnet18, vgg7"]),
    "unknown_mode": (["--config.finetune.mode=ternary"], None,
                     ["phase 'finetune': unknown mode 'ternary'", "config.finetune.mode", "coupled, decoupled"]),
    "unknown_dataset": (["--config.data.name=mnist6k"], None, ["unknown bundled dataset 'mnist6k'", "known: digits"]),
    "unknown_data_source": (["--config.data.source=web"], None, ["unknown data source 'web'", "bundled, synthetic, tfds"]),
    "unknown_quantizer": (["--config.model.options.surrogate=sine"], None, ["unknown quantizer 'sine'", "approx_sign"]),
    "unknown_optimizer": (["--config.finetune.optimizer.name=sgdd"], None,
                          ["phase 'finetune': unknown optimizer 'sgdd'", "known: sgd, adam"]),
    "unknown_schedule": (["--config.coupled.optimizer.schedule=linear"], None, ["unknown schedule 'linear'", "cosine"]),
    "override_typo": (["--config.modle.name=vgg8"], None, ["--config.modle.name", 'Did you mean "model"']),
    "override_unknown_key": (["--config.model.options.surogate=tanh"], None,
                             ["--config.model.options.surogate", "no key 'surogate'", 'Did you mean "surrogate"',
                              "check the spelling"]),
    "override_wrong_type": (["--config.coupled.epochs=abc"], None, ["could not convert", "give a value of the type"]),
    "missing_config_file": (["--config=configs/nope.py"], None, ["configs/nope.py", "check the --config path"]),
    "batch_not_divisible_by_devices": ([], None, ["batch_size=16 is not divisible by the 3 devices", "multiple of 3"]),
    "width_gives_zero_channels": (["--config.model.options.width_mult=0.01"], None,
                                  ["gives zero channels", "use a larger width_mult"]),
    "images_too_small_for_the_model": (["--config.model.name=alexnet"], None,
                                       ["cannot take the 28x28x1 images", "64x64", "data.image_size"]),
    "empty_train_split": (["--config.data.num_train=0"], None, ["train split has no examples", "data.num_train"]),
    "empty_eval_split": (["--config.data.num_eval=0"], None, ["eval split has no examples", "data.num_train/num_eval"]),
    "zero_epochs": (["--config.coupled.steps=0", "--config.coupled.epochs=0"], None,
                    ["phase 'coupled': epochs must be positive", "set epochs (or steps)"]),
    "negative_steps": (["--config.finetune.steps=-3"], None, ["phase 'finetune'", "positive number of steps, got -3"]),
    "negative_learning_rate": (["--config.coupled.optimizer.lr=-1"], None, ["learning rate must be positive"]),
    "zero_learning_rate": (["--config.finetune.optimizer.lr=0"], None,
                           ["phase 'finetune': learning rate must be positive, got lr=0.0"]),
    "zero_checkpoint_every": (["--config.checkpoint_every=0"], None, ["config.checkpoint_every must be a positive"]),
    "tfds_data_dir_missing": (["--config.data.source=tfds", "--config.data.name=mnist", "--config.data.data_dir={case}/no"],
                              None, ["data_dir", "does not exist", "tfds build mnist --file_format=array_record"]),
    "tfds_not_prepared": (["--config.data.source=tfds", "--config.data.name=mnist", "--config.data.data_dir={case}/tfds"],
                          "tfds", ["'mnist' is not prepared in", "tfds build mnist --file_format=array_record"]),
    "unwritable_workdir": ([], "file", ["cannot write to workdir", "Not a directory", "choose another --workdir"]),
    "workdir_of_a_different_config": (["--config.coupled.optimizer.lr=0.5"], "copy",
                                      ["holds a run of a different config", "coupled.optimizer.lr", "another --workdir",
                                       "start afresh"]),
    "decouple_a_phase_that_is_not_coupled": (["--config.phases=baseline,decouple", "--config.decouple.parent=baseline"],
                                             None, ["decouples 'baseline', which is not a coupled-mode phase"]),
    "decouple_from_a_checkpoint_that_is_not_coupled": ([], "finetune-as-coupled",
                                                       ["phase 'decouple' cannot read the coupled model it decouples",
                                                        "does not fit the state being restored", "was the config changed",
                                                        "new --workdir"]),
    "final_checkpoint_of_a_phase_unreadable": ([], "truncated-final",
                                               ["no readable checkpoint in", "coupled", "delete that directory"]),
    "every_checkpoint_of_a_phase_unreadable": ([], "truncated-all",
                                               ["no readable checkpoint in", "coupled", "delete that directory"]),
}


class _BadInputs:
    """Every case of ``BAD_INPUTS``, run by the fork server in the background."""

    def __init__(self, reference: pathlib.Path, tmp: pathlib.Path):
        tmp.mkdir()
        self.tmp, cases, self.workdirs = tmp, [], {}
        for name, (extra, setup, _) in BAD_INPUTS.items():
            case = tmp / name
            case.mkdir()
            w = case / "w"
            if setup == "file":
                (case / "file").write_text("a file, not a directory")
                w = case / "file" / "w"
            elif setup == "tfds":
                (case / "tfds").mkdir()
            elif setup == "copy":
                _copy_reference(reference, w, keep=PHASES)
                shutil.copy(reference / "results.json", w)
            elif setup == "finetune-as-coupled":
                _copy_reference(reference, w, coupled_from="finetune")
            elif setup == "truncated-final":
                _copy_reference(reference, w, truncate=(-1,))
            elif setup == "truncated-all":
                _copy_reference(reference, w, truncate=(0, 1), incomplete=True)
            env = {}
            if name == "batch_not_divisible_by_devices":
                env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=3"
            args = [a.format(case=case) for a in _args(w)] + [a.format(case=case) for a in extra]
            cases.append({"name": name, "args": args, "env": env, "stderr": str(tmp / f"{name}.stderr")})
            self.workdirs[name] = (w, _tree_hash(w) if w.exists() else None, _tree_hash(w.parent))
        (tmp / "cases.json").write_text(json.dumps(cases))
        self.proc = subprocess.Popen([*NICE, sys.executable, "-c", _FORK_SERVER, str(tmp / "cases.json")], cwd=ROOT,
                                     env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self) -> dict[str, tuple]:
        out, err = self.proc.communicate(timeout=TIMEOUT)
        assert self.proc.returncode == 0, err[-3000:]
        codes = json.loads(out.strip().splitlines()[-1])
        return {name: (codes[name], (self.tmp / f"{name}.stderr").read_text(), *self.workdirs[name])
                for name in BAD_INPUTS}


@pytest.fixture(scope="module")
def bad_inputs(runs) -> dict[str, tuple]:
    runs.kick(wait=True)
    return runs.bad.result()


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_the_workdir_alone(bad_inputs, name):
    rc, stderr, workdir, before, parent_before = bad_inputs[name]
    lines = _error_lines(stderr)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr[-3000:]
    for part in BAD_INPUTS[name][2]:
        assert part in lines[0], (part, lines[0])
    if before is None:  # a new workdir: not even created
        assert not workdir.exists()
        assert _tree_hash(workdir.parent) == parent_before
    else:  # an existing one: every file as it was, none added or removed
        assert _tree_hash(workdir) == before


# ---------------------------------------------------------------------------
# 5. No code execution from data: nothing is pickled, nothing is unpickled
# ---------------------------------------------------------------------------


def test_checkpoints_hold_no_pickle_and_restore_without_unpickling(reference, restored):
    files = [p for p in reference.rglob("*") if p.is_file()]
    assert any(p.parent.name == "d" for p in files)  # the array files are there
    for p in files:
        head = p.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), p
        assert p.suffix not in (".pkl", ".pickle", ".npy", ".npz"), p
    _, variables, unpickled = restored  # read with pickle.load(s)/Unpickler made to raise
    assert unpickled == [] and set(variables) == set(PHASES)


def test_no_module_uses_pickle():
    for path in sorted((ROOT / "duo_jax").rglob("*.py")):
        source = path.read_text()
        for word in ("import pickle", "cPickle", "cloudpickle", "import dill", "allow_pickle=True", "joblib"):
            assert word not in source, (path.name, word)
