#!/usr/bin/env bash
# The GPU measurements of docs/speed.md in one prepared script, for a GPU machine lent for a few minutes (a machine
# without internet: it trains on the sample corpus, so carry .cache from a machine where `make data` ran).
#
#   bash tools/gpu_checks.sh OUT_DIR [STAGE ...]
#
# Stages, in the default order (the ones users choose by first):
#   steps       tools/bench_step.py per optimizer on 210m (micro-batch 64) and 550m (32): tokens/s, MFU, the step
#               split, torch.cuda.max_memory_allocated against the accounting, data wait, host syncs
#   microbatch  AdamW's MFU at other micro-batches (the configs' choice)
#   accumulate  every optimizer on 210m at configs/210m.yaml's global batch (16 micro-batches of 64 per step): the
#               step ratios a run with the configs pays (the steps stage's one micro-batch is the strictest case)
#   compile     the same table with compiled blocks and compiled optimizer updates (train.compile, optim.compile)
#   fused       the optimizers fused in backward: their peak memory against the steps stage's (fused vs plain)
#   tensorboard a short train.py run of each model config with TensorBoard logs, added to OUT_DIR/tensorboard.tar as
#               each run ends
# Every stage appends its tables to OUT_DIR/report.md (its log to OUT_DIR/log.txt), each table row as soon as it is
# measured, and each command is cut at STAGE_TIMEOUT seconds (default 240), so one call returns what finished.
# All stages take longer than one 10-minute call: name the stages of each call. A plan for the device tool (15 minutes
# of device time in all, the start included; the durations are estimates from FLOP counts, not measured):
#   run(carry=[".cache"], timeout_s=560): bash tools/gpu_checks.sh $OUT steps accumulate microbatch   (~5-6 min)
#   run(carry=[".cache"], timeout_s=420): bash tools/gpu_checks.sh $OUT fused tensorboard             (~5 min)
# then `compile` (again with carry=[".cache"]) if time is left (compiling the blocks takes minutes per model). Make
# each call right after the last: an idle machine goes back within a minute, and a fresh one takes minutes to start,
# bare: every call carries .cache (7.5 MB), or a fresh machine's stages all fail on missing data. Each call's $OUT
# is new.
# GPU_CHECKS_TINY=1 runs the same commands at the tiny size on the CPU (its test: tests/e2e/test_tools.py).
# The lent machines' python3 has torch 2.11, not the pinned 2.13: the test suite passes with both (docs/speed.md).
set -uo pipefail
out=${1:?usage: bash tools/gpu_checks.sh OUT_DIR [STAGE ...]}
shift
stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(steps microbatch accumulate compile fused tensorboard)
py=${PYTHON:-python3}
limit=${STAGE_TIMEOUT:-240}
if [[ ${GPU_CHECKS_TINY:-0} == 1 ]]; then
    runs=("tiny 2") mbs=(1 4) accumulate=2 optims=(adamw adalomo) train_steps=2 configs=(configs/tiny.yaml)
    common=(--seq-len 32 --steps 2 --warmup 1 --device cpu)
else
    runs=("210m 64" "550m 32") mbs=(16 32 96) accumulate=16 optims=(adamw adafactor adalomo galore_adamw adamem)
    common=(--steps 10 --warmup 3 --device cuda) train_steps=10 configs=(configs/210m.yaml configs/550m.yaml)
fi
mkdir -p "$out"
report="$out/report.md" log="$out/log.txt"

# Runs a command under the stage limit; its table (the lines from the tool's header on) goes to the report.
stage() {
    local title=$1
    shift
    printf '\n## %s\n\n`%s`\n\n' "$title" "$*" >>"$report"
    timeout "$limit" "$@" >"$out/stage.txt" 2>>"$log"
    local rc=$?
    cat "$out/stage.txt" >>"$log"
    # bench_step's header and table; train.py's last logged step and its validation loss
    grep -E '^(\||[a-z0-9]+, seq )' "$out/stage.txt" >>"$report"
    grep -E '^step .*\| loss' "$out/stage.txt" | tail -n 1 >>"$report"
    grep -E '^validation loss' "$out/stage.txt" >>"$report"
    [[ $rc == 0 ]] || printf '\n(stopped: exit status %s%s)\n' "$rc" "$([[ $rc == 124 ]] && echo ", past ${limit} s")" >>"$report"
    rm -f "$out/stage.txt"
}

{
    echo "# GPU checks, $(date -u +%Y-%m-%d)"
    "$py" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"))'
} >>"$report" 2>>"$log"

for s in "${stages[@]}"; do
    case $s in
    steps)
        for run in "${runs[@]}"; do
            read -r flavor mb <<<"$run"
            stage "$flavor, every optimizer" "$py" tools/bench_step.py --flavor "$flavor" --micro-batch "$mb" \
                --optim "${optims[@]}" "${common[@]}"
        done ;;
    microbatch)
        read -r flavor _ <<<"${runs[0]}"
        for mb in "${mbs[@]}"; do
            stage "$flavor, AdamW at micro-batch $mb" "$py" tools/bench_step.py --flavor "$flavor" --micro-batch "$mb" \
                --optim adamw "${common[@]}"
        done ;;
    accumulate)
        # A step is ~16x longer here: fewer of them (the last --steps / --warmup win).
        read -r flavor mb <<<"${runs[0]}"
        stage "$flavor, every optimizer, $accumulate micro-batches of $mb per step" "$py" tools/bench_step.py \
            --flavor "$flavor" --micro-batch "$mb" --accumulate "$accumulate" --optim "${optims[@]}" "${common[@]}" \
            --steps 2 --warmup 1 ;;
    compile)
        for run in "${runs[@]}"; do
            read -r flavor mb <<<"$run"
            stage "$flavor, compiled blocks and updates" "$py" tools/bench_step.py --flavor "$flavor" \
                --micro-batch "$mb" --optim adamw adafactor adalomo --compile --compile-optim "${common[@]}"
        done ;;
    fused)
        for run in "${runs[@]}"; do
            read -r flavor mb <<<"$run"
            stage "$flavor, fused in backward" "$py" tools/bench_step.py --flavor "$flavor" --micro-batch "$mb" \
                --optim "${optims[@]}" --fused "${optims[@]}" "${common[@]}"
        done ;;
    tensorboard)
        for cfg in "${configs[@]}"; do
            name=$(basename "$cfg" .yaml)
            stage "train.py $cfg, $train_steps steps" "$py" train.py "$cfg" --run.dir="$out/runs/$name" \
                --data.prepared_dir=.cache/tokens/sample --train.max_steps="$train_steps" --log.interval=1 \
                --eval.interval=0 --checkpoint.resume=false
            # its event files and metrics, not its checkpoints (GBs), kept even if a later run is cut
            tar -rf "$out/tensorboard.tar" --exclude=checkpoints -C "$out/runs" "$name" && rm -rf "$out/runs/$name"
        done
        rmdir "$out/runs" ;;
    *)
        echo "error: unknown stage $s (steps, microbatch, accumulate, compile, fused, tensorboard)" >&2
        exit 2 ;;
    esac
done
echo "report: $report"
