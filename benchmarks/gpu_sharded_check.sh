#!/usr/bin/env bash
# NeuralCollapseCallback under sharded strategies on 2 CUDA GPUs: the same numbers as one process.
#
# Usage, from the repository root, in the project's environment (DeepSpeed installed for its run):
#
#     benchmarks/gpu_sharded_check.sh [OUTDIR]
#
# It runs tests/scripts/sharded_fit.py (the script behind tests/callback/test_sharded.py) with
# `--accelerator cuda --check --layers` on 241 samples (the eval shards differ by one batch: the exact pass
# pads its forwards, which are collectives under sharding), once per strategy:
#
#   fsdp2      ModelParallelStrategy, fully_shard on the blocks and the classifier (DTensor weights)
#   fsdp       Lightning's FSDPStrategy (FSDP1, auto-wrapped Linear layers: flat shards, summon_full_params)
#   deepspeed  DeepSpeedStrategy(stage=3) (ZeRO-3 placeholders, GatheredParameters); skipped without deepspeed
#
# Each run compares every exact-mode key (NC2 of the weights, NC3 and the layers included) and every online key
# with a one-process float64 reference of the frozen model (lr=0), writes OUTDIR/<strategy>/result.json, prints a
# JSON line {"strategy", "ok", "failures"}, and the script exits with status 1 when a run failed.
# Environment: PYTHON (default python), TIMEOUT (seconds per run, default 600).
set -u -o pipefail

PYTHON=${PYTHON:-python}
TIMEOUT=${TIMEOUT:-600}
OUTDIR=${1:-gpu_sharded_check}
SCRIPT="$(cd "$(dirname "$0")/.." && pwd)/tests/scripts/sharded_fit.py"
mkdir -p "$OUTDIR"
status=0
for strategy in fsdp2 fsdp deepspeed; do
    if [ "$strategy" = deepspeed ] && ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then
        echo "{\"strategy\": \"deepspeed\", \"ok\": null, \"failures\": [\"deepspeed is not installed: skipped\"]}"
        continue
    fi
    timeout "$TIMEOUT" "$PYTHON" "$SCRIPT" "$OUTDIR/$strategy" --accelerator cuda --strategy "$strategy" \
        --layers --check > "$OUTDIR/$strategy.log" 2>&1
    code=$?
    tail -n 1 "$OUTDIR/$strategy.log"
    if [ $code -ne 0 ]; then
        echo "$strategy: exit status $code (log: $OUTDIR/$strategy.log)"
        status=1
    fi
done
exit $status
