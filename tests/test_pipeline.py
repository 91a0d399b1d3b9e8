"""Every phase end to end at tiny size: bundled data, tfds mock data, resume after a kill."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from duo_jax import checkpointing, phases
from duo_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg="runlocal"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def check_run(workdir, results, names):
    assert list(results) == names
    on_disk = json.load(open(os.path.join(workdir, "results.json")))
    assert list(on_disk) == names
    for name in names:
        assert os.path.exists(os.path.join(workdir, name, "complete.json"))
        assert checkpointing.PhaseCheckpoints(os.path.join(workdir, name), create=False).latest_step() is not None
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 10_000
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert any(e.startswith("events.out.tfevents") for e in events)
    for r in results.values():
        assert 0.0 <= r["top1"] <= r["top5"] <= 1.0
    if "decouple" in results:
        d = results["decouple"]
        assert d["top1"] == d["coupled_top1"] == results["coupled"]["top1"]
        assert d["max_rel_logit_diff"] <= 1e-5


def test_quickstart_runlocal_all_phases(tmp_path):
    config = load_config("quickstart")
    workdir = str(tmp_path / "qs")
    results = phases.run(config, workdir, progress=False)
    check_run(workdir, results, ["coupled", "decouple", "finetune", "baseline"])
    assert results["finetune"]["parent"] == "decouple"
    # A rerun skips every complete phase and returns the same results.
    again = phases.run(config, workdir, progress=False)
    assert again == json.loads(json.dumps(results))


@pytest.mark.parametrize("config_name,dataset", [
    ("vgg7_cifar10", "cifar10"),
    ("resnet18_imagenet", "imagenet2012"),
    ("alexnet_imagenet", "imagenet2012"),
])
def test_tfds_configs_runlocal_under_mock_data(tmp_path, config_name, dataset):
    config = load_config(config_name)
    assert config.data.name == dataset
    workdir = str(tmp_path / config_name)
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        results = phases.run(config, workdir, progress=False)
    check_run(workdir, results, config.phases.split(","))


def test_a_different_config_in_the_same_workdir_is_refused(tmp_path):
    config = load_config("quickstart")
    config.phases = "baseline"
    config.baseline.steps = 2
    workdir = str(tmp_path / "w")
    phases.run(config, workdir, progress=False)
    before = sorted(os.listdir(workdir))
    config.baseline.optimizer.lr = 0.5
    with pytest.raises(UserError, match="different config.*baseline.optimizer.lr"):
        phases.run(config, workdir, progress=False)
    assert sorted(os.listdir(workdir)) == before


def _main(workdir, cache_dir):
    cmd = [sys.executable, "-m", "duo_jax.main", "--config=configs/quickstart.py:runlocal",
           f"--workdir={workdir}", "--noprogress", "--config.checkpoint_every=1", "--config.log_every=1",
           "--config.phases=coupled,decouple,finetune", "--config.finetune.steps=12"]
    # The three runs share compiled programs through jax's persistent cache.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_COMPILATION_CACHE_DIR": cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    return cmd, env


def test_kill_and_rerun_resumes_to_the_same_result(tmp_path):
    clean, killed, cache = str(tmp_path / "clean"), str(tmp_path / "killed"), str(tmp_path / "jax_cache")
    cmd, env = _main(clean, cache)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)

    cmd, env = _main(killed, cache)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = os.path.join(killed, "finetune")
    deadline = time.time() + 600
    try:
        # Kill it once the fine-tune phase has saved a few steps, but before it ends.
        while time.time() < deadline:
            steps = [int(s) for s in os.listdir(target) if s.isdigit()] if os.path.isdir(target) else []
            if steps and max(steps) >= 3:
                break
            assert proc.poll() is None, "the run finished before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not os.path.exists(os.path.join(target, "complete.json"))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)

    a = json.load(open(os.path.join(clean, "results.json")))
    b = json.load(open(os.path.join(killed, "results.json")))
    for name in a:
        for key in ("top1", "top5", "loss", "steps"):
            assert a[name][key] == b[name][key], (name, key)
        assert a[name].get("eval_history") == b[name].get("eval_history")
    # and the final parameters are bitwise identical
    config = load_config("quickstart")
    config.phases = "coupled,decouple,finetune"
    va = phases.Runner(config, clean, progress=False).final_variables("finetune")
    vb = phases.Runner(config, killed, progress=False).final_variables("finetune")
    for x, y in zip(jax.tree_util.tree_leaves(va), jax.tree_util.tree_leaves(vb), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("args,message", [
    (["--config.modle.name=vgg8"], 'Did you mean "model"'),
    (["--config.coupled.epochs=abc"], "could not convert"),
    (["--config=configs/nope.py"], "configs/nope.py"),
    (["--config.model.name=vgg8"], "unknown model 'vgg8'"),
    (["--config.coupled.optimizer.lr=-1"], "learning rate must be positive"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "duo_jax.main", f"--workdir={tmp_path / 'w'}", "--noprogress", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_cpu_speed_flags_do_not_change_training(tmp_path):
    """main turns XLA's YNN dot fusions on by default: the same forward pass and update.

    fp mode and plain SGD, two steps: the loss before any update and after one agree to
    float rounding. (Over many steps two runs drift apart: a ReLU/max-pool tie or a
    binary threshold turns a 1e-7 difference into a different gradient.)
    """
    losses = {}
    for ynn in ("0", "1"):
        workdir = tmp_path / f"ynn{ynn}"
        cmd = [sys.executable, "-m", "duo_jax.main", "--config=configs/quickstart.py:runlocal", f"--workdir={workdir}",
               "--noprogress", "--config.phases=baseline", "--config.baseline.mode=fp", "--config.baseline.steps=2",
               "--config.log_every=1", "--config.baseline.optimizer.name=sgd", "--config.baseline.optimizer.lr=0.01"]
        subprocess.run(cmd, cwd=ROOT, env={**os.environ, "DUO_JAX_YNN": ynn}, check=True, capture_output=True, timeout=300)
        r = json.load(open(workdir / "results.json"))["baseline"]
        losses[ynn] = [h["loss"] for h in r["train_history"]] + [r["loss"]]
    np.testing.assert_allclose(losses["1"], losses["0"], rtol=1e-5)
