#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# End-to-end smoke test of the envtest scripts: build/cached tools, start a control plane,
# exercise kubectl, a CEL-validated CRD, ServiceAccount tokens + RBAC and helm, then stop.
# Last line of output: "N passed, N failed". Exit status 0 only if nothing failed.
set -uo pipefail
SELF_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "${SELF_DIR}/versions.env"

PASSED=0
FAILED=0
RUN_DIR=""
WORK="$(mktemp -d "${TMPDIR:-/tmp}/drbd-reactor-envtest-smoke.XXXXXXXX")"

summary() {
    echo "${PASSED} passed, ${FAILED} failed"
}
finish() {
    local rc=$?
    if [[ -n "$RUN_DIR" && -d "$RUN_DIR" ]]; then
        "${SELF_DIR}/stop.sh" "$RUN_DIR" || { echo "FAIL stop.sh in trap"; FAILED=$((FAILED + 1)); }
    fi
    rm -rf "$WORK"
    summary
    if (( FAILED > 0 || rc != 0 )); then exit 1; fi
    exit 0
}
trap finish EXIT

pass() { PASSED=$((PASSED + 1)); echo "PASS $1"; }
fail() {
    FAILED=$((FAILED + 1))
    echo "FAIL $1"
    # shellcheck disable=SC2001
    [[ -n "${2:-}" ]] && sed 's/^/     | /' <<<"$2"
    return 0
}
# check NAME CMD... : pass if CMD exits 0; output shown on failure
check() {
    local name="$1" out
    shift
    if out="$("$@" 2>&1)"; then pass "$name"; else fail "$name" "$out"; fi
}
# check_out NAME REGEX CMD... : pass if CMD exits 0 and its output matches REGEX
check_out() {
    local name="$1" re="$2" out
    shift 2
    if out="$("$@" 2>&1)" && grep -Eq -- "$re" <<<"$out"; then pass "$name"; else fail "$name" "$out"; fi
}
# check_fails_with NAME REGEX CMD... : pass if CMD exits non-zero and its output matches REGEX
check_fails_with() {
    local name="$1" re="$2" out
    shift 2
    if out="$("$@" 2>&1)"; then
        fail "$name (command unexpectedly succeeded)" "$out"
    elif grep -Eq -- "$re" <<<"$out"; then
        pass "$name"
    else
        fail "$name (wrong error)" "$out"
    fi
}

# ---- tools ----
t0=$SECONDS
if BIN_DIR="$("${SELF_DIR}/tools.sh")"; then
    pass "tools.sh -> ${BIN_DIR} ($((SECONDS - t0))s)"
else
    fail "tools.sh"
    exit 1
fi
export PATH="${BIN_DIR}:${PATH}"
check_out "etcd --version is the pinned 3.6.x (>= 3.5.13)" '^etcd Version: 3\.6\.' "${BIN_DIR}/etcd" --version
check_out "kubectl client version v${K8S_VERSION}" "\"gitVersion\": \"v${K8S_VERSION}\"" kubectl version --client -o json

# ---- start ----
t0=$SECONDS
if RUN_DIR="$(ENVTEST_BIN_DIR="$BIN_DIR" "${SELF_DIR}/start.sh")"; then
    pass "start.sh -> ${RUN_DIR} ($((SECONDS - t0))s)"
else
    RUN_DIR=""
    fail "start.sh"
    exit 1
fi
set -a
# shellcheck disable=SC1091
source "${RUN_DIR}/env"
set +a
for key in KUBECONFIG ENVTEST_DIR APISERVER_URL ENVTEST_ETCD_PID ENVTEST_APISERVER_PID ENVTEST_PIDS; do
    [[ -n "${!key:-}" ]] || fail "env file defines ${key}"
done
check_out "APISERVER_URL is loopback" '^https://127\.0\.0\.1:[0-9]+$' echo "$APISERVER_URL"

# every listening socket of etcd and kube-apiserver is on 127.0.0.1
listeners="$(ss -Htlnp 2>/dev/null | grep -E "pid=(${ENVTEST_ETCD_PID}|${ENVTEST_APISERVER_PID}),")"
if [[ -n "$listeners" ]] && ! awk '{print $4}' <<<"$listeners" | grep -qv '^127\.0\.0\.1:'; then
    pass "all listeners on 127.0.0.1 ($(awk '{print $4}' <<<"$listeners" | tr '\n' ' '))"
else
    fail "all listeners on 127.0.0.1" "$listeners"
fi

# ---- basic API ----
check_out "kubectl get ns" '^default +Active' kubectl get ns
check_out "server /version is v${K8S_VERSION}" "\"gitVersion\": \"v${K8S_VERSION}\"" kubectl version -o json
check_out "admin is system:masters" 'system:masters' kubectl auth whoami -o jsonpath='{.status.userInfo.groups}'

# ---- CRD with a CEL rule ----
cat >"${WORK}/crd.yaml" <<'EOF'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.smoke.drbd-reactor.test
spec:
  group: smoke.drbd-reactor.test
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [minReplicas, maxReplicas]
            properties:
              minReplicas: {type: integer}
              maxReplicas: {type: integer}
            x-kubernetes-validations:
            - rule: "self.minReplicas <= self.maxReplicas"
              message: "minReplicas must not exceed maxReplicas"
EOF
widget() {
    printf 'apiVersion: smoke.drbd-reactor.test/v1\nkind: Widget\nmetadata: {name: %s, namespace: default}\nspec: {minReplicas: %s, maxReplicas: %s}\n' "$1" "$2" "$3"
}
check "create CRD with x-kubernetes-validations" kubectl apply -f "${WORK}/crd.yaml"
check "CRD becomes Established" "${SELF_DIR}/wait-established.sh" "${BIN_DIR}/kubectl" "$KUBECONFIG" widgets.smoke.drbd-reactor.test 30
widget good 1 3 >"${WORK}/good.yaml"
widget bad 5 2 >"${WORK}/bad.yaml"
check "valid Widget accepted" kubectl create -f "${WORK}/good.yaml"
check_fails_with "invalid Widget rejected with the CEL message" \
    'Invalid value.*minReplicas must not exceed maxReplicas' kubectl create -f "${WORK}/bad.yaml"

# ---- ServiceAccount token + RBAC ----
check "create namespace smoke" kubectl create namespace smoke
check "create ServiceAccount" kubectl -n smoke create serviceaccount reader
check "create Role" kubectl -n smoke create role cm-reader --verb=get,list,watch --resource=configmaps
check "create RoleBinding" kubectl -n smoke create rolebinding cm-reader --role=cm-reader --serviceaccount=smoke:reader
TOKEN=""
if TOKEN="$(kubectl -n smoke create token reader --duration=10m 2>"${WORK}/token.err")" && [[ -n "$TOKEN" ]]; then
    pass "kubectl create token (TokenRequest)"
else
    fail "kubectl create token (TokenRequest)" "$(cat "${WORK}/token.err")"
fi
check_out "token authenticates as the ServiceAccount" '^system:serviceaccount:smoke:reader$' \
    kubectl auth whoami --token="$TOKEN" -o jsonpath='{.status.userInfo.username}'
check_out "SA allowed: list configmaps in smoke" '^yes$' kubectl auth can-i list configmaps -n smoke --token="$TOKEN"
check_out "SA allowed: kubectl get configmaps works" 'No resources found|NAME' kubectl get configmaps -n smoke --token="$TOKEN"
# `kubectl auth can-i` prints "no" and exits 1 when denied.
check_fails_with "SA denied: delete configmaps in smoke" '^no$' kubectl auth can-i delete configmaps -n smoke --token="$TOKEN"
check_fails_with "SA denied: list secrets in smoke" '^no$' kubectl auth can-i list secrets -n smoke --token="$TOKEN"
check_fails_with "SA denied: list configmaps in default" '^no$' kubectl auth can-i list configmaps -n default --token="$TOKEN"
check_fails_with "SA denied: real request gets 403 Forbidden" 'Forbidden' kubectl get secrets -n smoke --token="$TOKEN"
check_fails_with "bogus token is rejected (401)" 'Unauthorized|must be logged in' kubectl get ns --token=not-a-valid-token

# ---- helm ----
export HELM_CACHE_HOME="${WORK}/helm/cache" HELM_CONFIG_HOME="${WORK}/helm/config" HELM_DATA_HOME="${WORK}/helm/data"
check_out "helm version is v${HELM_VERSION}" "Version:\"v${HELM_VERSION}\"" helm version
mkdir -p "${WORK}/chart/templates"
printf 'apiVersion: v2\nname: smoke\nversion: 0.1.0\n' >"${WORK}/chart/Chart.yaml"
printf 'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\ndata:\n  k8s: {{ .Capabilities.KubeVersion.Version | quote }}\n' \
    >"${WORK}/chart/templates/cm.yaml"
check "helm install (no --wait: no controllers/kubelet)" helm install smoke "${WORK}/chart" -n smoke
check_out "helm release deployed" 'deployed' helm list -n smoke
check_out "chart saw server version v${K8S_VERSION}" "^v${K8S_VERSION}\$" kubectl -n smoke get cm smoke-cm -o jsonpath='{.data.k8s}'
check "helm uninstall" helm uninstall smoke -n smoke

# ---- stop ----
pids="${ENVTEST_ETCD_PID} ${ENVTEST_APISERVER_PID}"
if "${SELF_DIR}/stop.sh" "$RUN_DIR"; then
    pass "stop.sh"
else
    fail "stop.sh"
fi
alive=""
for p in $pids; do
    if [[ -d "/proc/$p" ]] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null; then alive+="$p "; fi
done
if [[ -z "$alive" && ! -e "$RUN_DIR" ]]; then
    pass "no process outlives stop.sh; run dir removed"
else
    fail "no process outlives stop.sh; run dir removed" "alive: ${alive:-none}; run dir exists: $([[ -e $RUN_DIR ]] && echo yes || echo no)"
fi
RUN_DIR=""
