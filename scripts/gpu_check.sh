#!/usr/bin/env bash
# The GPU check: what a first real GPU run needs, on one CUDA GPU in under 8 minutes (sized for an
# H200), one summary table at the end, every log under $OUT (default out/gpu_check).
#
#   bash scripts/gpu_check.sh                   # on the GPU machine, from anywhere
#   STEPS=8b,toy bash scripts/gpu_check.sh      # some steps only: tests,precision,build,probes,8b,bench,toy
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh   # the same steps at tiny widths on CPU, without torchrun (the
#                                               # suite runs this)
#
# Steps
#   tests      the suite's CUDA tests (pytest -m cuda: the kernel on CUDA against float64, bf16 rounding)
#   precision  the fused kernel at bf16, N=8192 H=4096 V=128256: errors against the fp32 path at several
#              chunk sizes, the weight gradient rounded once whatever the chunk, host syncs per call
#   build      a 2-layer Llama-3.1-8B-shaped policy and reward model (random; real hidden size, heads and
#              vocabulary) and 8 preference pairs of ~4k tokens
#   probes     plain `python train.py` on one GPU without torchrun (a process group of one), and
#              --deterministic without CUBLAS_WORKSPACE_CONFIG set: both must run
#   8b         DPO and one MetaAPO iteration of the 8B-shaped models on FSDP2 in bf16 under torchrun:
#              tokens/s, MFU and peak memory beside the --dry_run plan of the same shapes
#   bench      scripts/bench_kernel.py at bf16, 8192 tokens, H=4096, V=128256: naive, torch's op where present,
#              ours at several chunk sizes (time, TFLOP/s as 8NHV/time, peak extra memory)
#   toy        the toy pipeline on CUDA with the transformers generator, stopped by SIGTERM during
#              MetaAPO's training, resumed with --resume to the end
# A step passes by its exit status; the summary's last column is the line of its log that says most.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY:-0}
OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export OUT GPU_CHECK_DRY=$DRY PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}  # the interpreter with torch and this project's requirements
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node 1"
[ "$DRY" = 1 ] && TORCHRUN=$PY  # on CPU one process is one process: the suite's own tests cover torchrun
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0

want() { [[ ",${STEPS:-tests,precision,build,probes,8b,bench,toy}," == *",$1,"* ]]; }
row() { printf '%-22s %-10s %5ss  %s\n' "$1" "$2" "$3" "$4" | tee -a "$SUMMARY"; }
step() {  # step NAME LOG LIMIT PATTERN CMD...: run CMD, log it, PASS by exit status; the log's last line matching PATTERN as the note
  local name=$1 log=$2 limit=$(($3 * LIMIT_SCALE)) pattern=$4 t=$SECONDS
  shift 4
  echo "=== $name: $*" >>"$log"
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
echo "GPU check $( [ "$DRY" = 1 ] && echo '(dry run: tiny widths on CPU)' ), logs in $OUT" | tee -a "$SUMMARY"
sed -n 1,3p "$OUT/env.log" | tee -a "$SUMMARY"

# 1. the suite's CUDA tests; in a dry run they are skipped (no GPU), which passes
if want tests; then
  if [ "$DRY" = 1 ]; then
    step cuda_tests "$OUT/tests.log" 300 'passed|skipped|deselected' $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_losses.py
  else
    step cuda_tests "$OUT/tests.log" 300 'passed|failed' bash -c "$PY -c 'import torch; assert torch.cuda.is_available()' \
      && $PY -m pytest -q -p no:cacheprovider -m cuda -rA tests && ! grep -q SKIPPED '$OUT/tests.log'"
  fi
fi

# 2. the kernel's precision at the real shape
want precision && step kernel_precision "$OUT/kernel.log" 120 'PRECISION' $PY scripts/gpu_check.py precision

# 3. the 8B-shaped models and their data (the probes and the 8b step use them)
if want build || want probes || want 8b; then
  step build_8b_shaped "$OUT/run8b.log" 180 '^built' $PY scripts/gpu_check.py build "$M" "$LAYERS"
fi

# 4. probes: one GPU without torchrun; --deterministic with no cuBLAS workspace set by the user
if want probes; then
  step single_process "$OUT/probes.log" 180 'total time|Error' env -u RANK -u WORLD_SIZE -u LOCAL_RANK \
    $PY train.py --method=dpo "${COMMON[@]}" --max_train_pairs=2 --out_dir="$WORK/probe1"
  step deterministic "$OUT/probes.log" 180 'total time|Error' env -u CUBLAS_WORKSPACE_CONFIG \
    $TORCHRUN train.py --method=dpo "${COMMON[@]}" --max_train_pairs=2 --deterministic --out_dir="$WORK/probe2"
fi

# 5. DPO and one MetaAPO iteration, 8B-shaped, under torchrun on FSDP2, then throughput and memory
if want 8b; then
  RUN8B=("${COMMON[@]}" --out_dir="$WORK/run8b" --iterations=1 --num_samples=2 --gen_batch_size=8 --sampling=all
    --meta_interval=1)
  step dpo_8b_shape "$OUT/run8b.log" 240 'total time|Error' \
    $TORCHRUN scripts/gpu_check.py train dpo --method=dpo "${RUN8B[@]}"
  step metaapo_8b_shape "$OUT/run8b.log" 300 'generated for|total time|Error' \
    $TORCHRUN scripts/gpu_check.py train metaapo --method=metaapo --policy="$WORK/run8b/dpo/model" "${RUN8B[@]}"
  step throughput_memory "$OUT/run8b.log" 120 'MEMORY PLAN|dry run' \
    $PY scripts/gpu_check.py report dpo,metaapo "${RUN8B[@]}"
fi

# 6. the kernel benchmark (the CUDA table only on a GPU)
want bench && step kernel_bench "$OUT/kernel.log" 240 '^\| ours' $PY scripts/bench_kernel.py "${BENCH[@]}"

# 7. the toy pipeline with the transformers generator: SIGTERM during MetaAPO's training, then --resume
if want toy; then
  step toy_stop_and_resume "$OUT/toy.log" 420 'stopped by SIGTERM|resumed|Error' \
    $PY scripts/gpu_check.py toy "${TOY[@]}" --out_dir="$WORK/toy"
fi

echo
echo "== kernel ==" && grep -hE '^\| (ours|naive|torch)|^chunk|syncs|PRECISION' "$OUT/kernel.log" 2>/dev/null
echo "== 8B-shaped run ==" && grep -hE '^\||MEMORY PLAN|^  |shape \(' "$OUT/run8b.log" 2>/dev/null | grep -v '^| variant'
echo "== summary (logs in $OUT) ==" && cat "$SUMMARY"
rm -rf "$WORK"
exit $FAILED
