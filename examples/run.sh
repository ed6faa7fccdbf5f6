#!/usr/bin/env bash
# Runs the agent on the example policies (examples/policies: debugger, Prometheus exporter, a UMH rule
# logging quorum loss) without Kubernetes and without DRBD:
# drbdsetup is replaced by the simulator replaying examples/streams/demo.events2 (node n1 of a 3-node
# cluster whose peer n3 crashes and comes back). Watch the debugger's JSON lines in the log, and
#   curl -s localhost:9942/status    curl -s localhost:9942/metrics
# Ctrl-C stops it. Extra arguments go to `drbd-reactor agent` (e.g. --listen 127.0.0.1:19942).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
exec target/release/drbd-reactor agent \
    --policy-dir examples/policies \
    --node-name n1 \
    --drbdsetup "target/release/drbd-sim --replay examples/streams/demo.events2" \
    --statistics-interval 5 \
    --umh-script-dir "$(mktemp -d)/umh" \
    "$@"
