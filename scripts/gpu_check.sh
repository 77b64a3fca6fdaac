#!/usr/bin/env bash
# The GPU check: what a first real GPU run needs, on one CUDA GPU in one command of at most 8
# minutes (the step limits add up to 460 s; sized for an H100 / H200). A table row is printed as
# each step ends, so a run cut short still shows what passed; every step keeps its own log under
# $OUT (default out/gpu_check), rewritten when the step runs again.
#
#   bash scripts/gpu_check.sh                   # on the GPU machine, from anywhere
#   STEPS=8b,toy bash scripts/gpu_check.sh      # some steps only: tests,precision,build,probe,8b,bench,toy
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh   # the same steps at tiny widths on CPU, the 8b steps on 2
#                                               # gloo ranks under torchrun (the suite runs this)
#   BUDGET=300 bash scripts/gpu_check.sh        # skip (and fail) a step whose limit would end past 300 s from
#                                               # the start (default 480; four times that in a dry run)
#
# Steps (limit in seconds on a GPU)
#   tests      45  the suite's CUDA tests (pytest -m cuda: the kernel on CUDA against float64, bf16 rounding)
#   precision  40  the fused kernel at bf16, N=8192 H=4096 V=128256: errors against the fp32 path at several
#                  chunk sizes, the weight gradient rounded once whatever the chunk, host syncs per call
#   build      45  a 2-layer Llama-3.1-8B-shaped policy and reward model (random; real hidden size, heads and
#                  vocabulary) and 8 preference pairs of ~4k tokens
#   probe      50  plain `python train.py --deterministic` on one GPU: no torchrun (a process group of one)
#                  and no CUBLAS_WORKSPACE_CONFIG set by the user; both must work
#   8b     50+70+20  DPO and one MetaAPO iteration of the 8B-shaped models on FSDP2 in bf16 under torchrun
#                  (2 ranks where the machine has 2 GPUs: micro-batches of one tuple of unequal lengths), then
#                  tokens/s, MFU and peak memory beside the --dry_run plan of the same shapes
#   bench      40  scripts/bench_kernel.py at bf16, 8192 tokens, H=4096, V=128256: naive, torch's op where
#                  present, ours at several chunk sizes (time, TFLOP/s as 8NHV/time, peak extra memory)
#   toy       100  the toy pipeline on CUDA (transformers generator) from no out/ at all, stopped by SIGTERM
#                  during MetaAPO's training and resumed with --resume to the end
# A step passes by its exit status; the row's last column is the line of its log that says most.
set -uo pipefail
STARTED=$SECONDS  # the budget counts the whole command, set-up included
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY:-0}
OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export OUT GPU_CHECK_DRY=$DRY PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}  # the interpreter with torch and this project's requirements
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
RANKS=$([ "$DRY" = 1 ] || [ "${GPUS:-0}" -ge 2 ] && echo 2 || echo 1)
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node $RANKS"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0

want() { [[ ",${STEPS:-tests,precision,build,probe,8b,bench,toy}," == *",$1,"* ]]; }
row() { printf '%-22s %-10s %5ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"; }
step() {  # step NAME LIMIT PATTERN CMD...: run CMD into $OUT/NAME.log, PASS by exit status; the log's last line matching PATTERN as the note
  local name=$1 limit=$(($2 * LIMIT_SCALE)) pattern=$3 t=$SECONDS log="$OUT/$1.log"
  shift 3
  if [ $((SECONDS + limit)) -gt "$DEADLINE" ]; then
    FAILED=1
    row "$name" SKIPPED 0 "its ${limit} s limit would end past the budget (BUDGET=${BUDGET:-480}); rerun with STEPS="
    return
  fi
  echo "=== $name: $*" >"$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  [ $rc = 0 ] || FAILED=1
  row "$name" "$([ $rc = 0 ] && echo PASS || echo "FAIL rc=$rc")" $((SECONDS - t)) \
    "$(tr '\r' '\n' <"$log" | { grep -E "$pattern" || tr '\r' '\n' <"$log" | grep -v '^\s*$'; } | tail -1 | cut -c1-90)"
}

LIMIT_SCALE=1  # the limits guard a GPU session's minutes; a dry run on a busy CPU gets four times as long
if [ "$DRY" = 1 ]; then  # tiny shapes on CPU: the same steps, in seconds
  LIMIT_SCALE=4
  LAYERS=2
  BENCH=(--devices cpu --shape 512,64,2048 --dtype float32 --chunk_sizes 64 --repeats 1)
  LENGTHS=(--max_prompt_len=160 --max_len=512 --max_new_tokens=8)
  TOY=(--max_train_pairs=64 --iterations=2 --eval_prompts=8 --eval_samples=1 --sft_epochs=1 --batch_size=16
    --micro_batch_size=16 --rm_batch_size=16 --gen_batch_size=64 --save_every=1000)
else
  LAYERS=2
  BENCH=(--devices cuda --chunk_sizes 64,256,1024,4096 --repeats 3)
  LENGTHS=(--max_prompt_len=1200 --max_len=4096 --max_new_tokens=16)
  TOY=(--max_train_pairs=192 --iterations=2 --eval_prompts=32 --eval_samples=2 --sft_epochs=1 --batch_size=16
    --micro_batch_size=8 --rm_batch_size=16 --gen_batch_size=64)
fi
DEADLINE=$((STARTED + ${BUDGET:-480} * LIMIT_SCALE))
M="$WORK/m8b"
COMMON=(--model="$M/policy" --reward_model="$M/rm" --dataset="$M/data" "${LENGTHS[@]}" --max_train_pairs=8
  --batch_size=2 --micro_batch_size=1 --save_every=1000 --save_minutes=0)

{
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  $PY -c "import torch, transformers, torch.nn.functional as F; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA', \
'| F.linear_cross_entropy:', hasattr(F, 'linear_cross_entropy'))"
  $PY -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1
} >"$OUT/env.log" 2>&1
{
  echo "GPU check $( [ "$DRY" = 1 ] && echo '(dry run: tiny widths on CPU)' ), $RANKS rank(s) under torchrun, logs in $OUT"
  sed -n 1,3p "$OUT/env.log"
  printf '%-22s %-10s %6s  %s\n' step result time note
} | tee -a "$SUMMARY"

# 1. the suite's CUDA tests; in a dry run they are skipped (no GPU), which passes
if want tests; then
  if [ "$DRY" = 1 ]; then
    step cuda_tests 45 'passed|skipped|deselected' $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_losses.py
  else
    step cuda_tests 45 'passed|failed' bash -c "$PY -c 'import torch; assert torch.cuda.is_available()' \
      && $PY -m pytest -q -p no:cacheprovider -m cuda -rA tests && ! grep -q SKIPPED '$OUT/cuda_tests.log'"
  fi
fi

# 2. the kernel's precision at the real shape
want precision && step kernel_precision 40 'PRECISION' $PY scripts/gpu_check.py precision

# 3. the 8B-shaped models and their data (the probe and the 8b steps use them)
if want build || want probe || want 8b; then
  step build_8b_shaped 45 '^built' $PY scripts/gpu_check.py build "$M" "$LAYERS"
fi

# 4. one GPU without torchrun, --deterministic with no cuBLAS workspace set by the user
if want probe; then
  step single_process 50 'total time|Error' env -u RANK -u WORLD_SIZE -u LOCAL_RANK -u CUBLAS_WORKSPACE_CONFIG \
    $PY train.py --method=dpo "${COMMON[@]/--max_train_pairs=8/--max_train_pairs=2}" --deterministic \
    --out_dir="$WORK/probe"
fi

# 5. DPO and one MetaAPO iteration, 8B-shaped, under torchrun on FSDP2, then throughput and memory
if want 8b; then
  RUN8B=("${COMMON[@]}" --out_dir="$WORK/run8b" --iterations=1 --num_samples=2 --gen_batch_size=8 --sampling=all
    --meta_interval=1)
  step dpo_8b_shape 50 'total time|Error' \
    $TORCHRUN scripts/gpu_check.py train dpo --method=dpo "${RUN8B[@]}"
  step metaapo_8b_shape 70 'generated for|total time|Error' \
    $TORCHRUN scripts/gpu_check.py train metaapo --method=metaapo --policy="$WORK/run8b/dpo/model" "${RUN8B[@]}"
  step throughput_memory 20 'MEMORY PLAN|dry run' \
    $PY scripts/gpu_check.py report dpo,metaapo "$RANKS" "${RUN8B[@]}"
fi

# 6. the kernel benchmark (the CUDA table only on a GPU)
want bench && step kernel_bench 40 '^\| ours' $PY scripts/bench_kernel.py "${BENCH[@]}"

# 7. the toy pipeline with the transformers generator from a directory without out/: SIGTERM during
# MetaAPO's training, then --resume
if want toy; then
  step toy_stop_and_resume 100 'stopped by SIGTERM|resumed|Error' \
    $PY scripts/gpu_check.py toy "$WORK/toy" "${TOY[@]}"
fi

echo
echo "== kernel ==" && grep -hE '^\| (ours|naive|torch)|^chunk|syncs|PRECISION' "$OUT"/kernel_*.log 2>/dev/null
echo "== 8B-shaped run ==" && grep -hE '^\||MEMORY PLAN|^  |shape \(' "$OUT"/throughput_memory.log 2>/dev/null |
  grep -v '^| variant'
echo "== summary (logs in $OUT) ==" && cat "$SUMMARY"
rm -rf "$WORK"
exit $FAILED
