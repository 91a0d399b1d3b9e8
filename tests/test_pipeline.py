"""Every phase end to end at tiny size: bundled data, tfds mock data (kills, resume and bad input:
test_reliability.py)."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from duo_jax import checkpointing, models, phases
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
    # Each phase's cost figures describe its model: the parameter count of the model built here.
    sample = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    for r in results.values():
        model = models.create_model("vgg7", mode=r["mode"], num_classes=10, **dict(config.model.options))
        params = jax.eval_shape(lambda s: model.init(jax.random.key(0), s, train=False), sample)["params"]
        assert r["cost"]["params"] == sum(p.size for p in jax.tree.leaves(params)) > 0
        assert r["cost"]["float_macs"] > 0  # float weights: every conv and dense layer counts float MACs
    assert results["finetune"]["cost"] == results["decouple"]["cost"]
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
