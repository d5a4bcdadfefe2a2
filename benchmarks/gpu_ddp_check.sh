#!/usr/bin/env bash
# NeuralCollapseCallback under DDP on N CUDA GPUs (NCCL): the same numbers on one rank and on many.
#
# Usage, from the repository root, in the project's environment:
#
#     benchmarks/gpu_ddp_check.sh [NUM_GPUS] [OUTDIR]
#
# NUM_GPUS: default every visible GPU (needs at least 2); OUTDIR: default ./gpu_ddp_check.
# Environment: PYTHON (default python), RTOL (default 1e-6; relative tolerance against the one-process
# reference, NC4 and the training error must match exactly), TIMEOUT (seconds per run, default 900),
# ACCELERATOR (default cuda; `ACCELERATOR=cpu benchmarks/gpu_ddp_check.sh 2` runs the same plumbing on gloo).
#
# It runs tests/scripts/ddp_fit.py (the script behind tests/test_ddp.py) with
# `--accelerator cuda --devices NUM_GPUS --strict`, on NUM_GPUS * 150 + 1 samples (never a multiple of
# the world size):
#
#   exact     exact mode, a checkpoint after every epoch (TPT, rank-0-only files, unpadded shards)
#   resume    exact mode resumed from the checkpoint of epoch 1 (the history continues)
#   online    online mode with lr=0 on Lightning's padding DistributedSampler (NUM_GPUS - 1 duplicates)
#   uneven    both modes, rank 1 never sees the last class, uneven shards and measured batches
#   spawn     exact mode under ddp_spawn
#
#   failures  exact mode with BatchNorm; rank 1's label getter fails in epoch 1, its exact pass in epoch 2,
#             its on_tpt_start once: no rank is left waiting, every rank skips the same epochs
#
# Before them, benchmarks/gpu_sync_check.py runs the per-step hooks on one GPU under
# torch.cuda.set_sync_debug_mode("error") (no host-device synchronisation); with a single GPU only that
# check runs.
#
# Each run writes OUTDIR/<run>/rank*.json and OUTDIR/<run>/outcome.json (checks and "ok"); the script
# collects them into OUTDIR/summary.json and exits with status 1 when a run failed or a check did not hold.
set -u -o pipefail

PYTHON=${PYTHON:-python}
RTOL=${RTOL:-1e-6}
TIMEOUT=${TIMEOUT:-900}
ACCELERATOR=${ACCELERATOR:-cuda}
NUM_GPUS=${1:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")}
OUTDIR=${2:-gpu_ddp_check}
SCRIPT="$(cd "$(dirname "$0")/.." && pwd)/tests/scripts/ddp_fit.py"

if ! [[ "$NUM_GPUS" =~ ^[0-9]+$ ]] || [ "$NUM_GPUS" -lt 1 ]; then
    echo "gpu_ddp_check: needs a device, got '$NUM_GPUS'" >&2
    exit 2
fi
mkdir -p "$OUTDIR"
SYNC_STATUS=0
if [ "$ACCELERATOR" = "cuda" ]; then
    echo "== sync: benchmarks/gpu_sync_check.py"
    "$PYTHON" "$(dirname "$0")/gpu_sync_check.py" | tee "$OUTDIR/sync_check.jsonl" || SYNC_STATUS=1
fi
if [ "$NUM_GPUS" -lt 2 ]; then
    echo "gpu_ddp_check: one device: the DDP runs need at least 2 (the sync check ran)" >&2
    exit "$SYNC_STATUS"
fi
SAMPLES=$((NUM_GPUS * 150 + 1))
COMMON=(--accelerator "$ACCELERATOR" --devices "$NUM_GPUS" --samples "$SAMPLES" --rtol "$RTOL" --strict)
STATUS=$SYNC_STATUS

run() {  # run NAME ARGS...: one ddp_fit.py launch, its exit status in OUTDIR/NAME/exit_status
    local name=$1
    shift
    echo "== $name: ddp_fit.py ${COMMON[*]} $*"
    local start=$SECONDS
    timeout "$TIMEOUT" "$PYTHON" "$SCRIPT" "$OUTDIR/$name" "${COMMON[@]}" "$@" >"$OUTDIR/$name.log" 2>&1
    local rc=$?
    mkdir -p "$OUTDIR/$name"
    echo "$rc" >"$OUTDIR/$name/exit_status"
    echo "   exit status $rc after $((SECONDS - start)) s (log: $OUTDIR/$name.log)"
    if [ "$rc" -ne 0 ]; then
        STATUS=1
        tail -n 30 "$OUTDIR/$name.log"
    fi
}

run exact --mode exact --epochs 3 --checkpoint-dir "$OUTDIR/exact/ckpt"
run resume --mode exact --epochs 4 --resume "$OUTDIR/exact/ckpt/epoch=1.ckpt" --checkpoint-dir "$OUTDIR/resume/ckpt"
run online --mode online --lr 0 --epochs 3
run uneven --mode both --missing-class-on-rank1 --uneven --epochs 3
run spawn --mode exact --strategy ddp_spawn --epochs 2
run failures --mode exact --epochs 4 --batch-norm --batch-size 32 --fail-labels-on-rank1 1 \
    --fail-exact-on-rank1 2 --fail-tpt-hook-on-rank1

"$PYTHON" - "$OUTDIR" "$NUM_GPUS" <<'EOF' || STATUS=1
import json
import sys
from pathlib import Path

outdir, world = Path(sys.argv[1]), int(sys.argv[2])
summary, ok = {"world_size": world, "runs": {}}, True
for name in ("exact", "resume", "online", "uneven", "spawn", "failures"):
    run = outdir / name
    status = int((run / "exit_status").read_text()) if (run / "exit_status").exists() else None
    outcome = json.loads((run / "outcome.json").read_text()) if (run / "outcome.json").exists() else None
    entry = {"exit_status": status, "outcome": outcome}
    ranks = sorted(run.glob("rank*.json"))
    entry["ranks_reported"] = len(ranks)
    if name == "resume" and (outdir / "exact" / "rank0.json").exists() and (run / "rank0.json").exists():
        before = json.loads((outdir / "exact" / "rank0.json").read_text())["history"]["nc"]
        after = json.loads((run / "rank0.json").read_text())["history"]["nc"]
        entry["history_continues"] = [r["epoch"] for r in after] == [0, 1, 2, 3] and after[:2] == before[:2]
    if name == "online" and (run / "rank0.json").exists():
        seen = json.loads((run / "rank0.json").read_text())["seen_reference"]
        entry["duplicates_per_epoch"] = sorted({int(r["samples"]) - (world * 150 + 1) for r in seen.values()})
    if name == "failures" and (run / "rank0.json").exists():
        history = json.loads((run / "rank0.json").read_text())["history"]["nc"]
        entry["epochs_logged"] = [r["epoch"] for r in history]
        entry["history_continues"] = entry["epochs_logged"] == [0, 2, 3] and "nc1" not in history[1]
    entry["ok"] = bool(status == 0 and outcome and outcome["ok"] and len(ranks) == world
                       and entry.get("history_continues", True))
    ok = ok and entry["ok"]
    summary["runs"][name] = entry
summary["ok"] = ok
(outdir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
print(json.dumps({name: run["ok"] for name, run in summary["runs"].items()} | {"ok": ok}, indent=1))
sys.exit(0 if ok else 1)
EOF

echo "summary: $OUTDIR/summary.json"
exit "$STATUS"
