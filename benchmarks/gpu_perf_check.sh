#!/usr/bin/env bash
# The performance cases on one CUDA GPU, when a GPU machine is lent (the sibling of gpu_ddp_check.sh).
#
# Usage, from the repository root, in the project's environment (PYTHON, default python):
#
#     LNC_PEER_NEURAL_COLLAPSE=../peers/neural-collapse benchmarks/gpu_perf_check.sh [OUTDIR]
#
#   peers     benchmarks/bench_peers.py --device cuda: the whole job, ours against rhubarbwu/neural-collapse
#             (when LNC_PEER_NEURAL_COLLAPSE points at a snapshot of it), a float64 two-pass and the floors
#   compute   benchmarks/bench_compute.py --device cuda: compute at C = 1,000 and 10,000, D = 1,024
#   resnet18  benchmarks/bench_callback.py: the online overhead of a ResNet-18-sized CNN per epoch
#
# Each writes OUTDIR/<case>.txt (default OUTDIR ./gpu_perf_check); the exit status is non-zero when one failed.
set -u -o pipefail
PYTHON=${PYTHON:-python}
OUTDIR=${1:-gpu_perf_check}
mkdir -p "$OUTDIR"
STATUS=0
run() {
    local name=$1; shift
    echo "== $name: $*"
    if ! "$@" 2>&1 | tee "$OUTDIR/$name.txt"; then STATUS=1; fi
}
run peers "$PYTHON" benchmarks/bench_peers.py --device cuda --rounds 3
run compute "$PYTHON" benchmarks/bench_compute.py --device cuda --classes 1000,10000
run resnet18 "$PYTHON" benchmarks/bench_callback.py --model resnet18 --device cuda --samples 20000 --batch-size 256
exit "$STATUS"
