#!/usr/bin/env bash
# The first-GPU check (issue 16): one script, under 8 minutes on an H100/H200, that
#   1. runs the inference, engine and API tests on CUDA (TEST_DEVICE=cuda, tests/helpers.py),
#   2. serves a random gpt2-124m and gpt2-350m in bf16 with our engine, and with vLLM's engine
#      (our server, ML_SERVICE_ENGINE=vllm) where vllm imports or a carried wheel installs,
#      and runs the serving benchmark (bench/serve_bench.py) at 1/16/64 clients,
#   3. runs 50 training steps of gpt2-124m in bf16 (train_distributed.py: tokens/s and MFU),
# writing everything under one folder ($OUT when set, else runs/gpu_check/<date>) with a
# summary.md. Every stage has its own time limit; a stage that fails or is skipped is written
# into the summary and the others still run.
#
#   bench/gpu_check.sh                          # on the GPU host, from anywhere
#   GPU_CHECK_DRY_RUN=1 bench/gpu_check.sh      # every stage at tiny sizes on the CPU (~2 min)
#   bench/gpu_check.sh --fetch-wheels           # here, with network: the service's packages a
#                                               # bare torch+transformers image lacks, into .whl/
#
# Where .whl/ holds wheels (a device call carries it: `carry: [".whl"]`), they are installed into
# /tmp/site first and put on PYTHONPATH (pip --no-index --no-deps: nothing is fetched there).
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

# what the GPU image lacks (bare torch, transformers, accelerate, numpy, pytest, httpx...): the
# HTTP service, its settings and limits, the training corpus; pinned to the versions tested here
WHEELS=(
  fastapi==0.165.0 starlette==1.10.0 fastapi_offline==1.7.7 annotated-doc==0.0.7
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0
  typing-inspection==0.4.5 python-dotenv==1.2.4 python-multipart==0.0.34
  uvicorn==0.54.0 h11==0.16.0 anyio==4.16.0 sniffio==1.3.1
  limits==5.8.0 Deprecated==1.3.1 redis==8.1.0 prometheus_client
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 rl_wsd_labeled==0.1.1
)

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p .whl
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi

DRY=${GPU_CHECK_DRY_RUN:-0}
# a device call brings back at most 8 files from $OUT: there the stages write into a work folder,
# and $OUT gets summary.md and one gpu_check.tar.gz of everything
OUTDIR=$ROOT/runs/gpu_check/$(date +%Y%m%d-%H%M%S)
[ -n "${OUT:-}" ] && OUTDIR=/tmp/gpu_check
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
SUMMARY=$OUTDIR/summary.md
START=$(date +%s)

if [ -x "$ROOT/.venv/bin/python" ] && [ "$DRY" = 1 ]; then
  PY=$ROOT/.venv/bin/python
else
  PY=${PYTHON:-python3}
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

if [ "$DRY" = 1 ]; then
  DEVICE=cpu DTYPE=float32 PRECISION_FLAG=
  PRESETS=(tiny) TRAIN_PRESET=tiny CLIENTS=(1 4) NEW_TOKENS=8 PER_CLIENT=1 MIN_REQUESTS=2
  TRAIN_STEPS=3 TRAIN_ARGS=(--batch-size 2 --block-size 64 --threads 2)
  TEST_ARGS=(-k "logits_equal or greedy")
  T_TESTS=120 T_SERVE=90 T_TRAIN=90
else
  DEVICE=cuda DTYPE=bfloat16 PRECISION_FLAG=--bf16
  PRESETS=(gpt2-124m gpt2-350m) TRAIN_PRESET=gpt2-124m CLIENTS=(1 16 64) NEW_TOKENS=64
  PER_CLIENT=2 MIN_REQUESTS=16 TRAIN_STEPS=50 TRAIN_ARGS=(--batch-size 16 --block-size 1024)
  TEST_ARGS=()
  T_TESTS=150 T_SERVE=75 T_TRAIN=110
fi

note() { echo "$*" | tee -a "$SUMMARY"; }

# run NAME SECONDS CMD...: the command's output into NAME.log, its outcome into the summary
run() {
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0))
  case $rc in
    0) note "- $name: ok (${took}s)" ;;
    124 | 137) note "- $name: TIMED OUT after ${limit}s (log: $name.log)" ;;
    *) note "- $name: FAILED, exit $rc (${took}s; log: $name.log)" ;;
  esac
  return $rc
}

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  [ "$DRY" = 1 ] && echo "DRY RUN (GPU_CHECK_DRY_RUN=1): tiny sizes on the CPU, not a measurement."
  echo "device $DEVICE, dtype $DTYPE, output $OUTDIR"
  echo
} >"$SUMMARY"

# -- 0. wheels carried in .whl/ and the environment ---------------------------------------------
if compgen -G "$ROOT/.whl/*.whl" >/dev/null && [ "$DRY" != 1 ]; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$ROOT"/.whl/*.whl >"$OUTDIR/wheels.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    note "- wheels: installed $(find "$ROOT/.whl" -name '*.whl' | wc -l) from .whl/ into /tmp/site"
  else
    note "- wheels: install FAILED (wheels.log)"
  fi
fi
run env 60 bash -c "nvidia-smi || echo 'no nvidia-smi'; \"$PY\" -c '
import torch, transformers, importlib.util as u
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available())
print(*(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
print(\"transformers\", transformers.__version__)
for m in (\"fastapi\", \"uvicorn\", \"datasets\", \"vllm\", \"deepspeed\"):
    print(m, \"yes\" if u.find_spec(m) else \"MISSING\")
'"
MISSING=$("$PY" -c 'import importlib.util as u; print(*(m for m in ("fastapi", "uvicorn", "pydantic_settings", "httpx") if not u.find_spec(m)))')
if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  note "- no CUDA device: every stage below would measure the CPU; stopping (GPU_CHECK_DRY_RUN=1 is the CPU rehearsal)"
  exit 1
fi

# -- 1. tests on the device ------------------------------------------------------------------------
if [ -n "$MISSING" ]; then
  note "- tests: skipped, missing $MISSING (bench/gpu_check.sh --fetch-wheels, then carry .whl)"
else
  run tests "$T_TESTS" env TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$OUTDIR/tests.xml" tests/lib/inference/test_inference.py \
    tests/lib/inference/test_engine.py tests/ml_service/backend/test_api.py \
    "${TEST_ARGS[@]}"
  grep -E "passed|failed|error" "$OUTDIR/tests.log" | tail -1 | sed 's/^/  /' >>"$SUMMARY"
fi

# -- 2. serving: random checkpoints, our engine and vLLM's, 1/16/64 clients ----------------------
VLLM_VENV=""
if "$PY" -c 'import vllm' >/dev/null 2>&1; then
  VLLM_VENV=/tmp/vllm-venv
  "$PY" -m venv --system-site-packages "$VLLM_VENV" >/dev/null 2>&1 || VLLM_VENV=""
elif compgen -G "$ROOT/.whl/vllm-*.whl" >/dev/null; then
  VLLM_VENV=/tmp/vllm-venv
  if ! { "$PY" -m venv --system-site-packages "$VLLM_VENV" &&
    timeout 120 "$VLLM_VENV/bin/python" -m pip install -q --no-index --find-links "$ROOT/.whl" vllm; } \
    >"$OUTDIR/vllm-install.log" 2>&1; then
    note "- vllm: its carried wheel did not install (vllm-install.log); vLLM skipped"
    VLLM_VENV=""
  fi
fi
if [ -z "$VLLM_VENV" ]; then
  note "- vllm: skipped (not importable and no .whl/vllm-*.whl; its wheel is larger than what a call carries)"
fi
if [ "$DRY" = 1 ]; then
  VLLM_VENV="" # the CPU rehearsal measures our engine only
fi

for preset in "${PRESETS[@]}"; do
  ckpt=$ROOT/runs/bench/random-$preset
  if [ ! -f "$ckpt/model.safetensors" ]; then
    run "checkpoint-$preset" 120 "$PY" bench/random_checkpoint.py --preset "$preset" --out "$ckpt" ||
      continue
  fi
  if [ -n "$MISSING" ]; then
    note "- serve-$preset: skipped, missing $MISSING"
    continue
  fi
  systems=(ours)
  [ -n "$VLLM_VENV" ] && systems+=(ours-vllm)
  for system in "${systems[@]}"; do
    limit=$T_SERVE
    [ "$system" = ours-vllm ] && limit=$((T_SERVE + 60)) # vLLM compiles at its first start
    run "serve-$preset-$system" "$limit" "$PY" bench/serve_bench.py --checkpoint "$ckpt" \
      --device "$DEVICE" --dtype "$DTYPE" --systems "$system" ${VLLM_VENV:+--vllm-venv "$VLLM_VENV"} \
      --concurrency "${CLIENTS[@]}" --requests-per-client "$PER_CLIENT" \
      --min-requests "$MIN_REQUESTS" --max-new-tokens "$NEW_TOKENS" --stream --warmup-burst 2 \
      --wait-quiet 0 --retries 0 --json "$OUTDIR/serve-$preset-$system.json"
    grep -E "^ +$system +c=" "$OUTDIR/serve-$preset-$system.log" | sed 's/^ */  /' >>"$SUMMARY"
  done
done

# -- 3. training: 50 steps of gpt2-124m in bf16 ----------------------------------------------------
if "$PY" -c 'import datasets, rl_wsd_labeled' >/dev/null 2>&1; then
  run "train-$TRAIN_PRESET" "$T_TRAIN" "$PY" train_distributed.py --preset "$TRAIN_PRESET" \
    $PRECISION_FLAG --device "$DEVICE" --max-steps "$TRAIN_STEPS" --eval-every 0 \
    --eval-batches 1 --report-to none --no-progress --output-dir "$OUTDIR/train" "${TRAIN_ARGS[@]}"
  grep -E "^final:" "$OUTDIR/train-$TRAIN_PRESET.log" | sed 's/^/  /' >>"$SUMMARY"
  card=$(find "$OUTDIR/train" -name training_card.json 2>/dev/null | head -1)
  if [ -n "$card" ]; then
    cp "$card" "$OUTDIR/train-card.json"
    "$PY" -c 'import json, sys; c = json.load(open(sys.argv[1]))
print("  throughput (last window):", c.get("throughput"), "|", c.get("device"), c.get("precision"))' \
      "$card" >>"$SUMMARY"
  fi
  rm -rf "$OUTDIR/train" # the weights of 50 steps: not worth carrying back
else
  note "- train-$TRAIN_PRESET: skipped, datasets or rl_wsd_labeled missing (--fetch-wheels)"
fi

note ""
note "total $(($(date +%s) - START))s; logs and JSON in $OUTDIR"
if [ -n "${OUT:-}" ]; then
  cp "$SUMMARY" "$OUT/summary.md"
  tar -czf "$OUT/gpu_check.tar.gz" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")"
fi
