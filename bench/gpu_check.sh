#!/usr/bin/env bash
# The GPU path in one prepared script (about 10-15 minutes on one H100/H200-class GPU). Every step runs
# whatever the previous ones gave; a failed step is reported and the script goes on:
#   1. the test suite pinned to the CPU (CUDA hidden: every exactness test as on the development machine),
#      then with the GPU visible (device selection, autocast, pinned copies take their CUDA branches),
#      leaving out the tests that compare runs bit for bit or to 1e-6, which CUDA's atomic adds in backward
#      and bf16 do not give
#   2. the demo trained on the GPU with bf16 autocast
#   3. the fp16 path of GPUs without bf16 (V100, T4): the demo, 5 epochs, fp16 autocast with a GradScaler
#   4. training images/s and peak GPU memory, ViT-B/16-shaped backbone, batch 64, every mixer
#   5. one-GPU torchrun (DDP with NCCL: train.py wraps the model whenever torchrun starts it), with the
#      default losses and with an ablation that leaves a head without gradient (--uncertainty-weight 0)
#   6. the memory bench's prediction (bytes kept for backward, counted on the CPU) against the GPU's
#      torch.cuda.max_memory_allocated, ViT-B/16 and ViT-L/14@336, bf16, with and without checkpointing
#   7. the loader: decode + augment images/s per worker, and train.py's images/s on JPEGs against
#      bench/train.py's on device tensors (the ratio says whether the loader or the model bounds a run)
#   8. the anchored feedback's cost: training step and evaluation forward against reread's
# Usage (from the repository root, with the environment of README's set-up command active):
#   bash bench/gpu_check.sh [OUTDIR]
# Everything it prints is also written to OUTDIR (default runs/gpu_check) as log files.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=()
# check NAME LOG COMMAND...: run COMMAND, its output into $out/LOG (last lines shown); a failure is noted
check() {
    local name=$1 log=$2 start=$SECONDS
    shift 2
    echo; echo "=== $name"
    "$@" > "$out/$log" 2>&1
    local status=$?
    tail -n 12 "$out/$log"
    echo "--- $name: $([ $status = 0 ] && echo ok || echo "FAILED (exit $status)") in $((SECONDS - start)) s"
    [ $status = 0 ] || failed+=("$name")
}
# tests that compare two runs bit for bit or to 1e-6 (train.py/eval.py pick the GPU when it is visible)
exact="resume or torchrun or accumulation or agree or rerun or absolute or fp16_path"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())" | tee -a "$out/gpu.txt"

check "1a/8 tests, CPU only" tests_cpu.log env CUDA_VISIBLE_DEVICES= python -m pytest -q tests
check "1b/8 tests, GPU visible, exactness tests left to 1a" tests_gpu.log python -m pytest -q tests -k "not ($exact)"
check "2/8 demo on the GPU (bf16 autocast)" demo.log python train.py --device cuda --out "$out/demo"
check "3/8 demo with fp16 autocast and a GradScaler" demo_fp16.log \
    python train.py --device cuda --amp fp16 --epochs 5 --out "$out/demo_fp16"
grep -o '"grad_scale": [0-9.e+]*' "$out/demo_fp16/log.jsonl" | sort | uniq -c | tee -a "$out/demo_fp16.log"
check "4/8 training throughput and peak memory, ViT-B/16 shape, batch 64, every mixer" bench_train.log \
    python bench/train.py --devices cuda --backbones ViT-B/16 --gpu-batch 64
check "5a/8 one-GPU torchrun (DDP, NCCL)" torchrun.log \
    torchrun --standalone --nproc_per_node=1 train.py --device cuda --epochs 1 --synthetic-n 512 128 128 \
    --out "$out/torchrun"
check "5b/8 one-GPU torchrun, a head without gradient" torchrun_ablation.log \
    torchrun --standalone --nproc_per_node=1 train.py --device cuda --epochs 1 --synthetic-n 512 128 128 \
    --uncertainty-weight 0 --out "$out/torchrun_ablation"
check "6/8 memory: CPU count against max_memory_allocated" memory.log \
    python bench/memory.py --models ViT-B/16 ViT-L/14@336 --precisions bf16 --threads 8 --measure-cuda 32
check "7a/8 loader: decode + augment images/s per worker" loader.log \
    python bench/data.py --per-worker --worker-counts 1 4 8 --n 1000 --threads 1
check "7b/8 loader against model: ViT-B/16, batch 64, JPEGs of 200 px" loader_ratio.log \
    python bench/data.py --ratio --backbone ViT-B/16 --device cuda --size 200 --n 4096 --batch-size 64
check "8/8 the anchored feedback against reread: step and evaluation time" anchored.log \
    python bench/train.py --feedback-designs --devices cuda

echo
if [ ${#failed[@]} = 0 ]; then
    echo "gpu_check: all steps passed (logs in $out)"
else
    printf 'gpu_check: FAILED: %s\n' "${failed[@]}"
    echo "(logs in $out)"
fi
[ ${#failed[@]} = 0 ]
