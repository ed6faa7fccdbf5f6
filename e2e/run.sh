#!/usr/bin/env bash
# kind end-to-end test with a real DRBD 9 kernel module (see e2e/README.md). Needs: Linux, a Docker
# engine, the drbd module (9.x) loaded on the host, kind, kubectl, helm. Not run by .ci/run.
#
#   e2e/run.sh                 build the image, create the cluster, test, delete everything
#   KEEP=1 e2e/run.sh          keep the cluster (and the DRBD resource) for debugging
#   SKIP_BUILD=1 e2e/run.sh    use an existing drbd-reactor:e2e image
#
# Asserts: the DaemonSet becomes ready; the DRBD families of a single-node resource on a loop device
# are scraped from /metrics; a UMH rule fires on promotion; a promoter policy starts a unit on the
# node's systemd and stops it when the policy is removed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${CLUSTER:-drbd-reactor-e2e}"
NODE="${CLUSTER}-control-plane"
NS=drbd-reactor
IMAGE=drbd-reactor:e2e
RES=e2e
MINOR=1000
PORT=7900
KUBECTL=(kubectl --context "kind-${CLUSTER}")
TIMEOUT="${TIMEOUT:-180}"

passed=0
failed=0
log() { printf '[e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
pass() { passed=$((passed + 1)); log "PASS $*"; }
fail() { failed=$((failed + 1)); log "FAIL $*"; }
die() { log "ERROR: $*"; exit 1; }
node() { docker exec "$NODE" "$@"; }

# eventually DESCRIPTION CMD...: poll CMD every 2 s for up to $TIMEOUT s.
eventually() {
    local what="$1" deadline=$((SECONDS + TIMEOUT))
    shift
    while ((SECONDS < deadline)); do
        if "$@" >/dev/null 2>&1; then pass "$what"; return 0; fi
        sleep 2
    done
    fail "$what (not within ${TIMEOUT}s)"
    return 1
}

# ---- preflight ------------------------------------------------------------------------------------
for t in docker kind kubectl helm; do
    command -v "$t" >/dev/null || die "'$t' not found"
done
docker info >/dev/null 2>&1 || die "no Docker engine reachable"
[[ -r /proc/drbd ]] || die "the drbd kernel module is not loaded (modprobe drbd; see e2e/README.md)"
grep -q '^version: 9\.' /proc/drbd || die "DRBD 9 needed, have: $(head -1 /proc/drbd)"
if drbdsetup status "$RES" >/dev/null 2>&1; then
    die "a DRBD resource '$RES' already exists on this host (resources are kernel-global)"
fi

cleanup() {
    local rc=$?
    if [[ "${KEEP:-0}" == 1 ]]; then
        log "KEEP=1: cluster ${CLUSTER} and DRBD resource ${RES} kept"
        return
    fi
    log "cleaning up"
    if docker inspect "$NODE" >/dev/null 2>&1; then
        # DRBD resources and loop devices belong to the host kernel: remove them before the node.
        node drbdsetup down "$RES" 2>/dev/null || true
        # shellcheck disable=SC2016 # expanded in the node
        node sh -c 'for l in $(losetup -j /var/lib/drbd-e2e.img -O NAME -n); do losetup -d "$l"; done' || true
    fi
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    exit "$rc"
}
trap cleanup EXIT

# ---- image and cluster ----------------------------------------------------------------------------
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    log "building ${IMAGE}"
    docker build -t "$IMAGE" "$ROOT"
fi
log "image size: $(docker image inspect "$IMAGE" --format '{{.Size}}') bytes"

kind create cluster --name "$CLUSTER" --config "$ROOT/e2e/kind/cluster.yaml" --wait 120s
log "installing drbd-utils in ${NODE}"
node sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends drbd-utils >/dev/null'
node drbdadm --version | head -3 >&2
kind load docker-image "$IMAGE" --name "$CLUSTER"

# ---- the chart --------------------------------------------------------------------------------------
helm install drbd-reactor "$ROOT/charts/drbd-reactor" --kube-context "kind-${CLUSTER}" \
    --namespace "$NS" --create-namespace -f "$ROOT/e2e/kind/values.yaml"
if "${KUBECTL[@]}" -n "$NS" rollout status ds/drbd-reactor --timeout="${TIMEOUT}s"; then
    pass "DaemonSet ready on every node (tolerations, probes, hostPath mounts)"
else
    fail "DaemonSet not ready"
    "${KUBECTL[@]}" -n "$NS" describe pods >&2 || true
    "${KUBECTL[@]}" -n "$NS" logs ds/drbd-reactor --tail=50 >&2 || true
    exit 1
fi
POD="$("${KUBECTL[@]}" -n "$NS" get pods -l app.kubernetes.io/component=agent -o jsonpath='{.items[0].metadata.name}')"
metrics() { "${KUBECTL[@]}" get --raw "/api/v1/namespaces/${NS}/pods/${POD}:9942/proxy/metrics"; }
# (the output is captured first: with pipefail, `metrics | grep -q` fails when grep exits early)
metric_has() { local m; m="$(metrics)" && grep -qF -- "$1" <<<"$m"; }

# ---- a single-node DRBD resource on a loop device in the node -------------------------------------
log "creating DRBD resource ${RES} on a loop device"
node sh -ec "
    truncate -s 64M /var/lib/drbd-e2e.img
    loop=\$(losetup -f --show /var/lib/drbd-e2e.img)
    cat >/etc/drbd.d/${RES}.res <<RES
resource ${RES} {
    device minor ${MINOR};
    disk \$loop;
    meta-disk internal;
    on ${NODE} { node-id 0; address 127.0.0.1:${PORT}; }
}
RES
    drbdadm -- --force create-md ${RES}
    drbdadm up ${RES}
    drbdadm -- --force primary ${RES}
    drbdadm secondary ${RES}
"
eventually "metrics: drbd_resource_resources counts the resource" metric_has 'drbd_resource_resources 1'
eventually "metrics: the device of ${RES} is UpToDate" \
    metric_has "drbd_device_state{name=\"${RES}\",volume=\"0\",minor=\"${MINOR}\",drbd_device_state=\"UpToDate\"} 1"
eventually "metrics: ${RES} is Secondary" \
    metric_has "drbd_resource_role{name=\"${RES}\",drbd_resource_role=\"Secondary\"} 1"
version_known() { local m; m="$(metrics)" && grep '^drbd_version{' <<<"$m" | grep -vq 'kmod="0.0.0"'; }
eventually "metrics: drbd_version reports the host's kernel module" version_known

# ---- UMH: a rule fires on promotion -----------------------------------------------------------------
"${KUBECTL[@]}" apply -f "$ROOT/e2e/kind/umh-policy.yaml"
eventually "UMH policy running" metric_has 'drbdreactor_plugin_instances{state="running",type="umh"} 1'
node rm -f /run/drbd-reactor-e2e.umh
node drbdadm primary "$RES"
eventually "UMH rule ran on the node at promotion" node grep -qx "${RES} Secondary->Primary" /run/drbd-reactor-e2e.umh
eventually "metrics: drbdreactor_umh_runs_total counts the run" \
    metric_has 'drbdreactor_umh_runs_total{policy="e2e-umh",result="0",rule="promoted"} 1'
node drbdadm secondary "$RES"
"${KUBECTL[@]}" delete -f "$ROOT/e2e/kind/umh-policy.yaml"

# ---- promoter: a unit on the node's systemd ---------------------------------------------------------
node sh -c "cat >/run/systemd/system/drbd-reactor-e2e-dummy.service" <"$ROOT/e2e/kind/dummy.service"
node systemctl daemon-reload
"${KUBECTL[@]}" apply -f "$ROOT/e2e/kind/promoter-policy.yaml"
eventually "promoter promoted ${RES}" sh -c "docker exec $NODE drbdsetup status $RES | grep -q 'role:Primary'"
eventually "promoter started drbd-reactor-e2e-dummy.service on the node" \
    node systemctl is-active --quiet drbd-reactor-e2e-dummy.service
eventually "metrics: promoter start counted" metric_has "drbdreactor_promoter_actions_total{action=\"start\",resource=\"${RES}\",result=\"ok\"}"
"${KUBECTL[@]}" delete -f "$ROOT/e2e/kind/promoter-policy.yaml"
eventually "promoter stopped the unit when its policy was removed" \
    sh -c "! docker exec $NODE systemctl is-active --quiet drbd-reactor-e2e-dummy.service"
eventually "promoter demoted ${RES}" sh -c "docker exec $NODE drbdsetup status $RES | grep -q 'role:Secondary'"

log "${passed} passed, ${failed} failed"
echo "${passed} passed, ${failed} failed"
((failed == 0))
