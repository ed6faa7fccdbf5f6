#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Build (once) and cache kube-apiserver, etcd, kubectl and helm from Go modules.
#
#   tests/infra/envtest/tools.sh            -> prints the bin dir on stdout (nothing else)
#
# Cache layout (override the root with DRBD_REACTOR_TOOLS):
#   ${DRBD_REACTOR_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/drbd-reactor-tools}/
#       <k8s-version>/bin/{kube-apiserver,etcd,kubectl,helm,.stamp-<tool>}
#       gopath/   GOPATH + module cache (shared by all versions)
#       gocache/  Go build cache (shared by all versions)
# A tool is rebuilt only when its binary is missing or its stamp (versions, ldflags,
# go.mod/go.sum hash) changed. Set ENVTEST_REBUILD=1 to force rebuilding everything.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
setup_go_env

K8S_MOD_DIR="${ENVTEST_SRC_DIR}/modules/k8s"
HELM_MOD_DIR="${ENVTEST_SRC_DIR}/modules/helm"
for f in "$K8S_MOD_DIR/go.mod" "$K8S_MOD_DIR/go.sum" "$HELM_MOD_DIR/go.mod" "$HELM_MOD_DIR/go.sum"; do
    [[ -f "$f" ]] || die "missing $f (run update-modules.sh)"
done

mkdir -p "$TOOLS_BIN_DIR"

# Serialize concurrent runs (parallel test jobs) on the same cache.
if command -v flock >/dev/null 2>&1; then
    exec 9>"${TOOLS_ROOT}/.lock"
    flock 9
fi

kmajor="$(cut -d. -f1 <<<"$K8S_VERSION")"
kminor="$(cut -d. -f2 <<<"$K8S_VERSION")"
hmajor="$(cut -d. -f1 <<<"$HELM_VERSION")"
# Reproducible build date: the release time of the module as reported by the proxy would need
# a network call; a fixed epoch keeps the build cache and the stamps stable instead.
BUILD_DATE="1970-01-01T00:00:00Z"

# Same -X variables kubernetes' hack/lib/version.sh sets (client-go and component-base),
# so /version and `kubectl version` report v${K8S_VERSION} instead of v0.0.0-master+$Format:%H$.
k8s_ldflags() {
    local pkg out=""
    for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
        out+=" -X ${pkg}.gitVersion=v${K8S_VERSION}"
        out+=" -X ${pkg}.gitMajor=${kmajor}"
        out+=" -X ${pkg}.gitMinor=${kminor}"
        out+=" -X ${pkg}.gitCommit="
        out+=" -X ${pkg}.gitTreeState=clean"
        out+=" -X ${pkg}.buildDate=${BUILD_DATE}"
    done
    echo "-s -w${out}"
}
# Same -X variables helm's Makefile sets.
helm_ldflags() {
    local cg_minor
    cg_minor="$(cd "$HELM_MOD_DIR" && go list -m -f '{{.Version}}' k8s.io/client-go | cut -d. -f2)"
    echo "-s -w -X helm.sh/helm/v${hmajor}/internal/version.version=v${HELM_VERSION}" \
        "-X helm.sh/helm/v${hmajor}/internal/version.gitTreeState=clean" \
        "-X helm.sh/helm/v${hmajor}/pkg/lint/rules.k8sVersionMajor=1" \
        "-X helm.sh/helm/v${hmajor}/pkg/lint/rules.k8sVersionMinor=${cg_minor}" \
        "-X helm.sh/helm/v${hmajor}/pkg/chartutil.k8sVersionMajor=1" \
        "-X helm.sh/helm/v${hmajor}/pkg/chartutil.k8sVersionMinor=${cg_minor}"
}

# Tags as kubernetes' own non-debug builds use (hack/lib/golang.sh).
K8S_TAGS="selinux,notest,grpcnotrace"

hash_files() { cat "$@" | sha256sum | cut -d' ' -f1; }

# build_tool NAME MODULE_DIR PACKAGE TAGS LDFLAGS
build_tool() {
    local name="$1" moddir="$2" pkg="$3" tags="$4" ldflags="$5"
    local bin="${TOOLS_BIN_DIR}/${name}" stamp="${TOOLS_BIN_DIR}/.stamp-${name}"
    local key
    key="$(printf '%s\n' "$name" "$pkg" "$K8S_VERSION" "$HELM_VERSION" "$tags" "$ldflags" \
        "$(hash_files "$moddir/go.mod" "$moddir/go.sum")" | sha256sum | cut -d' ' -f1)"
    if [[ "${ENVTEST_REBUILD:-0}" != 1 && -x "$bin" && -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
        log "${name}: cached"
        return 0
    fi
    log "${name}: building ${pkg} (module $(basename "$moddir"))"
    local start=$SECONDS tmp="${TOOLS_BIN_DIR}/.${name}.tmp.$$"
    rm -f "$stamp"
    (
        cd "$moddir"
        go build -mod=readonly -trimpath -tags "$tags" -ldflags "$ldflags" -o "$tmp" "$pkg"
    ) || { rm -f "$tmp"; die "${name}: go build failed"; }
    mv -f "$tmp" "$bin"
    echo "$key" >"$stamp"
    log "${name}: built in $((SECONDS - start))s ($(du -h "$bin" | cut -f1))"
}

log "cache: ${TOOLS_ROOT}; kubernetes v${K8S_VERSION}, helm v${HELM_VERSION}, $(go env GOVERSION)"
KLD="$(k8s_ldflags)"
build_tool kube-apiserver "$K8S_MOD_DIR" k8s.io/kubernetes/cmd/kube-apiserver "$K8S_TAGS" "$KLD"
build_tool kubectl "$K8S_MOD_DIR" k8s.io/kubernetes/cmd/kubectl "$K8S_TAGS" "$KLD"
# etcd reports its version from a constant (go.etcd.io/etcd/api/v3/version.Version); no ldflags needed.
build_tool etcd "$K8S_MOD_DIR" go.etcd.io/etcd/server/v3 "" "-s -w"
build_tool helm "$HELM_MOD_DIR" helm.sh/helm/v3/cmd/helm "" "$(helm_ldflags)"

echo "$TOOLS_BIN_DIR"
