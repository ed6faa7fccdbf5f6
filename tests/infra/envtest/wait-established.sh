#!/usr/bin/env bash
# wait-established.sh KUBECTL KUBECONFIG CRD-NAME [TIMEOUT-SECONDS]
#
# Waits until the CustomResourceDefinition CRD-NAME reports condition Established=True.
# `kubectl wait --for=condition=Established` is not usable right after the CRD is created: until the
# apiserver's controller writes the first condition, `.status.conditions` is null and kubectl 1.34 exits 1
# with ".status.conditions accessor error: <nil> is of the type <nil>" instead of waiting. This polls the
# condition with a jsonpath query, which treats a missing status as "not yet".
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 KUBECTL KUBECONFIG CRD-NAME [TIMEOUT-SECONDS]" >&2; exit 2; }
kubectl="$1" kubeconfig="$2" crd="$3" timeout="${4:-60}"
deadline=$((SECONDS + timeout))
query='{.status.conditions[?(@.type=="Established")].status}'
while :; do
    status="$("$kubectl" --kubeconfig "$kubeconfig" get crd "$crd" -o jsonpath="$query" 2>/dev/null || true)"
    [ "$status" = True ] && exit 0
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "crd/$crd not Established after ${timeout}s (Established=${status:-<none>})" >&2
        "$kubectl" --kubeconfig "$kubeconfig" get crd "$crd" -o yaml >&2 || true
        exit 1
    fi
    sleep 0.2
done
