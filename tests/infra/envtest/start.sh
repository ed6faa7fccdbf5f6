#!/usr/bin/env bash
# Start a throw-away etcd + kube-apiserver bound only to 127.0.0.1.
#
#   RUN_DIR="$(tests/infra/envtest/start.sh)"   # prints the run dir on stdout (nothing else)
#   source "$RUN_DIR/env"                       # KUBECONFIG, APISERVER_URL, ...
#   ...
#   tests/infra/envtest/stop.sh "$RUN_DIR"
#
# Binaries come from $ENVTEST_BIN_DIR if set, else from tools.sh (builds once, then cached).
# Run dir contents: kubeconfig (admin, token auth, group system:masters), env, certs/,
# etcd-data/, etcd.log, kube-apiserver.log, etcd.pid, kube-apiserver.pid.
# Env knobs: ENVTEST_START_TIMEOUT (s, default 60), ENVTEST_KEEP_ON_FAILURE=1 (keep run dir
# for debugging when start fails; processes are still killed), ENVTEST_APISERVER_ARGS
# (extra kube-apiserver flags, whitespace separated).
set -euo pipefail
SELF_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { printf '[envtest %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for cmd in openssl curl base64; do
    command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' not found on PATH"
done

BIN_DIR="${ENVTEST_BIN_DIR:-$("${SELF_DIR}/tools.sh")}"
for b in etcd kube-apiserver; do
    [[ -x "${BIN_DIR}/${b}" ]] || die "${BIN_DIR}/${b} missing (run tools.sh)"
done
TIMEOUT="${ENVTEST_START_TIMEOUT:-60}"

RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/drbd-reactor-envtest.XXXXXXXX")"
# Canonical path: stop.sh matches it against the processes' command lines.
RUN_DIR="$(cd "$RUN_DIR" && pwd -P)"
# The env file is KEY=VALUE without quoting; refuse paths that would need it.
[[ "$RUN_DIR" =~ ^[A-Za-z0-9_./-]+$ ]] || { rmdir "$RUN_DIR"; die "unsupported characters in run dir path: $RUN_DIR"; }
chmod 700 "$RUN_DIR"

STARTED_PIDS=()
cleanup_on_failure() {
    local rc=$?
    (( rc == 0 )) && return 0
    log "start failed (rc=${rc}); stopping what was started"
    local f
    for f in "$RUN_DIR"/*.log; do
        [[ -f "$f" ]] || continue
        log "---- last lines of $(basename "$f") ----"
        tail -n 25 "$f" >&2 || true
    done
    if [[ "${ENVTEST_KEEP_ON_FAILURE:-0}" == 1 ]]; then
        ENVTEST_KEEP_RUN_DIR=1 "${SELF_DIR}/stop.sh" "$RUN_DIR" || true
        log "kept ${RUN_DIR} for inspection"
    else
        "${SELF_DIR}/stop.sh" "$RUN_DIR" || true
    fi
    exit "$rc"
}
trap cleanup_on_failure EXIT

# ---- free loopback ports --------------------------------------------------------------
# Pick random ports below the kernel's ephemeral range and check nothing listens there.
# A race with another process is still possible; callers retry start on bind failures.
read -r EPH_LO _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || EPH_LO=32768
PORT_LO=10000
PORT_HI=$(( EPH_LO > 20000 ? EPH_LO - 1 : 29999 ))
TAKEN_PORTS=" "
port_in_use() {
    if command -v ss >/dev/null 2>&1; then
        [[ -n "$(ss -Htan "sport = :$1" 2>/dev/null)" ]]
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}
# free_port VAR: store a free port in VAR (no subshell, so TAKEN_PORTS is kept).
free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$(( PORT_LO + (RANDOM * 32768 + RANDOM) % (PORT_HI - PORT_LO + 1) ))
        [[ "$TAKEN_PORTS" == *" $p "* ]] && continue
        if ! port_in_use "$p"; then
            TAKEN_PORTS+="$p "
            printf -v "$1" '%s' "$p"
            return 0
        fi
    done
    die "no free port found"
}

# ---- certificates and credentials ----------------------------------------------------------
CERTS="${RUN_DIR}/certs"
mkdir -p "$CERTS"
log "generating CA, serving cert and service-account keys in ${CERTS}"
(
    cd "$CERTS"
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
    openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=drbd-reactor-envtest-ca" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out ca.crt 2>/dev/null
    openssl ecparam -name prime256v1 -genkey -noout -out apiserver.key 2>/dev/null
    openssl req -new -key apiserver.key -subj "/CN=kube-apiserver" -out apiserver.csr 2>/dev/null
    printf '%s\n' \
        "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" \
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.0.0.1" \
        >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -sha256 \
        -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    # ServiceAccount token signing key pair (TokenRequest / `kubectl create token`).
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
    openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f apiserver.csr apiserver.ext ca.srl
    chmod 600 ./*.key
)
ADMIN_TOKEN="$(openssl rand -hex 32)"
# CSV: token,user,uid,"group1,group2"
printf '%s,envtest-admin,envtest-admin-uid,"system:masters"\n' "$ADMIN_TOKEN" >"${CERTS}/tokens.csv"
chmod 600 "${CERTS}/tokens.csv"

# ---- etcd ------------------------------------------------------------------------------------
ETCD_EXTRA=()
if "${BIN_DIR}/etcd" --help 2>&1 | grep -q -- '--unsafe-no-fsync'; then
    ETCD_EXTRA+=(--unsafe-no-fsync=true)
fi

# wait_until DEADLINE_SECONDS PID DESCRIPTION CMD... : poll CMD every 0.2 s while PID lives
wait_until() {
    local deadline=$(( SECONDS + $1 )) pid="$2"
    shift 3  # $3: description, for readability at call sites
    while (( SECONDS < deadline )); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        kill -0 "$pid" 2>/dev/null || return 2
        sleep 0.2
    done
    return 1
}

start_etcd() {
    free_port ETCD_CLIENT_PORT
    free_port ETCD_PEER_PORT
    ETCD_URL="http://127.0.0.1:${ETCD_CLIENT_PORT}"
    local peer="http://127.0.0.1:${ETCD_PEER_PORT}"
    rm -rf "${RUN_DIR}/etcd-data"
    "${BIN_DIR}/etcd" \
        --name=envtest \
        --data-dir="${RUN_DIR}/etcd-data" \
        --listen-client-urls="$ETCD_URL" \
        --advertise-client-urls="$ETCD_URL" \
        --listen-peer-urls="$peer" \
        --initial-advertise-peer-urls="$peer" \
        --initial-cluster="envtest=${peer}" \
        --initial-cluster-state=new \
        --log-level=warn \
        "${ETCD_EXTRA[@]}" \
        </dev/null >"${RUN_DIR}/etcd.log" 2>&1 &
    ETCD_PID=$!
    echo "$ETCD_PID" >"${RUN_DIR}/etcd.pid"
    STARTED_PIDS+=("$ETCD_PID")
}

etcd_healthy() { curl -fsS --max-time 2 "${ETCD_URL}/health" | grep -q '"health":"true"'; }

start=$SECONDS
for attempt in 1 2 3; do
    start_etcd
    log "etcd pid ${ETCD_PID} on ${ETCD_URL} (peer port ${ETCD_PEER_PORT}, ${ETCD_EXTRA[*]:-fsync on})"
    rc=0
    wait_until "$TIMEOUT" "$ETCD_PID" etcd etcd_healthy || rc=$?
    (( rc == 0 )) && break
    if (( rc == 2 )) && grep -q 'address already in use' "${RUN_DIR}/etcd.log" && (( attempt < 3 )); then
        log "etcd port race, retrying with other ports"
        continue
    fi
    (( rc == 2 )) && die "etcd exited before becoming healthy (see etcd.log above)"
    die "etcd not healthy within ${TIMEOUT}s"
done

# ---- kube-apiserver -----------------------------------------------------------------------------
start_apiserver() {
    free_port API_PORT
    APISERVER_URL="https://127.0.0.1:${API_PORT}"
    local extra=()
    # shellcheck disable=SC2206
    [[ -n "${ENVTEST_APISERVER_ARGS:-}" ]] && extra=(${ENVTEST_APISERVER_ARGS})
    "${BIN_DIR}/kube-apiserver" \
        --etcd-servers="$ETCD_URL" \
        --bind-address=127.0.0.1 \
        --advertise-address=127.0.0.1 \
        --secure-port="$API_PORT" \
        --cert-dir="$CERTS" \
        --tls-cert-file="${CERTS}/apiserver.crt" \
        --tls-private-key-file="${CERTS}/apiserver.key" \
        --client-ca-file="${CERTS}/ca.crt" \
        --token-auth-file="${CERTS}/tokens.csv" \
        --authorization-mode=RBAC \
        --service-account-issuer="$APISERVER_URL" \
        --service-account-key-file="${CERTS}/sa.pub" \
        --service-account-signing-key-file="${CERTS}/sa.key" \
        --service-cluster-ip-range=10.0.0.0/24 \
        --allow-privileged=true \
        --disable-admission-plugins=ServiceAccount \
        --endpoint-reconciler-type=none \
        "${extra[@]}" \
        </dev/null >"${RUN_DIR}/kube-apiserver.log" 2>&1 &
    API_PID=$!
    echo "$API_PID" >"${RUN_DIR}/kube-apiserver.pid"
    STARTED_PIDS+=("$API_PID")
}

api_ready() {
    [[ "$(curl -sS --max-time 2 --cacert "${CERTS}/ca.crt" -H "Authorization: Bearer ${ADMIN_TOKEN}" \
        "${APISERVER_URL}/readyz")" == ok ]]
}

for attempt in 1 2 3; do
    start_apiserver
    log "kube-apiserver pid ${API_PID} on ${APISERVER_URL}"
    remaining=$(( TIMEOUT - (SECONDS - start) ))
    (( remaining < 1 )) && remaining=1
    rc=0
    wait_until "$remaining" "$API_PID" kube-apiserver api_ready || rc=$?
    (( rc == 0 )) && break
    if (( rc == 2 )) && grep -q 'address already in use' "${RUN_DIR}/kube-apiserver.log" && (( attempt < 3 )); then
        log "kube-apiserver port race, retrying with another port"
        continue
    fi
    if (( rc == 1 )); then
        log "/readyz verbose output:"
        curl -sS --max-time 5 --cacert "${CERTS}/ca.crt" -H "Authorization: Bearer ${ADMIN_TOKEN}" \
            "${APISERVER_URL}/readyz?verbose" >&2 || true
    fi
    (( rc == 2 )) && die "kube-apiserver exited before becoming ready (see kube-apiserver.log above)"
    die "kube-apiserver not ready within ${TIMEOUT}s"
done
log "kube-apiserver ready after $(( SECONDS - start ))s"

# ---- kubeconfig + env ------------------------------------------------------------------------------
cat >"${RUN_DIR}/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: envtest
  cluster:
    server: ${APISERVER_URL}
    certificate-authority-data: $(base64 -w0 <"${CERTS}/ca.crt")
users:
- name: envtest-admin
  user:
    token: ${ADMIN_TOKEN}
contexts:
- name: envtest
  context:
    cluster: envtest
    user: envtest-admin
    namespace: default
current-context: envtest
EOF
chmod 600 "${RUN_DIR}/kubeconfig"

# Plain KEY=VALUE lines (no quoting needed): `source` it from shell or parse it from tests.
cat >"${RUN_DIR}/env" <<EOF
KUBECONFIG=${RUN_DIR}/kubeconfig
ENVTEST_DIR=${RUN_DIR}
APISERVER_URL=${APISERVER_URL}
ENVTEST_BIN_DIR=${BIN_DIR}
ENVTEST_CA_FILE=${CERTS}/ca.crt
ENVTEST_ADMIN_TOKEN=${ADMIN_TOKEN}
ENVTEST_ETCD_URL=${ETCD_URL}
ENVTEST_ETCD_PID=${ETCD_PID}
ENVTEST_APISERVER_PID=${API_PID}
ENVTEST_PIDS=${ETCD_PID},${API_PID}
EOF

trap - EXIT
echo "$RUN_DIR"
