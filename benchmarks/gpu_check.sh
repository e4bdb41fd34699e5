#!/usr/bin/env bash
# One short run on a machine with a CUDA GPU: the gpu tests, then `offsite bench` in bfloat16 on the
# built-in model and on a random-weight GPT2-large shape. Writes its JSON and logs under $OUT (default ./gpu-check).
# Expects the venv of `make setup` with a CUDA build of torch; `make assets` for the built-in model.
set -euo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
BIN=${BIN:-.venv/bin}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv"
"$BIN/python" -m pytest -m gpu -q tests/test_gpu.py 2>&1 | tee "$OUT/pytest-gpu.log"
for target in smollm2-135m "--random-shape gpt2-large"; do
    name=$(echo "$target" | tr -c 'a-z0-9\n' '-' | sed 's/^-*//')
    # shellcheck disable=SC2086 - $target is one or two words on purpose
    "$BIN/offsite" bench $target --device cuda --dtype bfloat16 --settings full_ft offsite offsite_lora \
        --steps 10 --json > "$OUT/bench-$name.json" 2> "$OUT/bench-$name.log"
done
echo "written to $OUT"
