#!/usr/bin/env bash
# The GPU checks and measurements behind the README's GPU figures, in one run (not yet run on a GPU; the parts'
# time limits add up to 24 minutes, most parts should need a fraction of theirs):
# correctness of the CUDA paths, `clip train` end to end on the GPU, training throughput vs open_clip
# (ViT-B/32, 224 px, batch 512, bf16 autocast), peak GPU memory at batch 256, and a profile of our step.
#
#   benchmarks/gpu_suite.sh OUT      # logs and JSON lines land in OUT/*.log; needs open_clip_torch
#
# Each part runs under its own time limit so that one failure does not cost the rest.
set -u
out=${1:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."

part() {  # part NAME SECONDS COMMAND...: run COMMAND with a time limit, log to OUT/NAME.log
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "=== $name"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -E '^\{|Error|error:' "$out/$name.log" | tail -n 30
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
bench=(benchmarks/bench_train.py --device cuda --model ViT-B/32 --precision amp_bf16 --seconds 4 --rounds 2
  --warmup 3)
part throughput 150 "$py" "${bench[@]}" --batch-size 512
part memory 150 "$py" benchmarks/bench_train.py --memory --both-checkpointing --impls ours open_clip \
  --device cuda --model ViT-B/32 --precision amp_bf16 --batch-size 256 --memory-steps 2
part profile 90 "$py" "${bench[@]}" --batch-size 512 --profile --profile-rows 30
part checks 120 "$py" benchmarks/check_gpu.py

# clip train end to end on the GPU: a tiny CSV data set, bf16, then a resume, then fp16 with a GradScaler.
data="$out/train-data"
"$py" - "$data" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root = Path(sys.argv[1])
root.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
lines = ["filepath,caption"]
for i in range(64):
    colour = ["red", "green", "blue", "yellow"][i % 4]
    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[..., {"red": 0, "green": 1, "blue": 2, "yellow": 0}[colour]] = 200
    pixels = np.clip(pixels + rng.integers(0, 40, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / f"{i}.png")
    lines.append(f"{i}.png,a {colour} square number {i}")
(root / "data.csv").write_text("\n".join(lines) + "\n")
EOF
train=("$py" -m clip train --train-data "$data/data.csv" --model ViT-Tiny/8@32px --device cuda --batch-size 16
  --no-progress --log-every 5 --save-every 10)
part train_bf16 120 "${train[@]}" --precision amp_bf16 --steps 20 --output-dir "$out/run-bf16"
part train_resume 120 "${train[@]}" --precision amp_bf16 --steps 30 --output-dir "$out/run-bf16" --resume latest
part train_fp16_compile 240 "${train[@]}" --precision amp_fp16 --compile --steps 20 --output-dir "$out/run-fp16"
tail -n 2 "$out"/run-*/metrics.jsonl

part throughput_full_text 150 "$py" "${bench[@]}" --batch-size 512 --full-text
part throughput_compiled 300 "$py" "${bench[@]}" --batch-size 512 --compile
echo "=== suite done after $SECONDS s"
