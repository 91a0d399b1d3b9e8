"""benchmarks/train_throughput.py (smoke run, as CI has no torch), the PyTorch twin, and
benchmarks/inference.py (smoke run)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "train_throughput.py")
INFERENCE = os.path.join(ROOT, "benchmarks", "inference.py")

# Runs the benchmark with torch made unimportable, as on a machine without the extra.
_NO_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")


def _vgg7_forward_flops(width_mult: float, image: int, batch: int, classes: int = 10) -> float:
    """2 x multiply-adds of VGG-7's convs and classifier, from its layout (duo_jax.models.vgg)."""
    w = [int(round(c * width_mult)) for c in (64, 64, 128, 128, 512, 512)]
    s = image
    macs = s * s * 3 * 9 * w[0]
    for i in (1, 2, 3):  # 3x3 conv at the current size, then a 2x2 pool
        macs += s * s * w[i - 1] * 9 * w[i]
        s //= 2
    s5 = s // 4  # 4x4 conv, stride 4
    macs += s5 * s5 * w[3] * 16 * w[4] + s5 * s5 * w[4] * w[5] + s5 * s5 * w[5] * classes
    return 2.0 * macs * batch


def _quick(tmp_path_factory, *command):
    """Runs a benchmark's ``--quick`` smoke run; its JSON and its stdout."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run([sys.executable, *command, "--quick", f"--out={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _one_error_line(script, *args, names=()):
    proc = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and all(n in errors[0] for n in names), errors
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return _quick(tmp_path_factory, "-c", _NO_TORCH, BENCH)


def test_quick_run_without_torch_reports_the_twin_skipped(quick_run):
    result, stdout = quick_run
    assert set(result["cases"]) == {"vgg7_binary", "vgg7_fp"}
    for res in result["cases"].values():
        assert "not installed" in res["torch_skipped"]
        assert "torch" not in res["all"] and "ratio_vs_torch" not in res["all"]
        assert "torch_s" not in res["rounds"]
    assert result["meta"]["torch"] is None
    assert "quantizer overhead" in stdout and "target fraction_of_matmul" in stdout


def test_quick_run_numbers_are_consistent(quick_run):
    """Every reported number follows from the per-round times it records."""
    result, _ = quick_run
    rounds = result["meta"]["rounds"]
    for name, res in result["cases"].items():
        r, s = res["rounds"], res["all"]
        assert len(r["duo_jax_s"]) == len(r["matmul_best_flop_per_s"]) == len(r["others_cpu_share"]) == rounds
        assert s["rounds"] == rounds
        assert set(s["matmul_flop_per_s"]) == {"jax", "numpy"}
        j = s["duo_jax"]
        assert j["median_s"] == pytest.approx(float(np.median(r["duo_jax_s"])))
        assert j["images_per_s"] == pytest.approx(res["batch"] / j["median_s"])
        # The step's FLOP/s over the best matmul rate of the same round, median over rounds.
        paired = np.array([res["xla_flops_per_step"] / t for t in r["duo_jax_s"]]) / r["matmul_best_flop_per_s"]
        assert j["fraction_of_matmul"] == pytest.approx(float(np.median(paired)))
        assert j["cpu_s"] == pytest.approx(float(np.median(r["duo_jax_cpu_s"])))
        # The jaxpr count of convs and dots is 3x the forward FLOPs computed from the layout here;
        # XLA's count of the whole step (backward ~2x forward, plus elementwise work) is near it.
        fwd = _vgg7_forward_flops(res["width_mult"], res["image"][0], res["batch"])
        assert res["model_flops_per_step"] == pytest.approx(3 * fwd, rel=1e-6)
        assert 2.0 * fwd < res["xla_flops_per_step"] < 4.0 * fwd
        assert np.isfinite(res["loss_after"]) and res["loss_after"] > 0
    # The binary and fp steps are timed in the same rounds; the overhead is the median per-round ratio.
    o = result["quantizer_overhead"]["vgg7_binary"]
    ratios = np.array(result["cases"]["vgg7_binary"]["rounds"]["duo_jax_s"]) / result["cases"]["vgg7_fp"]["rounds"]["duo_jax_s"]
    assert o["fp_case"] == "vgg7_fp" and o["all"]["duo_jax"] == pytest.approx(float(np.median(ratios)) - 1)
    t = result["targets"]
    assert set(t) == {"fraction_of_matmul", "quantizer_overhead"}
    assert t["fraction_of_matmul"]["met"] == (t["fraction_of_matmul"]["value"] >= 0.8)


def test_unknown_case_is_one_error_line():
    _one_error_line(BENCH, "--cases=vgg8", names=("vgg8", "vgg7_binary"))


# ---------------------------------------------------------------------------
# benchmarks/inference.py
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inference_run(tmp_path_factory):
    return _quick(tmp_path_factory, INFERENCE)


def test_inference_packed_forward_agrees_with_the_float_forward(inference_run):
    result, stdout = inference_run
    assert set(result["cases"]) == {"vgg7", "resnet18"}
    for name, case in result["cases"].items():
        a = case["agreement"]
        assert a["argmax"] == 1.0, name
        assert a["max_abs_logit_diff"] <= 1e-4 * max(1.0, a["max_abs_logit"]), name
        assert case["binary_layers"] > 0 and case["model"]["mode"] == "decoupled"
        assert f"{name}: argmax agreement 100.0%" in stdout


def test_inference_numbers_follow_from_the_recorded_times(inference_run):
    result, stdout = inference_run
    rounds = result["meta"]["rounds"]
    assert result["meta"]["quick"] is True
    for case in result["cases"].values():
        for part in ("whole_model", "binary_part"):
            p = case[part]
            for side in ("float", "packed"):
                e = p[side]
                assert len(e["times_s"]) == rounds
                assert e["median_s"] == pytest.approx(float(np.median(e["times_s"])))
                assert e["images_per_s"] == pytest.approx(case["batch"] / e["median_s"])
            assert p["ratio"] == pytest.approx(p["float"]["median_s"] / p["packed"]["median_s"])
        layers = case["binary_part"]["layers"]
        assert len(layers) == case["binary_layers"]
        for layer in layers:
            assert layer["ratio"] == pytest.approx(layer["float_median_s"] / layer["packed_median_s"])
        assert f"{case['binary_part']['ratio']:.2f}x" in stdout


def test_inference_unknown_case_is_one_error_line(tmp_path):
    out = tmp_path / "never.json"
    _one_error_line(INFERENCE, "--cases=vgg8", f"--out={out}", names=("vgg8", "vgg7"))
    assert not out.exists()


# ---------------------------------------------------------------------------
# The twin computes what duo_jax computes (only where torch is installed)
# ---------------------------------------------------------------------------

def test_twin_quantizers_match_duo_jax():
    """Forward values and straight-through gradients, thresholds and window edges included."""
    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch_twin

    from duo_jax import quant

    edges = np.float32([-0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25])
    # The float32 neighbours of each edge (of 0: +-1e-30; XLA's CPU flushes denormals to zero).
    below = np.where(edges == 0, np.float32(-1e-30), np.nextafter(edges, np.float32(-2)))
    above = np.where(edges == 0, np.float32(1e-30), np.nextafter(edges, np.float32(2)))
    x = np.concatenate([np.random.default_rng(0).uniform(-0.5, 1.5, 200), edges, below, above]).astype(np.float32)
    g = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    for n, offset in ((1, 0.0), (2, 0.0), (1, -0.25), (1, 0.25)):
        y, vjp = jax.vjp(lambda v: quant.levels(v, n, offset), jnp.asarray(x))
        xt = torch.from_numpy(x).requires_grad_()
        yt = torch_twin.levels(xt, n, offset)
        yt.backward(torch.from_numpy(g))
        np.testing.assert_array_equal(yt.detach().numpy(), y)
        np.testing.assert_array_equal(xt.grad.numpy(), vjp(jnp.asarray(g))[0])
    w = np.random.default_rng(2).standard_normal((3, 3, 4, 5)).astype(np.float32)
    w[0, 0, 0, 0] = 0.0  # sign(0) = +1
    wt = torch.from_numpy(w).requires_grad_()
    torch_twin.binarize_weight(wt).backward(torch.from_numpy(w))
    np.testing.assert_allclose(torch_twin.binarize_weight(torch.from_numpy(w)).numpy(), quant.binarize_weight(w),
                               rtol=1e-6)
    np.testing.assert_array_equal(wt.grad.numpy(), w)


# ResNet with float weights: with binary weights and inputs, conv outputs take few values, and a
# BatchNorm output can sit within rounding of a window edge, where the two libraries' last-bit
# differences flip a straight-through mask (binarize_weight is compared directly above).
TWIN_CASES = [  # family, mode, options, image side
    ("vgg7", "binary", {"width_mult": 0.25}, 32),
    ("vgg7", "decoupled", {"width_mult": 0.25}, 32),
    ("resnet18", "coupled", {"width_mult": 0.125, "binarize_weights": False}, 33),  # odd: uneven 'SAME' pads
]


@pytest.mark.parametrize("family,mode,options,side", TWIN_CASES)
def test_twin_matches_duo_jax_on_shared_weights(family, mode, options, side):
    """Logits (training and inference mode) and every parameter's gradient agree."""
    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp
    import optax

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch_twin

    from duo_jax import models

    model = models.create_model(family, mode=mode, num_classes=10, **options)
    x = np.random.default_rng(0).standard_normal((4, side, side, 3)).astype(np.float32)
    y = np.array([0, 3, 5, 9], np.int32)
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(1, impl="rbg"))
    rng = np.random.default_rng(2)  # non-trivial BN statistics for the inference-mode check
    stats = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape).astype(np.float32)),
                         variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}

    def loss_fn(params):
        logits, _ = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    logits_eval = jax.jit(lambda v: model.apply(v, x, train=False))(variables)

    twin = torch_twin.create_model(family, mode=mode, num_classes=10, **options)
    torch_twin.load_duo_jax_variables(twin, variables)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    twin.eval()
    with torch.no_grad():
        np.testing.assert_allclose(twin(xt).numpy(), logits_eval, atol=1e-4 * np.abs(logits_eval).max())
    twin.train()
    out = twin(xt)
    torch.nn.functional.cross_entropy(out, torch.from_numpy(y).long()).backward()
    np.testing.assert_allclose(out.detach().numpy(), logits, atol=1e-4 * np.abs(logits).max())
    modules = torch_twin.duo_jax_modules(twin)
    for name, leaves in grads.items():
        for leaf, g in leaves.items():
            p = modules[name].bias if leaf == "bias" else modules[name].weight
            tg = p.grad.numpy()
            tg = tg.transpose(2, 3, 1, 0) if tg.ndim == 4 else (tg.T if tg.ndim == 2 else tg)
            g = np.asarray(g)
            np.testing.assert_allclose(tg, g, atol=1e-3 * np.abs(g).max() + 1e-7, err_msg=f"{name}/{leaf}")
