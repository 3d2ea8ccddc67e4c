#!/usr/bin/env bash
# The test suite under other software than CI's: each setting gets its own venv (made once, under
# $WORK) with the versions named, this checkout installed editable, then `pytest -q`. Needs the package
# registry (pip); a setting whose torch is not on this disk downloads a CUDA build (a few GB), which
# runs the CPU tests all the same. Logs: $WORK/<setting>.log; one summary line per setting at the end.
#
#   bash scripts/version_matrix.sh                 # every setting below
#   SETTINGS="floors" bash scripts/version_matrix.sh
#
# Settings:
#   floors   the lowest versions pyproject.toml admits: Python 3.10, torch 2.6, transformers 5.18, peft 0.15
#   gpu      the lent GPU machine's software (docs/performance.md), run on the CPU: Python 3.12, torch 2.11,
#            torchvision 0.26, transformers 5.17 (below the floor: it loads image processors through
#            torchvision, which that machine has), peft 0.21.0
#   newest   what a fresh `pip install` takes today: Python 3.11 and the newest torch the registry serves (a
#            machine-wide pip constraint, as this project's machines have, would cap it: emptied for it)
# CI itself (.ci/run) takes the newest versions in range on Python 3.11 with torch 2.13.0.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/iisan-matrix}
SETTINGS=${SETTINGS:-floors gpu newest}
# The other dependencies, named here rather than taken from pyproject.toml: the gpu setting's transformers
# is below the floor there, so the checkout goes in with --no-deps.
COMMON="safetensors lmdb pandas numpy pillow tqdm matplotlib psutil huggingface_hub>=1.0,<3 gdown>=5.2,<7 tokenizers pytest tensorboard"
mkdir -p "$WORK"

python_for() {  # a Python of that minor version that runs: pythonX.Y on the PATH, else pyenv's
  local candidate
  for candidate in "python$1" "$HOME"/.pyenv/versions/"$1".*/bin/python; do
    if "$candidate" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$1'.split('.')))" 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
}

run_setting() {
  local name=$1 py=$2 pins=$3 venv="$WORK/$1"
  local python
  python=$(python_for "$py")
  if [ -z "$python" ]; then echo "$name: no Python $py here" | tee -a "$WORK/summary.txt"; return; fi
  if [ ! -x "$venv/bin/pytest" ]; then
    "$python" -m venv "$venv" && "$venv/bin/pip" install -q $pins $COMMON >"$WORK/$name.install.log" 2>&1 \
      || { echo "$name: install failed ($WORK/$name.install.log)" | tee -a "$WORK/summary.txt"; return; }
  fi
  "$venv/bin/pip" install -q --no-deps -e . >>"$WORK/$name.install.log" 2>&1
  local versions
  versions=$("$venv/bin/python" -c "import platform, torch, transformers, peft; print('python', platform.python_version(), 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)")
  "$venv/bin/python" -m pytest -q -p no:cacheprovider >"$WORK/$name.log" 2>&1
  echo "$name ($versions): $(tail -n 1 "$WORK/$name.log")" | tee -a "$WORK/summary.txt"
}

: >"$WORK/summary.txt"
echo "commit $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo +dirty)" | tee -a "$WORK/summary.txt"
for setting in $SETTINGS; do
  case $setting in
    floors) run_setting floors 3.10 "torch==2.6.0 transformers==5.18.0 peft==0.15.0 tomli" ;;
    gpu) run_setting gpu 3.12 "torch==2.11.0 torchvision==0.26.0 transformers==5.17.0 peft==0.21.0" ;;
    newest) PIP_CONSTRAINT=/dev/null run_setting newest 3.11 "torch transformers<6 peft<1" ;;
    *) echo "unknown setting $setting (floors, gpu, newest)"; exit 2 ;;
  esac
done
