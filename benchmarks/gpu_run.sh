#!/usr/bin/env bash
# Every GPU setup of the benchmarks, bf16, in under 10 minutes on one H200:
#
#   benchmarks/gpu_run.sh OUT_DIR        (from anywhere; PYTHON=... picks the interpreter)
#
# Writes into OUT_DIR, one pair per step (STEP.md: the printed tables; STEP.json: every number),
# env.txt (the machine and versions) and steps.txt (each step's exit status and seconds).
# A step that fails or runs past its time limit is recorded and the next one still runs.
# The shapes are the serving issue's: a 2-layer Llama with the Llama-3-8B head (128,256 x 4,096).
set -u

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
cd "$ROOT/benchmarks" || exit 2

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PYTHON" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)'
    git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null
} >"$OUT/env.txt" 2>&1
: >"$OUT/steps.txt"

# step NAME LIMIT_SECONDS COMMAND...: run COMMAND, its stdout to NAME.md, stderr to NAME.err.
step() {
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    echo "== $name" >&2
    timeout "$limit" "$@" >"$OUT/$name.md" 2>"$OUT/$name.err"
    local status=$?
    echo "$name: exit $status, $((SECONDS - started)) s" | tee -a "$OUT/steps.txt" >&2
    [ -s "$OUT/$name.err" ] || rm -f "$OUT/$name.err"
}

CUDA=(--device cuda --dtype bfloat16)
SHAPES=v128k-d4096-tied-k16-b8x512,v128k-d4096-untied-k16-b8x512

# 1. Train step, memory, unmerged forward 1 x 32 and checkpoints: tt and PEFT beside the frozen floor,
#    and the stacks (stack4 = [tt, LoRA, tt, LoRA], its train step over the floor).  ~1.5 min
step train 120 "$PYTHON" bench_trainable_tokens.py "${CUDA[@]}" --shapes "$SHAPES" \
    --setups tt,peft,stacks --repeats 10 --infer-seconds 4 --paired-seconds 2 --json "$OUT/train.json"

# 2. Greedy decode of 32 tokens after a 1 x 32 prompt: base and one unmerged adapter, eager against
#    torch.compile, one process per compile mode (a mode that runs out of time leaves the other's
#    results).  ~1.5 min each, most of it compiling
DECODE=(-m ttbench.decode "${CUDA[@]}" --shape v128k-d4096-tied-k16-b1x32 --new-tokens 32 --repeats 20 --adapter tt)
step decode_tt 110 "$PYTHON" "${DECODE[@]}" --modes default --json "$OUT/decode_tt.json"
step decode_tt_cudagraphs 110 "$PYTHON" "${DECODE[@]}" --modes reduce-overhead \
    --json "$OUT/decode_tt_cudagraphs.json"

# 3. Mixed batches (adapter_names=), 32 x 128 over 1, 8 and 64 adapters (64 samples for 64),
#    against the base forward and generate.  ~1 min each
step per_sample_tt 90 "$PYTHON" -m ttbench.per_sample "${CUDA[@]}" --shape v128k-d4096-tied-k16-b32x128 \
    --adapters 1,8,64 --mix tt --new-tokens 32 --repeats 3 --json "$OUT/per_sample_tt.json"
step per_sample_tt+lora 90 "$PYTHON" -m ttbench.per_sample "${CUDA[@]}" --shape v128k-d4096-tied-k16-b32x128 \
    --adapters 1,8,64 --mix tt+lora --new-tokens 32 --repeats 3 --json "$OUT/per_sample_tt+lora.json"
# LoRA only, where PEFT's own adapter_names= is timed beside: 8 adapters.  ~30 s
step per_sample_lora 45 "$PYTHON" -m ttbench.per_sample "${CUDA[@]}" --shape v128k-d4096-tied-k16-b32x128 \
    --adapters 8 --mix lora --new-tokens 32 --repeats 3 --json "$OUT/per_sample_lora.json"

echo "done in $SECONDS s; outputs in $OUT" >&2
