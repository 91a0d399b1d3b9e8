"""Tests of duo_jax.mismatch: estimators against NumPy gradients, STE vs CDG."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from duo_jax import errors, mismatch, quant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------
# Smooth functions with known gradients
# ---------------------------------------------------------------------------

_RNG = np.random.default_rng(0)
_D = 6
_M = _RNG.normal(size=(_D, _D))
_A = (_M @ _M.T / _D + np.eye(_D)).astype(np.float32)  # symmetric positive definite
_B = _RNG.normal(size=_D).astype(np.float32)
_W0 = _RNG.normal(size=_D).astype(np.float32)


def _quad_loss(params, batch):
    """``0.5 w^T A w + b^T w`` with ``w = params['layer']['w']`` (batch: (A, b))."""
    a, b = batch
    w = params["layer"]["w"]
    return 0.5 * w @ a @ w + b @ w + 0.0 * jnp.sum(params["other"])


_QPARAMS = {"layer": {"w": jnp.asarray(_W0)}, "other": jnp.ones(3)}
_QBATCH = (jnp.asarray(_A), jnp.asarray(_B))
_QGRAD = _A.astype(np.float64) @ _W0 + _B  # NumPy: d/dw = A w + b (A symmetric)

_N, _F = 200, 5
_X = _RNG.normal(size=(_N, _F)).astype(np.float32)
_Y = (_RNG.random(_N) < 1 / (1 + np.exp(-_X @ np.array([1.0, -2.0, 0.5, 0.0, 1.5])))).astype(np.float32)
_LW = (0.3 * _RNG.normal(size=_F)).astype(np.float32)


def _logistic_loss(params, batch):
    """Mean binary cross-entropy of ``sigmoid(x w)``."""
    x, y = batch
    z = x @ params["w"]
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z)


def _logistic_grad_numpy(w):
    p = 1.0 / (1.0 + np.exp(-(_X.astype(np.float64) @ w)))
    return _X.T.astype(np.float64) @ (p - _Y) / _N


def _cos(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_quadratic_cdg_and_smoothed_match_true_gradient():
    # CDG: a central difference is exact on a quadratic up to rounding; eps=1e-2
    # keeps the float32 rounding error of L (~1e-6 of |L| ~ 10) below 1e-3 of
    # each gradient entry.
    idx, g = mismatch.coordinate_discrete_gradient(_quad_loss, _QPARAMS, _QBATCH, path="layer/w", eps=1e-2)
    np.testing.assert_array_equal(idx, np.arange(_D))
    assert _cos(g, _QGRAD) >= 0.999
    np.testing.assert_allclose(g, _QGRAD, rtol=2e-3, atol=2e-3)
    # Smoothing: the antithetic difference of a quadratic is exactly
    # 2 s u^T (A w + b), so the estimate is mean_k u_k u_k^T g, whose cosine with
    # g is about 1 / sqrt(1 + (d + 1) / K) = 0.9998 for d = 6, K = 20000.
    idx, g = mismatch.smoothed_gradient(
        _quad_loss, _QPARAMS, _QBATCH, path=("layer", "w"), sigma=0.1, num_samples=20000,
        key=jax.random.PRNGKey(1), chunk_size=2000)
    np.testing.assert_array_equal(idx, np.arange(_D))
    assert _cos(g, _QGRAD) >= 0.999


def test_logistic_regression_cdg_and_smoothed_match_true_gradient():
    true = _logistic_grad_numpy(_LW.astype(np.float64))
    params, batch = {"w": jnp.asarray(_LW)}, (jnp.asarray(_X), jnp.asarray(_Y))
    # Truncation error of a central difference is O(eps^2 |L'''|) ~ 1e-5 here.
    _, g = mismatch.coordinate_discrete_gradient(_logistic_loss, params, batch, path="w", eps=1e-2)
    assert _cos(g, true) >= 0.999
    np.testing.assert_allclose(g, true, atol=1e-3)
    # sigma = 0.05: the smoothed gradient differs from the true one by O(sigma^2);
    # K = 20000 pairs on d = 5 coordinates gives a noise cosine of ~0.9998.
    _, g = mismatch.smoothed_gradient(
        _logistic_loss, params, batch, path="w", sigma=0.05, num_samples=20000,
        key=jax.random.PRNGKey(2), chunk_size=2000)
    assert _cos(g, true) >= 0.999


def test_subset_returns_exactly_those_coordinates():
    w = jnp.asarray(_RNG.normal(size=(4, 5)).astype(np.float32))
    a = jnp.asarray(_RNG.normal(size=(4, 5)).astype(np.float32))

    def loss(params, batch):  # gradient a + 2 w
        return jnp.sum(batch * params["k"]) + jnp.sum(params["k"] ** 2)

    true = np.asarray(a + 2 * w).reshape(-1)
    key = jax.random.PRNGKey(3)
    idx, g = mismatch.coordinate_discrete_gradient(loss, {"k": w}, a, path="k", eps=1e-2, num_coords=7, key=key)
    idx = np.asarray(idx)
    assert idx.shape == (7,) and len(set(idx.tolist())) == 7
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 20
    np.testing.assert_allclose(g, true[idx], rtol=1e-3, atol=1e-3)
    idx2, _ = mismatch.coordinate_discrete_gradient(loss, {"k": w}, a, path="k", eps=1e-2, num_coords=7, key=key)
    np.testing.assert_array_equal(idx2, idx)  # same key, same subset
    _, full = mismatch.coordinate_discrete_gradient(loss, {"k": w}, a, path="k", eps=1e-2)
    np.testing.assert_allclose(g, np.asarray(full)[idx], rtol=1e-6)
    # The smoothed estimate on a subset perturbs only those coordinates.
    idx3, s = mismatch.smoothed_gradient(
        loss, {"k": w}, a, path="k", sigma=0.1, num_samples=20000, key=key, num_coords=4, chunk_size=5000)
    assert np.asarray(idx3).shape == (4,)
    assert _cos(s, true[np.asarray(idx3)]) >= 0.999


def test_chunking_matches_chunk_size_one():
    params, batch = {"w": jnp.asarray(_LW)}, (jnp.asarray(_X), jnp.asarray(_Y))
    key = jax.random.PRNGKey(4)
    for method in ("cdg", "smoothed"):
        kwargs = dict(path="w", eps=1e-2) if method == "cdg" else dict(path="w", sigma=0.1, num_samples=37, key=key)
        fn = mismatch.coordinate_discrete_gradient if method == "cdg" else mismatch.smoothed_gradient
        i1, g1 = fn(_logistic_loss, params, batch, chunk_size=1, **kwargs)
        i7, g7 = fn(_logistic_loss, params, batch, chunk_size=7, **kwargs)  # 37 = 5 * 7 + 2: padded
        np.testing.assert_array_equal(i1, i7)
        # Batched and unbatched float32 losses may round differently: one ulp of
        # L ~ 0.7 is 6e-8, i.e. ~3e-6 after dividing by 2 eps = 0.02.
        np.testing.assert_allclose(g1, g7, rtol=1e-4, atol=1e-5)


def test_jit_with_traced_eps_and_paths():
    fn = jax.jit(functools.partial(
        mismatch.coordinate_discrete_gradient, _quad_loss, path=("layer", "w"), chunk_size=4))
    _, g = fn(_QPARAMS, _QBATCH, eps=jnp.float32(1e-2))
    assert _cos(g, _QGRAD) >= 0.999
    assert mismatch.leaf_paths(_QPARAMS) == ["layer/w", "other"]
    with pytest.raises(errors.UserError, match="layer/w"):
        mismatch.get_leaf(_QPARAMS, "layer/v")
    sims = mismatch.layer_similarities(_quad_loss, _QPARAMS, _QBATCH, paths=["layer/w"], eps=[1e-2])
    assert set(sims) == {"layer/w"} and float(sims["layer/w"]) >= 0.999
    assert float(mismatch.cosine_similarity(jnp.zeros(3), jnp.ones(3))) == 0.0
    np.testing.assert_allclose(mismatch.cosine_similarity(jnp.arange(4.0), -jnp.arange(4.0)), -1.0, rtol=1e-6)


# ---------------------------------------------------------------------------
# STE vs CDG in a small MLP: float activations vs binary activations
# ---------------------------------------------------------------------------


def _mlp_setup():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=256)
    params = {
        "l1": {"kernel": (rng.normal(size=(8, 16)) / np.sqrt(8)).astype(np.float32), "bias": np.full(16, 0.5, np.float32)},
        "l2": {"kernel": (rng.normal(size=(16, 16)) / np.sqrt(16)).astype(np.float32), "bias": np.full(16, 0.5, np.float32)},
        "l3": {"kernel": (rng.normal(size=(16, 3)) / np.sqrt(16)).astype(np.float32), "bias": np.zeros(3, np.float32)},
    }
    return jax.tree.map(jnp.asarray, params), (jnp.asarray(x), jax.nn.one_hot(y, 3))


def _mlp_loss(params, batch, act):
    x, y = batch
    for name in ("l1", "l2"):
        x = act(x @ params[name]["kernel"] + params[name]["bias"])
    logits = x @ params["l3"]["kernel"] + params["l3"]["bias"]
    return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1))


def _mlp_similarities(act, eps):
    params, batch = _mlp_setup()
    loss = functools.partial(_mlp_loss, act=act)
    return {k: float(v) for k, v in mismatch.layer_similarities(
        loss, params, batch, paths=["l1/kernel", "l2/kernel"], method="cdg", eps=eps, chunk_size=64).items()}


def test_float_mlp_ste_matches_cdg():
    # ReLU is the true derivative almost everywhere, so STE = true gradient;
    # eps = 1e-3 is small enough that few ReLUs switch and large enough that
    # float32 rounding of L (~1e-7) is small next to the loss differences.
    sims = _mlp_similarities(jax.nn.relu, 1e-3)
    print("float ReLU STE/CDG cosine:", sims)
    assert min(sims.values()) >= 0.99


def test_binary_mlp_ste_mismatch_is_clearly_larger():
    float_sims = _mlp_similarities(jax.nn.relu, 0.05)
    bin_sims = _mlp_similarities(quant.binary, 0.05)
    print("float:", float_sims, "binary:", bin_sims)
    # eps = 0.05, about 1/5 of a weight's scale, so that the batch of 256 has
    # threshold crossings. Measured: float 0.999 / 1.000 (l1 / l2), binary
    # 0.17 / 0.87.
    for k in float_sims:
        assert bin_sims[k] < float_sims[k] - 0.1


# ---------------------------------------------------------------------------
# The analysis command, at a tiny size
# ---------------------------------------------------------------------------


def _config(**overrides):
    spec = importlib.util.spec_from_file_location("mismatch_config", os.path.join(ROOT, "configs", "mismatch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.update(overrides)
    return cfg


def test_analysis_smoke(tmp_path):
    from duo_jax import mismatch_analysis

    cfg = _config(nets=("mlp:digits",), mlp_widths=(16, 16), activations=("float", "clipped", "ternary"),
                  seeds=(0,), train_steps=30, measure_batch=128, num_coords=24, num_samples=32,
                  chunk_size=16, eps_rel=0.01, sigma_rel=0.01)
    lines = []
    mismatch_analysis.run(cfg, str(tmp_path), log=lines.append)
    assert any("STE vs cdg" in line for line in lines)
    report = json.loads((tmp_path / "mismatch.json").read_text())
    assert (tmp_path / "mismatch.png").stat().st_size > 1000
    assert set(report) >= {"config", "results", "finding", "runtime_s"}
    entry = report["results"]["mlp:digits"]
    assert entry["layers"] == ["dense1/kernel", "dense2/kernel", "dense3/kernel"]
    assert set(entry["activations"]) == {"float", "clipped", "ternary"}
    for act in entry["activations"].values():
        assert 0.0 <= act["test_accuracy"]["mean"] <= 1.0
        for method in ("cdg", "smoothed", "cdg_nonzero"):
            for p in entry["layers"]:
                cell = act[method][p]
                assert len(cell["values"]) == 1 and -1.0 <= cell["mean"] <= 1.0
    # Float activations: the STE gradient is the true gradient (eps small).
    float_cdg = entry["activations"]["float"]["cdg"]
    assert min(float_cdg[p]["mean"] for p in entry["layers"]) >= 0.95, float_cdg
    assert len(report["finding"]) == 2 * (len(entry["layers"]) - 1)  # hidden layers only


def test_analysis_command_line_errors(tmp_path):
    # The absl command parses its flags and reports a bad config in one line.
    cmd = [sys.executable, "-m", "duo_jax.mismatch", "--config=configs/mismatch.py",
           f"--workdir={tmp_path}", "--config.activations=('float', 'quaternary')"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: unknown activation(s) quaternary" in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(errors.UserError, match="quaternary"):
        from duo_jax import mismatch_analysis

        mismatch_analysis.run(_config(activations=("float", "quaternary")), str(tmp_path))
