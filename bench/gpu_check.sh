#!/usr/bin/env bash
# The GPU path in one prepared script (about 6-9 minutes on one H100/H200-class GPU):
#   1. the test suite (CUDA present: device selection, autocast and pinned transfers take their GPU branches)
#   2. the demo trained on the GPU with bf16 autocast
#   3. the fp16 path of GPUs without bf16 (V100, T4): the demo, 5 epochs, fp16 autocast with a GradScaler
#   4. training images/s and peak GPU memory, ViT-B/16-shaped backbone, batch 64, every mixer
#   5. a one-GPU torchrun (DDP with NCCL) for a few steps
# Usage (from the repository root, with the environment of README's set-up command active):
#   bash bench/gpu_check.sh [OUTDIR]
# Everything it prints is also written to OUTDIR (default runs/gpu_check) as log files.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $1"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())" | tee -a "$out/gpu.txt"

step "1/5 tests"
python -m pytest -q -x tests 2>&1 | tee "$out/tests.log" | tail -n 5 || status=1

step "2/5 demo on the GPU (bf16 autocast)"
/usr/bin/time -v python train.py --device cuda --out "$out/demo" 2>&1 | tee "$out/demo.log" | tail -n 25 || status=1

step "3/5 demo on the GPU with fp16 autocast and a GradScaler (log.jsonl: grad_scale per step)"
python train.py --device cuda --amp fp16 --epochs 5 --out "$out/demo_fp16" 2>&1 | tee "$out/demo_fp16.log" | tail -n 8 || status=1
grep -o '"grad_scale": [0-9.e+]*' "$out/demo_fp16/log.jsonl" | sort | uniq -c | tee -a "$out/demo_fp16.log" || status=1

step "4/5 training throughput and peak memory, ViT-B/16 shape, batch 64, every mixer"
python bench/train.py --devices cuda --backbones ViT-B/16 --gpu-batch 64 2>&1 | tee "$out/bench_train.log" || status=1

step "5/5 one-GPU torchrun (DDP, NCCL)"
torchrun --standalone --nproc_per_node 1 train.py --device cuda --epochs 1 --synthetic-n 512 128 128 \
    --out "$out/torchrun" 2>&1 | tee "$out/torchrun.log" | tail -n 8 || status=1

echo; echo "gpu_check: $([ $status = 0 ] && echo all steps passed || echo SOME STEP FAILED) (logs in $out)"
exit $status
