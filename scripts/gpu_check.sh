#!/usr/bin/env bash
# One prepared run on a lent GPU (the `device` tool), in this order (docs/performance.md says what to read):
#   0. data: the Scientific-shaped synthetic data and random-weight encoders under $WORK (made once, ~30 s on
#      a bare machine; kept on a warm one), outside the measuring parts' limits; cut at 60 s
#   1. diagnose: where a live step's time goes (scripts/gpu_diagnose.py: fresh vs seen vs fixed vs bucketed
#      shapes, host enqueue vs device step, allocator, GPU busy and top kernels, the image pipeline alone
#      and in the background, a plain reference at the same item counts); cut at 210 s
#   2. bench: the efficiency benchmark at the paper's scale (random-weight BERT-base + ViT-B/16 at 224 px,
#      Scientific-shaped synthetic data, baselines at batch 32, IISAN at 64): the cache build (in bf16, as
#      the plain reference's; CACHE_DTYPE=auto for the authors' fp32; float32 with DEVICE=cpu, where bf16 is
#      emulated and slow) and the full-ranking evaluation of
#      every user, then the six methods with 10 warm-up and 50 timed steps each (IISAN first, a real epoch
#      of both IISAN settings), then uncached IISAN and FFT the authors' way (every slot); FLOPs counted
#      over the first 10 timed batches; cut at 280 s
#   3. tests: the GPU-marked tests; cut at 150 s
#   4. versa: IISAN-Versa's GPU checks (scripts/versa_gpu_check.py, versa_gpu.json); cut at 120 s
# Each part writes as it goes (diagnose.json after each section, the benchmark's JSON and table after each
# row), so a part that is cut keeps what it measured (each cut is killed 5 s after its signal; the console's
# lines are not held back in a pipe). PART=all (default) runs diagnose and bench, under 600 s with the data
# and the setup (60 + 210 + 280 s and 3 x 5 s at most), one device call (a call's limit) that brings back
# 7 files (a call brings back at most 8);
# the device's copy of the checkout has no .git: IISAN_COMMIT=<hash> names the commit measured;
# PART=diagnose|bench|tests|versa runs one part. Writes gpu.txt (versions, clocks, each part's time and exit),
# diagnose.json/.log, efficiency/*.json/.md, figs/*.png, bench.log, gpu_tests.log, versa_gpu.json/.log under $OUT.
#   PART=all bash scripts/gpu_check.sh; then PART=tests bash scripts/gpu_check.sh   # the two device calls
#   BENCH_ARGS="--no-static-shapes" DIAGNOSE_ARGS=--skip-plain bash scripts/gpu_check.sh   # extra flags per part
#   METHODS="IISAN (cached),FFT" AUTHORS_WAY=none FULL_EPOCH="IISAN (cached)" PART=bench ...   # fewer rows
#   TESTS_ARGS="-k 'not torchrun'" PART=tests bash scripts/gpu_check.sh                      # fewer tests
#   PYTHON=.venv/bin/python BACKBONES=tiny DATA=demo DEVICE=cpu OUT=/tmp/out WORK=/tmp/iisan-dry DIAGNOSE_ARGS="--fft-items 8 \
#     --frozen-items 16 --cache-batch 16 --shape-reps 2 --reps 2" BENCH_ARGS="--few-steps --warmup 1 --steps 2" \
#     DIAGNOSE_LIMIT=900 BENCH_LIMIT=900 bash scripts/gpu_check.sh       # a dry run on a CPU (2 idle cores: ~2.5 min)
# Exit status: 2 for a bad PART or a missing lmdb, else the first part's non-zero exit (124: cut), else 0.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2  # the repository root, wherever it is started from
PY=${PYTHON:-python3}  # the device image's python; here, e.g. PYTHON=.venv/bin/python
OUT=${OUT:-/tmp/iisan-gpu-out}
WORK=${WORK:-$PWD/bench_data}  # ignored; kept between calls on a warm machine
PART=${PART:-all}
if [ "${DEVICE:-cuda}" = cpu ]; then CACHE_DTYPE=${CACHE_DTYPE:-float32}; fi  # bf16 is emulated (slow) on a CPU
[ "${ONLY_DIAGNOSE:-0}" = 1 ] && PART=diagnose  # the older switch
case "$PART" in all|diagnose|bench|tests|versa) ;; *) echo "gpu_check: PART=$PART; expected all, diagnose, bench, tests or versa"; exit 2;; esac
mkdir -p "$OUT/efficiency"
export PYTHONPATH=$PWD
# Packages the device image lacks (lmdb), carried as wheels in .whl/ (git-ignored: pass carry=[".whl"]):
#   pip download lmdb==3.0.0 --python-version 3.12 --only-binary=:all: --no-deps -d .whl
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
"$PY" -c "import lmdb" 2>/dev/null || { echo "gpu_check: lmdb does not import in $PY; on a lent GPU carry its wheel \
(.whl/, above), elsewhere use the project's environment (PYTHON=.venv/bin/python)"; exit 2; }
export PYTHONUNBUFFERED=1
LINED=$(command -v stdbuf >/dev/null 2>&1 && echo "stdbuf -oL")  # cut passes each line on at once: a call cut at its limit keeps them
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  "$PY" -c "import torch, transformers, peft, lmdb; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'lmdb', lmdb.__version__)";
  git log -1 --format="commit %h %s" 2>/dev/null || echo "commit ${IISAN_COMMIT:-unknown (no .git here; pass IISAN_COMMIT)}"
} | tee -a "$OUT/gpu.txt"
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,power.limit,utilization.gpu,memory.used,compute_mode \
  --format=csv >> "$OUT/gpu.txt" 2>/dev/null
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv >> "$OUT/gpu.txt" 2>/dev/null
start=$(date +%s)
status=0
stamp() {  # stamp PART EXIT: the part's time and exit in gpu.txt; the first failure is the script's exit
  echo "$1 (exit $2): $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
  [ "$status" = 0 ] && status=$2
}

if [ "$PART" != tests ] && [ "$PART" != versa ]; then  # the data both parts read, made before either's clock starts
  timeout -k 5 "${PREPARE_LIMIT:-60}" "$PY" -c "import sys; from pathlib import Path
from iisan.console import setup_logging; setup_logging()
from iisan.efficiency.benchmark import prepare; prepare(Path(sys.argv[1]), sys.argv[2], sys.argv[3])" \
    "$WORK" "${DATA:-scientific}" "${BACKBONES:-base}" 2>&1 | tail -n 5 | $LINED cut -c1-400
  stamp data "${PIPESTATUS[0]}"
fi
if [ "$PART" = all ] || [ "$PART" = diagnose ]; then
  timeout -k 5 "${DIAGNOSE_LIMIT:-210}" "$PY" scripts/gpu_diagnose.py --size "${BACKBONES:-base}" \
    --data "${DATA:-scientific}" --device "${DEVICE:-cuda}" --num-workers "${WORKERS:-8}" --work "$WORK" \
    --out "$OUT/diagnose.json" ${DIAGNOSE_ARGS:-} 2>&1 \
    | tee "$OUT/diagnose.log" | grep --line-buffered -E "diagnose: (plain|iisan|device)|rror" | $LINED cut -c1-600
  stamp diagnosis "${PIPESTATUS[0]}"
fi
if [ "$PART" = all ] || [ "$PART" = bench ]; then
  timeout -k 5 "${BENCH_LIMIT:-280}" "$PY" scripts/benchmark_efficiency.py --backbones "${BACKBONES:-base}" \
    --data "${DATA:-scientific}" --device "${DEVICE:-cuda}" --settings "${SETTINGS:-paper}" \
    --cache-dtype "${CACHE_DTYPE:-bfloat16}" \
    --methods "${METHODS:-IISAN (cached),IISAN (uncached),FFT,Adapter,LoRA,BitFit}" \
    --authors-way "${AUTHORS_WAY:-IISAN (uncached),FFT}" --full-epoch "${FULL_EPOCH:-IISAN (uncached),IISAN (cached)}" \
    --flop-batches "${FLOP_BATCHES:-10}" --num-workers "${WORKERS:-8}" --work "$WORK" --out "$OUT/efficiency" \
    --figs "$OUT/figs" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" \
    | grep --line-buffered -E "benchmark: (equal|paper|building|evaluating|wrote)|  -> |rror" | $LINED cut -c1-400
  stamp benchmark "${PIPESTATUS[0]}"
  rm -f "$OUT/efficiency/benchmark.log"  # the benchmark's own log: its lines are bench.log's (a call brings back 8 files)
fi
if [ "$PART" = tests ]; then
  eval "set -- ${TESTS_ARGS:-}"  # pytest's own quoting, e.g. -k 'not torchrun'
  timeout -k 5 "${TESTS_LIMIT:-150}" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/ "$@" 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -n 25
  stamp "gpu tests" "${PIPESTATUS[0]}"
fi
if [ "$PART" = versa ]; then  # a bf16 decoder-LLM tower's cache against the CPU's, a resumed build, a CUDA graph
  timeout -k 5 "${VERSA_LIMIT:-120}" "$PY" scripts/versa_gpu_check.py --device "${DEVICE:-cuda}" --out "$OUT" \
    --work "$WORK/versa-gpu" 2>&1 | tee "$OUT/versa_gpu.log" | grep --line-buffered -E "versa_gpu_check.py: |Error" | $LINED cut -c1-400
  stamp "versa check" "${PIPESTATUS[0]}"
fi
exit "$status"
