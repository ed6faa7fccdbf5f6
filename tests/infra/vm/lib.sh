# shellcheck shell=bash
# Common settings of the real-DRBD lab (build.sh, vm.sh). Source it; do not execute.
# Everything is logged to stderr; stdout is reserved for a script's one result line.

LAB_SRC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$LAB_SRC_DIR/../../.." && pwd)"

lab_log() { printf '[lab %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
lab_die() { lab_log "ERROR: $*"; exit 1; }

# Cache root, shared with the other test tools (tests/infra/envtest).
TOOLS_ROOT="${DRBD_REACTOR_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/drbd-reactor-tools}"
LAB_CACHE="${TOOLS_ROOT}/vm"

# The DRBD release. DRBD_TARBALL may be a path or an URL; by default the copy beside the checkout
# (../shared/vendor) when there is one, else LINBIT's download server.
DRBD_VERSION="${DRBD_VERSION:-9.2.18}"
DRBD_SHA256_9_2_18=90268268bc172444884f9f2d1e501d7ab252bffe6c46d74a4feaccda59a72b4a
drbd_tarball() {
    if [[ -n "${DRBD_TARBALL:-}" ]]; then echo "$DRBD_TARBALL"; return; fi
    local vendored="$REPO_DIR/../shared/vendor/drbd-${DRBD_VERSION}.tar.gz"
    if [[ -f "$vendored" ]]; then echo "$vendored"; return; fi
    echo "https://pkg.linbit.com/downloads/drbd/9/drbd-${DRBD_VERSION}.tar.gz"
}

# The guest kernel follows Debian's linux-image-amd64 (the host's apt sources), unless
# DRBD_LAB_KERNEL_ABI pins one (e.g. 6.1.0-57-amd64).
kernel_abi() {
    if [[ -n "${DRBD_LAB_KERNEL_ABI:-}" ]]; then echo "$DRBD_LAB_KERNEL_ABI"; return; fi
    local dep
    dep="$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: linux-image-\([0-9].*-amd64\)$/\1/p' | head -1)"
    [[ -n "$dep" ]] || lab_die "cannot resolve linux-image-amd64 (run 'apt-get update', or set DRBD_LAB_KERNEL_ABI)"
    echo "$dep"
}

# Debian suite of the guest root (the host's own, so the kernel and drbd-utils come from one release).
guest_suite() { echo "${DRBD_LAB_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}"; }

# Packages of the guest root. curl for the agent's HTTP endpoints; resource-agents for OCF tests.
GUEST_PACKAGES="systemd,systemd-sysv,dbus,udev,drbd-utils,iproute2,kmod,procps,util-linux,jq,curl,resource-agents,iputils-ping,ca-certificates"

# Guests: memory (MiB) and TCG translation-block cache (MiB); 256/64 keeps a guest near 330 MiB RSS.
LAB_MEM="${LAB_MEM:-256}"
LAB_TB="${LAB_TB:-64}"
LAB_DATA_MB="${LAB_DATA_MB:-64}"

with_lock() { # with_lock FILE CMD...: serialize concurrent builds on one cache
    mkdir -p "$(dirname "$1")"
    local f=$1; shift
    ( flock 9; "$@" ) 9>"$f"
}
