#!/usr/bin/env bash
# CUDA checks for a machine with an NVIDIA GPU and a CUDA build of ONNX Runtime (the
# onnxruntime-gpu wheel's capi/ folder, with the CUDA libraries it needs on LD_LIBRARY_PATH).
# CI has no GPU; run this by hand:
#
#   ORT_DYLIB_PATH=.../onnxruntime/capi/libonnxruntime.so.X tests/gpu/cuda-check.sh [CIP] [OUT]
#
# It generates with the bundled SD fixtures (fp32 and fp16) on cuda:0 and on the CPU and compares
# the pixels, runs the classifier's parity tests on cuda:0, then the demo experiment (caption,
# compose, generate, train, eval) there.
# Exits non-zero when a step fails or the CUDA images stray from the CPU's.
set -euo pipefail
CIP=${1:-./target/release/cip}
OUT=${2:-target/cuda-check}
PROVIDER=${CIP_CHECK_PROVIDER:-cuda:0}
mkdir -p "$OUT"
: "${ORT_DYLIB_PATH:?set ORT_DYLIB_PATH to a CUDA build of libonnxruntime}"

compare() { # compare A.png B.png TOLERANCE_MAX TOLERANCE_MEAN
    "${PYTHON:-python3}" - "$@" <<'PY'
import sys
from PIL import Image
a, b = (Image.open(p).convert("RGB").tobytes() for p in sys.argv[1:3])
diffs = [abs(x - y) for x, y in zip(a, b)]
worst, mean = max(diffs), sum(diffs) / len(diffs)
print(f"{sys.argv[1]} vs {sys.argv[2]}: max pixel difference {worst}, mean {mean:.4f}")
sys.exit(0 if worst <= float(sys.argv[3]) and mean <= float(sys.argv[4]) else 1)
PY
}

for model in sd-tiny sd-tiny-fp16; do
    for provider in "$PROVIDER" cpu; do
        start=$(date +%s%N)
        "$CIP" generate --model "tests/fixtures/$model" --prompt "a photo of a golden retriever" \
            --steps 10 --seed 3 --provider "$provider" --out "$OUT/$model-${provider%%:*}.png"
        echo "$model on $provider: $(( ($(date +%s%N) - start) / 1000000 )) ms"
    done
    # fp32 kernels differ in summation order only; fp16 ones round at every layer.
    compare "$OUT/$model-${PROVIDER%%:*}.png" "$OUT/$model-cpu.png" 8 0.5
done

# The classifier's parity tests (forward logits; one SGD step through each train-step graph; ten
# chained steps) against torch's CPU references, on the GPU. TRAIN_EVAL_TEST: a built test binary
# (`cargo test --features test-kinds --test train_eval --no-run` prints it) where cargo is absent.
if [[ -n "${TRAIN_EVAL_TEST:-}" ]]; then
    parity=("$TRAIN_EVAL_TEST")
else
    parity=(cargo test --features test-kinds --test train_eval --)
fi
CIP_TEST_PROVIDER="$PROVIDER" "${parity[@]}" --nocapture --test-threads 1 \
    forward_and_written_forward_model_match_torch_logits train_step_matches_torch_sgd \
    ten_chained_steps_stay_within_1e_4_of_torch

"$CIP" data demo --out experiments/data/demo
CIP_CACHE="$OUT/cache" "$CIP" run experiments/demo.toml --provider "$PROVIDER" --results "$OUT/demo"
cat "$OUT/demo/table.md"
echo "cuda-check: all steps passed on $PROVIDER"
