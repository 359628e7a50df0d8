#!/usr/bin/env bash
# GPU check, at most ~8 minutes on one GPU, from the repository root with JAX+CUDA installed:
#
#     bash benchmarks/gpu_check.sh                  # figures on stdout; JSON under $OUT when it is set
#
# 1. GPT-2 small (12 layers, 12 heads, 768 wide, block 1024, vocab 50304) in bfloat16:
#    tokens/s, MFU, step time, peak memory and pmap/jit, from benchmarks/throughput.py.
# 2. Wall time of nanoGPT's shakespeare_char run (5000 iterations) and its final val loss.
#
# Each part has a `timeout` so that the whole stays within 8 minutes; a part that fails or
# times out is reported and the other still runs; the exit code is 1 if any part failed.
# For a dry run on a CPU, shrink both parts, e.g.
#     MODEL_ARGS="--n_layer 1 --n_head 2 --n_embd 32 --block_size 16 --vocab_size 64" BATCH=8 \
#         TRAIN_PRESET=tiny SC_DIR=$(mktemp -d)/sc bash benchmarks/gpu_check.sh
set -u -o pipefail

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
MODEL_ARGS=${MODEL_ARGS:---n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --vocab_size 50304}
BATCH=${BATCH:-32}                       # sequences per device: 32 x 1024 tokens fills a large GPU well
TRAIN_PRESET=${TRAIN_PRESET:-shakespeare_char}
SC_DIR=${SC_DIR:-/tmp/sc}
THROUGHPUT_TIMEOUT=${THROUGHPUT_TIMEOUT:-200}   # two compilations of GPT-2 small (pmap and jit) dominate
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-240}

cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work=$(mktemp -d)
failed=0

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
"$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())'

echo
echo "== GPT-2 small, bfloat16, batch $BATCH per device (timeout ${THROUGHPUT_TIMEOUT}s)"
# shellcheck disable=SC2086  # MODEL_ARGS is a list of flags
if timeout "$THROUGHPUT_TIMEOUT" "$PYTHON" benchmarks/throughput.py $MODEL_ARGS --batch_size "$BATCH" \
        --dtype bfloat16 --steps 10 --rounds 3 --warmup 3 --json "$work/gpt2_small.json"; then
    "$PYTHON" - "$work/gpt2_small.json" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1]))["points"][0]
mfu = "n/a" if p["mfu"] is None else f"{100 * p['mfu']:.1f}%"
mem = "n/a" if p["peak_memory_bytes"] is None else f"{p['peak_memory_bytes'] / 2**30:.1f} GiB"
print(f"RESULT gpt2_small: {p['tokens_per_s']:,.0f} tokens/s, MFU {mfu} of {p['peak_flops'] or 0:.3g} FLOP/s, "
      f"step {1e3 * p['step_s']:.1f} ms, compile {p['compile_s']:.1f} s, peak memory {mem}, "
      f"pmap/jit {p['jit']['pmap_over_jit']:.3f}, on {p['device_kind']}")
EOF
    [ $? -eq 0 ] || failed=1
else
    echo "RESULT gpt2_small: FAILED (exit code $?)"
    failed=1
fi

echo
echo "== python -m parallel_gpt.train --preset $TRAIN_PRESET (timeout ${TRAIN_TIMEOUT}s)"
rm -rf "$SC_DIR"  # a checkpoint left there would be resumed instead of trained from scratch
start=$(date +%s.%N)
timeout "$TRAIN_TIMEOUT" "$PYTHON" -m parallel_gpt.train --preset "$TRAIN_PRESET" --out_dir="$SC_DIR" \
    --sample_tokens=0 > "$work/train.log" 2>&1
status=$?
end=$(date +%s.%N)
tail -n 5 "$work/train.log"
if [ "$status" -eq 0 ]; then
    "$PYTHON" - "$SC_DIR/metrics.jsonl" "$start" "$end" "$TRAIN_PRESET" "$work/train.json" <<'EOF'
import json, sys
path, start, end, preset, out = sys.argv[1:]
rows = [json.loads(line) for line in open(path) if line.strip()]
last = [r for r in rows if "val_loss" in r][-1]
wall = float(end) - float(start)
print(f"RESULT train {preset}: {last['step']} iterations in {wall:.1f} s wall, final val loss {last['val_loss']:.4f}")
json.dump({"preset": preset, "wall_s": wall, "step": last["step"], "val_loss": last["val_loss"],
           "train_loss": last.get("train_loss")}, open(out, "w"), indent=1)
EOF
    [ $? -eq 0 ] || failed=1
else
    echo "RESULT train $TRAIN_PRESET: FAILED (exit code $status; the log's end is above)"
    failed=1
fi

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$work"/*.json "$work/train.log" "$OUT"/ 2>/dev/null
    cp "$SC_DIR/metrics.jsonl" "$OUT/${TRAIN_PRESET}_metrics.jsonl" 2>/dev/null
    echo
    echo "copied to $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
fi
rm -rf "$work"
exit "$failed"
