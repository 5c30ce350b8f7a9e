#!/usr/bin/env bash
# The GPU check, one command: CUDA tests, then qlorakit vs TRL SFTTrainer (and TRL + Liger) on randomly initialised
# LLaMA-2-7B and Llama-3-8B shapes, NF4 double-quant, LoRA r 16 on all linear layers, dropout 0, bf16, packed
# 2,048-token rows (the same rows for every tool). Results go to $OUT as each part finishes:
#   gpu.json   {"device", "job", "tools": {qlorakit, trl, trl_liger}: tokens/s, peak GPU memory, step-0 loss, MFU,
#              "shapes": {...}, "checks": {...}, "pytest_cuda": {...}}
#   gpu.md     a README table fragment
#   run.log    everything this script printed;  parts.log   the last lines of every part's own log
#
# On the GPU machine (device tool), wheels fetched here first with benchmarks/gpu/fetch_wheels.sh:
#   bash benchmarks/gpu/run.sh                         carry [".whl"], timeout_s 600; about 6 to 7 minutes
# On a CPU, the same parts on a tiny model (everything up to the CUDA calls; Liger skipped):
#   PYTHON=.venv/bin/python bash benchmarks/gpu/run.sh --tiny --device cpu
#
# Options: --shapes "llama2-7b llama3-8b"  --budget SECONDS (450: no part starts later, each is cut to what is left)
set -u -o pipefail
cd "$(dirname "$0")/../.."
TINY=0; DEVICE=cuda; SHAPES="llama2-7b llama3-8b"; BUDGET=450
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1; SHAPES=tiny ;;
    --device) DEVICE=$2; shift ;;
    --shapes) SHAPES=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/benchmarks/gpu/out}
PARTS=${PARTS:-/tmp/qlorakit_gpu_parts}
TINYFLAG=$([ "$TINY" = 1 ] && echo --tiny || true)
rm -rf "$PARTS"; mkdir -p "$OUT" "$PARTS"
exec > >(tee -a "$OUT/run.log") 2>&1
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "run.sh: device $DEVICE, shapes $SHAPES, budget ${BUDGET}s, out $OUT"

if [ "$DEVICE" = cuda ] && ls .whl/*.whl >/dev/null 2>&1; then  # the wheels are for the GPU machine's Python 3.12
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
  [ -d .whl/tokenizer ] && export QLORAKIT_TEST_TOKENIZER=$PWD/.whl/tokenizer  # for the CUDA tests' tiny models
else
  echo "using the packages installed here (no wheels installed)"
  export PYTHONPATH=$PWD/src
fi

elapsed() { echo $(( $(date +%s) - START )); }

report() {
  "$PY" benchmarks/gpu/report.py build --parts "$PARTS" --out "$OUT" $TINYFLAG || echo "report failed"
  for f in "$PARTS"/*.log; do echo "== $(basename "$f")"; tail -n 15 "$f"; done > "$OUT/parts.log" 2>/dev/null
}

# part NAME LIMIT CMD...: run CMD with at most LIMIT seconds (less if the budget has less), log to PARTS/NAME.log.
part() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - $(elapsed) ))
  if [ "$left" -lt 30 ]; then echo "== $name: skipped (time budget spent)"; echo "skipped: time budget" \
    > "$PARTS/$name.log"; return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit}s, ${left}s of the budget left)"
  timeout --kill-after=15 "$limit" "$@" > "$PARTS/$name.log" 2>&1
  local rc=$?
  tail -n 2 "$PARTS/$name.log"
  echo "== $name: exit $rc at $(elapsed)s"
  report
  return $rc
}

part env 60 "$PY" benchmarks/gpu/report.py env --out "$PARTS/env.json" --device "$DEVICE"
part pytest 120 "$PY" -m pytest -m cuda tests -p no:cacheprovider -rfEs \
  --continue-on-collection-errors --junitxml="$PARTS/pytest.xml"

MODELS=/dev/shm
[ -w /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR==2 {print $4}')" -gt 20000000 ] || MODELS=/tmp
for shape in $SHAPES; do
  dir="$MODELS/qlorakit_bench_$shape"
  part "$shape-model" 150 "$PY" benchmarks/gpu/make_model.py --shape "$shape" --out "$dir" --device "$DEVICE" \
    --report "$PARTS/$shape-model.json" || { rm -rf "$dir"; continue; }
  part "$shape-qlorakit" 150 "$PY" benchmarks/gpu/qlorakit_job.py --model "$dir" --device "$DEVICE" $TINYFLAG \
    --out "$PARTS/$shape-qlorakit.json"
  part "$shape-trl" 150 "$PY" benchmarks/gpu/trl_job.py --model "$dir" --device "$DEVICE" $TINYFLAG \
    --out "$PARTS/$shape-trl.json"
  if [ "$DEVICE" = cuda ]; then
    part "$shape-trl_liger" 150 "$PY" benchmarks/gpu/trl_job.py --model "$dir" --device "$DEVICE" --liger \
      $TINYFLAG --out "$PARTS/$shape-trl_liger.json"
  else
    echo "skipped: Liger's kernels are Triton, CUDA only" > "$PARTS/$shape-trl_liger.log"
  fi
  rm -rf "$dir"
done
report
if [ "$DEVICE" = cuda ]; then  # GPU figures only: the CPU dry run's numbers are no benchmark
  mkdir -p benchmarks/results && cp "$OUT/gpu.json" benchmarks/results/gpu.json
fi
echo "run.sh: done in $(elapsed)s; $OUT/gpu.json, $OUT/gpu.md"
cat "$OUT/gpu.md"
