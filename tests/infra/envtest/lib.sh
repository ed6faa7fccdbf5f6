# shellcheck shell=bash
# shellcheck source-path=SCRIPTDIR
# Common settings for tools.sh / update-modules.sh. Source it; do not execute.
# Everything is logged to stderr; stdout is reserved for the scripts' one result line.

ENVTEST_SRC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "${ENVTEST_SRC_DIR}/versions.env"

log() { printf '[envtest %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Cache root: binaries per k8s version, plus a shared GOPATH (module cache) and
# GOCACHE (build cache) next to them so warm rebuilds after a version bump are cheap.
TOOLS_ROOT="${DRBD_REACTOR_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/drbd-reactor-tools}"
# shellcheck disable=SC2034  # used by tools.sh
TOOLS_BIN_DIR="${TOOLS_ROOT}/${K8S_VERSION}/bin"

setup_go_env() {
    command -v go >/dev/null 2>&1 || die "'go' not found on PATH (need Go >= 1.24 for the 'tool' directive)"
    local gov
    gov="$(go env GOVERSION)"   # e.g. go1.26.8
    local major minor
    major="$(sed -E 's/^go([0-9]+)\.([0-9]+).*/\1/' <<<"$gov")"
    minor="$(sed -E 's/^go([0-9]+)\.([0-9]+).*/\2/' <<<"$gov")"
    if (( major < 1 || (major == 1 && minor < 24) )); then
        die "Go ${gov} is too old; need >= go1.24"
    fi
    export GOPATH="${TOOLS_ROOT}/gopath"
    export GOMODCACHE="${GOPATH}/pkg/mod"
    export GOCACHE="${TOOLS_ROOT}/gocache"
    # Never download another toolchain; never write into the work tree's VCS metadata;
    # keep the module cache writable so `rm -rf "$TOOLS_ROOT"` works.
    export GOTOOLCHAIN=local
    export GOFLAGS="-buildvcs=false -modcacherw ${ENVTEST_EXTRA_GOFLAGS:-}"
    export CGO_ENABLED=0
    # Use the module proxy / checksum DB configured for this machine (go env defaults otherwise).
    mkdir -p "$GOPATH" "$GOCACHE"
}
