#!/bin/bash
# Runs the fuzz targets: fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]  (default 60 s, all targets).
# Needs the nightly toolchain (rustup toolchain install nightly) and cargo-fuzz (installed here if missing).
# Findings land in fuzz/artifacts/<target>/; the growing corpus in fuzz/corpus/<target>/ (not committed);
# the committed seeds are in fuzz/seeds/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(events2_parse engine_apply policy_yaml)
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    dict=()
    [ -f "dicts/$t.dict" ] && dict=("-dict=dicts/$t.dict")
    echo "== $t for ${secs}s"
    cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -max_len=8192 -timeout=10 -rss_limit_mb=2048 "${dict[@]}"
done
