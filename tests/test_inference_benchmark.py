"""benchmarks/inference.py: a smoke run whose numbers follow from what it records."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "inference.py")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inference") / "quick.json"
    proc = subprocess.run([sys.executable, BENCH, "--quick", f"--out={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_packed_forward_agrees_with_the_float_forward(quick_run):
    result, stdout = quick_run
    assert set(result["cases"]) == {"vgg7", "resnet18"}
    for name, case in result["cases"].items():
        a = case["agreement"]
        assert a["argmax"] == 1.0, name
        assert a["max_abs_logit_diff"] <= 1e-4 * max(1.0, a["max_abs_logit"]), name
        assert case["binary_layers"] > 0 and case["model"]["mode"] == "decoupled"
        assert f"{name}: argmax agreement 100.0%" in stdout


def test_reported_numbers_follow_from_the_recorded_times(quick_run):
    result, stdout = quick_run
    rounds = result["meta"]["rounds"]
    assert result["meta"]["quick"] is True
    for name, case in result["cases"].items():
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


def test_unknown_case_is_one_error_line(tmp_path):
    out = tmp_path / "never.json"
    proc = subprocess.run([sys.executable, BENCH, "--cases=vgg8", f"--out={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "vgg8" in errors[0] and "vgg7" in errors[0]
    assert "Traceback" not in proc.stderr and not out.exists()
