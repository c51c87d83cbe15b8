#!/usr/bin/env bash
# The whole GPU comparison of issue 5 in one call: the original loop and ours, on the same GPU, in the same run.
#
# Usage, from the repository root (needs torch and lightning; not jsonargparse):
#     PYTHONPATH=. bash benchmarks/gpu_suite.sh [OUT_DIR]           # about 9 minutes on one H100
#     EXTRA_ARGS="--device cpu --architecture MLP --grid 8 --steps 3 --hidden 4" BATCHES=2,4 EPISODES=2 \
#         bash benchmarks/gpu_suite.sh /tmp/smoke
#                                                                   # a smoke test of the script itself, on a CPU
#
# Writes one JSON line per row to OUT_DIR/gpu_suite.jsonl (each row's stderr to OUT_DIR/gpu_suite.log). A row that
# fails writes a line with "error", one that runs past its limit "error": "timeout ..."; once the suite's budget
# (BUDGET_S, default 540 s) is nearly spent, the remaining rows write "skipped". ROWS=label,label runs only those
# (the original's row too, where ratios are wanted). Rows, in order (what the last measurement left open first):
#   original                       the original loop, standard model (UNET d8 h64, grid 64, 100 steps), batch 1
#   b1-bf16-reduce-overhead        ours, batch 1, bf16, inductor + CUDA-graph trees           -> target 2 (>= 3 ep/s)
#   b1-bf16-reduce-overhead-step   the same with model.compile_scope step: one CUDA graph per whole step
#   b1-bf16                        ours, batch 1, eager: the two rows' baseline (and the peak after the autocast fix)
#   grid128-original, grid128-bf16, grid128-bf16-checkpoint-10, grid128-bf16-checkpoint-1
#                                  grid 128, batch 1: the original; ours plain, checkpoint_every 10 and 1, eager
#                                                                  -> target 3 (<= 3 GiB at <= 1.5x the plain time)
#   profile-b1-bf16, profile-b16-bf16
#                                  one bare episode (1 and 16 universes) under torch.profiler: the top kernels
#   batched-bf16-compiled          ours, bf16 + channels_last + torch.compile, COMPILED_BATCHES universes,
#                                  checkpoint_every 2 from 64 universes                      -> target 1 (>= 40 M/s)
#   batched-bf16-compiled-step     the same with model.compile_scope step (the step's own arithmetic fused too)
#   profile-b32-bf16-compiled-step one bare episode of 32 universes, the step compiled, under torch.profiler: whether
#                                  the device is busy (total kernel time against wall time) and on which kernels
#   grid128-bf16-compiled-checkpoint-10  the same as grid128-bf16-checkpoint-10 under torch.compile
#   batched-bf16                   ours, BATCHES universes eager, checkpoint_every 2 from CHECKPOINT_FROM
#                                  universes on (target 1 without compile)
#   b1-bare-bf16, b16-bf16-no-channels-last (against batched-bf16's 16), b1-bf16-no-channels-last,
#   batched-bf16-cudnn-benchmark   evidence for the presets' defaults and for the framework's cost
# Before the rows, unless TESTS=0: the GPU equivalence tests (tests/test_fast_paths.py -k "on_cuda or mixed or
# autocast": every fast path, both compile scopes, gives the plain path's losses and gradients on this GPU, and a
# checkpointed segment is recomputed under the forward's autocast in autograd's GPU thread), at most TESTS_LIMIT_S
# (default 240) of the budget. Their result is the JSON line "gpu-tests"; OUT_DIR/gpu_tests.log has one line per
# test, so a run cut by the limit still shows what passed. The cases not yet run on a GPU come first. A speed
# figure of a path that computes wrong numbers is worth nothing, so the tests run before the rows.
# Knobs (environment): PYTHON, BUDGET_S, ROWS, BATCHES, COMPILED_BATCHES, EPISODES (timed episodes of the batch-1
# rows), CHECKPOINT_FROM, ANCHOR (the original loop's file, when ../shared/bench/anchor_original.py is not beside
# the repository), EXTRA_ARGS (appended to every row), TESTS, TESTS_LIMIT_S, TESTS_K (pytest's -k for the tests).
# The whole suite does not fit one call of the lent machine (at most 540 s); benchmarks/RESULTS.md says which rows
# to run first.
set -u

OUT_DIR=${1:-${OUT:-benchmarks/out}}
mkdir -p "$OUT_DIR"
OUT="$OUT_DIR/gpu_suite.jsonl"
LOG="$OUT_DIR/gpu_suite.log"
PY=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-540}
BATCHES=${BATCHES:-16,32,64,128,256}
COMPILED_BATCHES=${COMPILED_BATCHES:-128,256}
EPISODES=${EPISODES:-8}
CHECKPOINT_FROM=${CHECKPOINT_FROM:-32}
read -r -a EXTRA <<<"${EXTRA_ARGS:-}"
[[ -n "${ANCHOR:-}" ]] && EXTRA+=(--anchor "$ANCHOR")
START=$(date +%s)
export PYTHONPATH="${PYTHONPATH:-.}"
export PYTHONWARNINGS=ignore

row() { # row LABEL LIMIT_S ARGS...: one bench_speed.py call under a time limit, its JSON lines into $OUT
    local label=$1 limit=$2
    shift 2
    [[ -n "${ROWS:-}" && ",$ROWS," != *",$label,"* ]] && return
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if ((left < 30)); then
        echo "{\"label\": \"$label\", \"skipped\": \"suite budget of ${BUDGET_S}s spent\"}" >>"$OUT"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $label: $* (limit ${limit}s)" >>"$LOG"
    timeout -k 10 "$limit" "$PY" benchmarks/bench_speed.py "$@" ${EXTRA[@]+"${EXTRA[@]}"} --label "$label" >>"$OUT" 2>>"$LOG"
    local rc=$?
    if ((rc == 124 || rc == 137)); then
        echo "{\"label\": \"$label\", \"args\": \"$*\", \"error\": \"timeout after ${limit}s\"}" >>"$OUT"
    fi
    echo "$label: exit $rc at $(($(date +%s) - START))s" >&2
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } >>"$LOG" 2>&1
if [[ "${TESTS:-1}" != 0 ]]; then
    timeout -k 10 "${TESTS_LIMIT_S:-240}" "$PY" -m pytest -v -p no:cacheprovider tests/test_fast_paths.py \
        -k "${TESTS_K:-on_cuda or mixed or autocast}" >"$OUT_DIR/gpu_tests.log" 2>&1
    rc=$?
    summary=$(tail -n 1 "$OUT_DIR/gpu_tests.log" | tr -d '"\\')
    echo "{\"label\": \"gpu-tests\", \"exit\": $rc, \"summary\": \"$summary\"}" >>"$OUT"
    echo "gpu-tests: exit $rc at $(($(date +%s) - START))s: $summary" >&2
fi
ORIGINAL=(--original-from "$OUT")
OURS=(ours --variant lightning --precision bf16-mixed "${ORIGINAL[@]}")
B1=("${OURS[@]}" --config standard --episodes "$EPISODES")
LARGEST=${BATCHES##*,}

row original 120 original --config standard --episodes 10 --warmup 2
row b1-bf16-reduce-overhead 200 "${B1[@]}" --warmup 3 --compile reduce-overhead
row b1-bf16-reduce-overhead-step 200 "${B1[@]}" --warmup 3 --compile reduce-overhead --compile-scope step
row b1-bf16 60 "${B1[@]}" --warmup 2
row grid128-original 60 original --config grid128 --episodes 5 --warmup 1
row grid128-bf16 60 "${OURS[@]}" --config grid128 --episodes 5 --warmup 2
row grid128-bf16-checkpoint-10 60 "${OURS[@]}" --config grid128 --checkpoint-every 10 --episodes 5 --warmup 2
row grid128-bf16-checkpoint-1 60 "${OURS[@]}" --config grid128 --checkpoint-every 1 --episodes 5 --warmup 2
row profile-b1-bf16 60 ours --variant bare --precision bf16-mixed --config standard --episodes 1 --warmup 2 --profile 25
row profile-b16-bf16 60 ours --variant bare --precision bf16-mixed --config standard --universes 16 --episodes 1 \
    --warmup 1 --profile 25
row batched-bf16-compiled 300 "${OURS[@]}" --config standard --compile default --universes "$COMPILED_BATCHES" \
    --checkpoint-every 2 --checkpoint-from-universes 64 --episodes 3 --warmup 2
row batched-bf16-compiled-step 300 "${OURS[@]}" --config standard --compile default --compile-scope step \
    --universes "$COMPILED_BATCHES" --checkpoint-every 2 --checkpoint-from-universes 64 --episodes 3 --warmup 2
row profile-b32-bf16-compiled-step 200 ours --variant bare --precision bf16-mixed --config standard --universes 32 \
    --compile default --compile-scope step --episodes 1 --warmup 2 --profile 25
row grid128-bf16-compiled-checkpoint-10 200 "${OURS[@]}" --config grid128 --compile default --checkpoint-every 10 \
    --episodes 5 --warmup 2
row batched-bf16 150 "${OURS[@]}" --config standard --universes "$BATCHES" --checkpoint-every 2 \
    --checkpoint-from-universes "$CHECKPOINT_FROM" --episodes 3 --warmup 1
row b1-bare-bf16 60 ours --variant bare --precision bf16-mixed "${ORIGINAL[@]}" --config standard \
    --episodes "$EPISODES" --warmup 2
row b16-bf16-no-channels-last 60 "${OURS[@]}" --config standard --universes 16 --episodes 3 --warmup 1 \
    --no-channels-last
row b1-bf16-no-channels-last 60 "${B1[@]}" --warmup 2 --no-channels-last
row batched-bf16-cudnn-benchmark 150 "${OURS[@]}" --config standard --universes "$LARGEST" --checkpoint-every 2 \
    --episodes 3 --warmup 1 --cudnn-benchmark

echo "suite done in $(($(date +%s) - START))s: $OUT" >&2
