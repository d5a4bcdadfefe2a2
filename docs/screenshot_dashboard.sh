#!/usr/bin/env bash
# Screenshots of TensorBoard's view of a log directory, made with a headless Chromium (Debian: apt-get install
# chromium). Usage: bash docs/screenshot_dashboard.sh LOGDIR OUTDIR
set -euo pipefail
logdir=${1:?LOGDIR}; out=${2:?OUTDIR}; port=${PORT:-6017}
mkdir -p "$out"
.venv/bin/tensorboard --logdir "$logdir" --host 127.0.0.1 --port "$port" > /tmp/tensorboard.log 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port" > /dev/null && break; sleep 1; done
for tab in ${TABS:-custom_scalars histograms distributions}; do
  chromium --headless --no-sandbox --disable-gpu --disable-background-networking --hide-scrollbars \
    --window-size=1600,${HEIGHT:-1750} --virtual-time-budget=20000 --screenshot="$out/dashboard_$tab.png" \
    "http://127.0.0.1:$port/#$tab" > /dev/null 2>&1
done
ls -l "$out"
