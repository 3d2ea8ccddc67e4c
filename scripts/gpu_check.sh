#!/usr/bin/env bash
# One prepared run on a lent GPU (the `device` tool): the speed diagnosis (scripts/gpu_diagnose.py), GPU
# tests, then the efficiency benchmark at the paper's scale (random-weight BERT-base + ViT-B/16 at 224 px,
# Scientific-shaped synthetic data). SETTINGS=paper (one setting, not two) shortens the benchmark.
# Writes gpu.txt, diagnose.json/.log, gpu_tests.log, bench.log and efficiency/*.json under $OUT.
#   ONLY_DIAGNOSE=1 bash scripts/gpu_check.sh                                   # the diagnosis alone
#   BENCH_ARGS="--dedup-items off" DIAGNOSE_ARGS=--skip-plain bash scripts/gpu_check.sh  # extra flags per part
#   BACKBONES=tiny DATA=demo DEVICE=cpu OUT=/tmp/out \
#     DIAGNOSE_ARGS="--fft-items 8 --frozen-items 16 --cache-batch 16" bash scripts/gpu_check.sh   # dry run on a CPU
set -uo pipefail
OUT=${OUT:-/tmp/iisan-gpu-out}
mkdir -p "$OUT/efficiency"
export PYTHONPATH=$PWD
# Packages the device image lacks (lmdb), carried as wheels in .whl/ (git-ignored: pass carry=[".whl"]):
#   pip download lmdb==1.7.5 --python-version 3.12 --only-binary=:all: --no-deps -d .whl
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  python3 -c "import torch, transformers, peft, lmdb; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'lmdb', lmdb.__version__)"; } | tee "$OUT/gpu.txt"
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,power.limit,utilization.gpu,memory.used,compute_mode \
  --format=csv >> "$OUT/gpu.txt" 2>/dev/null
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv >> "$OUT/gpu.txt" 2>/dev/null
start=$(date +%s)
# where a live-backbone step spends its time, beside a plain implementation on this card
python3 scripts/gpu_diagnose.py --size "${BACKBONES:-base}" --data "${DATA:-scientific}" --device "${DEVICE:-cuda}" \
  --workers "${WORKERS:-8}" --work /tmp/iisan-bench --out "$OUT/diagnose.json" ${DIAGNOSE_ARGS:-} 2>&1 \
  | tee "$OUT/diagnose.log" | grep -E "diagnose: (plain|iisan|device)" | cut -c1-600
echo "diagnosis: $(( $(date +%s) - start )) s"
[ "${ONLY_DIAGNOSE:-0}" = 1 ] && exit 0
python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25
echo "gpu tests: $(( $(date +%s) - start )) s"
python3 scripts/benchmark_efficiency.py --backbones "${BACKBONES:-base}" --data "${DATA:-scientific}" \
  --device "${DEVICE:-cuda}" --settings "${SETTINGS:-equal,paper}" --warmup "${WARMUP:-5}" --steps "${STEPS:-20}" --num-workers "${WORKERS:-8}" \
  --work /tmp/iisan-bench --out "$OUT/efficiency" --no-plots ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" \
  | grep -E "benchmark: (equal|paper|building|cache:|wrote)|  -> |Error|error" | cut -c1-400
echo "total: $(( $(date +%s) - start )) s"
