"""duo_jax.export: a run's fine-tuned model as packed bits, sizes, agreement with the float model."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duo_jax import bitpack, export, phases, quant, train
from duo_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart_config(binarize_weights):
    spec = importlib.util.spec_from_file_location("quickstart", os.path.join(ROOT, "configs", "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    config.phases = "coupled,decouple,finetune"
    config.model.options.binarize_weights = binarize_weights
    config.model.options.per_channel_scale = True
    config.data.num_eval = 48
    return config


def write_finetuned_run(workdir, config):
    """A run's workdir with a complete finetune phase, written by the run's own checkpoint code.

    Its variables are the initial ones with BatchNorm scales of random signs
    (not trained: nothing the export does depends on training).
    """
    phases.check_workdir(config, workdir)
    runner = phases.Runner(config, workdir, progress=False)
    model = runner.model("decoupled")
    variables = jax.device_get(runner.init_variables(model))
    images = jnp.asarray(next(iter(runner.data.eval_batches()))["image"])
    rng = np.random.default_rng(0)
    for p in variables["params"].values():
        if "scale" in p:
            p["scale"] = (rng.uniform(0.5, 1.5, p["scale"].shape) * rng.choice([-1, 1], p["scale"].shape)).astype(np.float32)
    tx = train.make_optimizer(config.finetune.optimizer, runner.data.steps_per_epoch, 1)
    state = train.create_state(model.apply, variables, tx, config.seed)
    with runner.checkpoints("finetune") as ckpt:
        ckpt.save(0, state, {"phase": "finetune"})
        ckpt.wait()
        ckpt.mark_complete({"kind": "train"})
    return model, variables, images


def test_export_packs_bits_and_agrees_with_the_float_model(tmp_path):
    workdir = str(tmp_path / "run")
    model, variables, images = write_finetuned_run(workdir, quickstart_config(True))
    lines = []
    out = export.export_run(workdir, log=lines.append)
    directory = os.path.join(workdir, "export")
    assert json.load(open(os.path.join(directory, "export.json"))) == json.loads(json.dumps(out))
    assert out["phase"] == "finetune" and out["model"]["mode"] == "decoupled"

    # sizes: every binary kernel 1 bit per weight (whole 32-bit words), against 4 bytes per float weight
    kernels = {k: v["kernel"] for k, v in variables["params"].items() if "kernel" in v}
    binary = {k: s for k, s in out["layers"].items() if s["kind"] == "binary"}
    assert sorted(binary) == ["conv2", "conv3", "conv4", "conv5", "conv6"]
    for name, spec in binary.items():
        assert spec["float_bytes"] == 4 * kernels[name].size
        assert spec["packed_bytes"] == 4 * math.ceil(kernels[name].size / 32)
    assert 31 < out["binary_layers"]["ratio"] <= 32
    assert out["file_bytes"] == os.path.getsize(os.path.join(directory, "model.npz"))
    assert out["float_bytes"] == 4 * sum(a.size for a in jax.tree_util.tree_leaves(variables))
    assert out["ratio"] == pytest.approx(out["float_bytes"] / out["file_bytes"])
    assert sorted(k for k, s in out["layers"].items() if s["kind"] == "folded") == ["bn2", "bn3", "bn4", "bn5"]

    # the packed forward against the float eval forward on every eval image
    assert out["check"]["images"] == 48 and out["check"]["argmax_agreement"] == 1.0
    assert out["check"]["max_rel_logit_diff"] <= 1e-5
    assert any("argmax agreement 100.00%" in line for line in lines)

    # the check ran on the file read back; reading it never unpickles
    with np.load(os.path.join(directory, "model.npz"), allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)
        assert np.array_equal(data["binary/conv2/bits"],
                              bitpack.pack_bits_np(np.asarray(quant.binarize_weight(kernels["conv2"])) >= 0))
    loaded_model, packed, meta = export.load(directory)
    assert loaded_model == model and meta == out
    assert packed.layers["bn2"] == {"kind": "folded", "source": "conv2", "source_channels": 6, "features": 12}


def test_export_of_float_weights_is_refused_in_one_line(tmp_path):
    workdir = str(tmp_path / "run")
    config = quickstart_config(False)  # the quickstart's own setting: float weights
    phases.check_workdir(config, workdir)
    proc = subprocess.run([sys.executable, "-m", "duo_jax.export", f"--workdir={workdir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "binarize_weights=True" in lines[0], proc.stderr
    assert not os.path.exists(os.path.join(workdir, "export"))
    with pytest.raises(UserError, match="no run in"):
        export.export_run(str(tmp_path / "nothing"))
