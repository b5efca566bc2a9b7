#!/usr/bin/env bash
# The GPU checks of the multi-GPU issue in one short run (a few minutes on one H100/H200), for a
# session that is lent a GPU. Writes its JSON lines and logs under $OUT (default
# benchmarks/gpu-smoke); record the figures in benchmarks/RESULTS.md with the GPU's name.
#
#   bash benchmarks/gpu_smoke.sh            # from the repository root, in the project's venv
set -euo pipefail
OUT=${OUT:-benchmarks/gpu-smoke}
PY=${PY:-python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TQDM_DISABLE=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

# 1. Stage 1's step at ~0.5B parameters in bf16, every teacher against plain CE: tokens/s, MFU
#    (--peak-tflops: 989 for H100/H200 bf16 dense).
SIZE=(--vocab 32000 --hidden 896 --layers 24 --heads 14 --kv-heads 2 --intermediate 4864 --seq 1024 --batch 8)
$PY benchmarks/lssd_step.py --device cuda --dtype bfloat16 "${SIZE[@]}" --steps 10 | tee "$OUT/lssd_step.jsonl"
# 2. The same with cpt.compile_loss (the warm-up rounds compile).
$PY benchmarks/lssd_step.py --device cuda --dtype bfloat16 "${SIZE[@]}" --steps 10 --warmup 3 --compile-loss | tee -a "$OUT/lssd_step.jsonl"

# 3. FSDP2 on one GPU (NCCL): compute_loss with a fully_shard student and the online teacher
#    following it, against the unsharded loss and gradients (the CPU test runs it on 2 processes).
$PY -m torch.distributed.run --standalone --nproc_per_node 1 tests/train/fsdp2_worker.py "$OUT" 2>"$OUT/fsdp2.log"
cat "$OUT/0.json"; echo

