#!/usr/bin/env bash
# One-GPU check: the ResNet-18 ImageNet-shape training step (synthetic data,
# 224x224, batch 256, bfloat16 compute, float32 parameters) of duo_jax and of its
# PyTorch twin, binary (the baseline BNN) and fp (float reference); prints
# images/s and model FLOP utilisation against the bf16 matmul rate measured in
# the same run and against a datasheet peak (PEAK_TFLOPS, default 989: dense
# bf16 of an H100/H200 SXM). Sized for at most 8 minutes: the benchmark is
# stopped after LIMIT_S (default 450) seconds, its log kept.
#
#   bash benchmarks/gpu_check.sh                         # writes runs/gpu_check/
#   OUT_DIR=DIR bash benchmarks/gpu_check.sh [--rounds=3 ...]
#
# Needs jax with CUDA and torch with CUDA on the machine. WHEELS_DIR=DIR first
# installs the pure-Python wheels in DIR into a temporary folder (a machine
# without network that lacks, e.g., ml-collections). Extra arguments go to
# benchmarks/train_throughput.py and override the ones below (DEVICE=cpu with
# small sizes tries the script out on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-runs/gpu_check}
mkdir -p "$out"
if [[ -n "${WHEELS_DIR:-}" ]]; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS_DIR"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# jax and torch share the GPU in one process: jax takes half of its memory, not 75 %.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
fi
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)"
timeout "${LIMIT_S:-450}" python3 benchmarks/train_throughput.py \
  --device="${DEVICE:-gpu}" --dtype=bfloat16 --cases=resnet18_binary,resnet18_fp --batch=256 \
  --warmup=3 --rounds=5 --steps=10 --peak-tflops="${PEAK_TFLOPS:-989}" --out="$out/gpu_check.json" "$@" \
  2>&1 | tee "$out/gpu_check.log"
