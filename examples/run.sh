#!/usr/bin/env bash
# The agent on the example policies (examples/policies: debugger, Prometheus exporter, a UMH rule that
# logs quorum loss) against a simulated 3-node DRBD cluster — no DRBD, no Kubernetes needed.
#
# One agent per simulated node (n1, n2, n3), each with `drbd-sim --cluster DIR --node NODE` as its
# drbdsetup. The scenario examples/scenarios/lose-node.yaml runs alongside: n1 (Primary) crashes, then
# returns and resyncs. The agent of n2 runs in the foreground, so its log shows the reactor reacting;
# the others log into the temporary directory printed at the start. While it runs:
#   curl -s localhost:9942/status      curl -s localhost:9942/metrics      (n2; n1 on :9943, n3 on :9944)
# Ctrl-C stops everything. PROFILE=debug uses a debug build.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
if [ "$profile" = release ]; then cargo build --release --bins; else cargo build --bins; fi
bin=target/$profile
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
echo "cluster and logs in $work"
agent() { # NODE LISTEN
    "$bin/drbd-reactor" agent \
        --policy-dir examples/policies \
        --node-name "$1" \
        --drbdsetup "$bin/drbd-sim --cluster $work/cluster --node $1" \
        --drbdadm "$bin/drbd-sim --cluster $work/cluster --node $1" \
        --statistics-interval 2 \
        --umh-script-dir "$work/umh-$1" \
        --listen "$2"
}
mkdir -p "$work/cluster"
"$bin/drbd-sim" --cluster "$work/cluster" scenario examples/scenarios/lose-node.yaml &
pids+=($!)
sleep 0.5
agent n1 127.0.0.1:9943 >"$work/n1.log" 2>&1 &
pids+=($!)
agent n3 127.0.0.1:9944 >"$work/n3.log" 2>&1 &
pids+=($!)
agent n2 :9942 &
pids+=($!)
wait "${pids[-1]}"
