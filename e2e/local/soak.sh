# shellcheck shell=bash
# Soak phase of e2e/local/run.sh (`--soak SECONDS`, issue #9 item 3); sourced by run.sh after its checks, with
# its functions and state (NODES, SDPID, AGENT_PID, ctl, sd, running, role, start_agent, promoter_policy …).
# Random faults every 2–5 s: node crash/boot (the node's agent is killed and its services die with it; the
# simulated node goes down), link cut/heal, promoter policy edits (evict a node, clear evict). Every 0.5 s a
# sample: on how many nodes the unit runs, and whether they have quorum. At the end: the figures, and checks
# (never two nodes running the services with quorum; every promotion ran the UMH rule exactly once; agent
# RSS flat; no panics).
SOAK_END=$((SECONDS + SOAK))
log "soak: ${SOAK} s of random faults"
promoter_policy ""
eventually "soak: services run on one node before the faults start" one_runs

rss_kib() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\).*/\1/p' "/proc/$1/status" 2>/dev/null; }
quorum_of() { sim "$1" status "$RES" --json 2>/dev/null | json 'd[0]["devices"][0]["quorum"]'; }
umh_lines() {
    local n t=0 c
    for n in "${NODES[@]}"; do
        c="$(grep -cx "$RES Secondary->Primary" "${SDRUNDIR[$n]}/$UMH_MARK" 2>/dev/null || true)"
        t=$((t + ${c:-0}))
    done
    echo "$t"
}
promotions() { grep -c '"op":"primary"' "$CLUSTER/journal.jsonl" || true; }

declare -A DOWN RSS0 RSSMAX
for n in "${NODES[@]}"; do DOWN[$n]=0; done
umh0="$(umh_lines)"
prom0="$(promotions)"
faults=0 samples=0 s_one=0 s_none=0 s_two_quorum=0 s_without_quorum=0 crashes=0 cuts=0 edits=0
next_fault=$((SECONDS + 2))
sample_rss() {
    local n p r
    for n in "${NODES[@]}"; do
        p="${AGENT_PID[$n]:-}"
        [[ -n "$p" && "${DOWN[$n]}" == 0 ]] || continue
        r="$(rss_kib "$p")"
        [[ -n "$r" ]] || continue
        [[ -n "${RSS0[$p]:-}" ]] || RSS0[$p]="$r"
        if ((r > ${RSSMAX[$p]:-0})); then RSSMAX[$p]="$r"; fi
    done
    return 0
}
crash() {
    local n="$1"
    kill "${AGENT_PID[$n]}" 2>/dev/null || true
    wait "${AGENT_PID[$n]}" 2>/dev/null || true
    # Its services die with the node (the node's systemd stays up: it is "rebooted" empty).
    sd "$n" systemctl kill --signal=SIGKILL "$UNIT" >/dev/null 2>&1 || true
    sd "$n" systemctl stop "drbd-services@$RES.target" "$UNIT" "drbd-promote@$RES.service" >/dev/null 2>&1 || true
    sd "$n" systemctl reset-failed >/dev/null 2>&1 || true
    ctl node-down "$n"
    DOWN[$n]=1
}
boot() {
    local n="$1"
    ctl node-up "$n"
    DOWN[$n]=0
    start_agent "$n"
}
random_fault() {
    local n a b down=""
    for n in "${NODES[@]}"; do [[ "${DOWN[$n]}" == 1 ]] && down="$n"; done
    case $((RANDOM % 4)) in
        0) # a node crashes, or the crashed one boots
            if [[ -n "$down" ]]; then boot "$down"; log "soak: $down boots"
            else n="${NODES[RANDOM % 3]}"; crash "$n"; crashes=$((crashes + 1)); log "soak: $n crashes"; fi ;;
        1) # cut a link, or heal all
            a="${NODES[RANDOM % 3]}"; b="${NODES[RANDOM % 3]}"
            if [[ "$a" != "$b" ]]; then ctl cut "$a" "$b" 2>/dev/null && { cuts=$((cuts + 1)); log "soak: cut $a-$b"; }
            else for a in n1:n2 n1:n3 n2:n3; do ctl heal "${a%:*}" "${a#*:}" 2>/dev/null || true; done; log "soak: heal all"; fi ;;
        2) # policy edit: evict a random node, or clear evict
            if ((RANDOM % 2)); then n="${NODES[RANDOM % 3]}"; promoter_policy "$n"; log "soak: evict $n"
            else promoter_policy ""; log "soak: evict none"; fi
            edits=$((edits + 1)) ;;
        3) # heal everything and boot a crashed node: let the cluster recover
            for a in n1:n2 n1:n3 n2:n3; do ctl heal "${a%:*}" "${a#*:}" 2>/dev/null || true; done
            [[ -n "$down" ]] && boot "$down"
            log "soak: recover" ;;
    esac
    faults=$((faults + 1))
}

overlaps=0
take_sample() {
    local n
    on="" with_q=0 without_q=0
    for n in "${NODES[@]}"; do
        [[ "${DOWN[$n]}" == 0 ]] || continue
        if unit_active "$n"; then
            on+="$n "
            if [[ "$(quorum_of "$n")" == True ]]; then with_q=$((with_q + 1)); else without_q=$((without_q + 1)); fi
        fi
    done
}
while ((SECONDS < SOAK_END)); do
    if ((SECONDS >= next_fault)); then
        random_fault
        next_fault=$((SECONDS + 2 + RANDOM % 4))
    fi
    take_sample
    if ((with_q > 1)); then
        # The nodes are read one after the other (~0.1 s apart): a hand-over between two reads looks like
        # an overlap. Only an overlap that a second reading confirms counts.
        overlaps=$((overlaps + 1))
        take_sample
    fi
    samples=$((samples + 1))
    ((with_q == 1)) && s_one=$((s_one + 1))
    ((with_q + without_q == 0)) && s_none=$((s_none + 1))
    if ((with_q > 1)); then s_two_quorum=$((s_two_quorum + 1)); log "soak: VIOLATION: services with quorum on ${on}"; fi
    ((without_q > 0)) && s_without_quorum=$((s_without_quorum + 1))
    ((samples % 10 == 0)) && sample_rss
    sleep 0.5
done

# Recover, let the last promotions' UMH runs finish, then count.
for a in n1:n2 n1:n3 n2:n3; do ctl heal "${a%:*}" "${a#*:}" 2>/dev/null || true; done
for n in "${NODES[@]}"; do [[ "${DOWN[$n]}" == 1 ]] && boot "$n"; done
promoter_policy ""
eventually "soak: after the faults the services run on exactly one node again" one_runs
sleep 3
sample_rss
umh_runs=$(($(umh_lines) - umh0))
proms=$(($(promotions) - prom0))

log "soak figures: ${SOAK} s, ${faults} faults (${crashes} crashes, ${cuts} cuts, ${edits} policy edits), ${samples} samples"
log "soak figures: services on exactly one node with quorum in ${s_one} samples, on none in ${s_none} (failover gaps),"
log "              on a node without quorum (until it reacts) in ${s_without_quorum}, on two nodes with quorum in ${s_two_quorum}"
log "soak figures: ${overlaps} apparent overlaps between sequential reads, not confirmed by a second reading unless counted above"
log "soak figures: ${proms} promotions in the simulated cluster, ${umh_runs} UMH runs"
for p in "${!RSS0[@]}"; do
    log "soak figures: agent pid $p RSS first ${RSS0[$p]} KiB, max ${RSSMAX[$p]} KiB"
done
check "soak: never two nodes running the services with quorum (${s_two_quorum} of ${samples} samples)" test "$s_two_quorum" -eq 0
check "soak: every promotion ran the UMH rule exactly once (${proms} promotions, ${umh_runs} runs)" test "$proms" -eq "$umh_runs"
rss_flat() {
    local p
    # Flat: the maximum stays within 25 % + 8 MiB of the first sample of that process.
    for p in "${!RSS0[@]}"; do ((RSSMAX[$p] <= RSS0[$p] * 5 / 4 + 8192)) || return 1; done
}
check "soak: agent RSS flat (max within 25 % + 8 MiB of the first sample)" rss_flat
if grep -l -i 'panicked' "$WORK"/agent-*.log >/dev/null 2>&1; then
    fail "soak: a panic in the agents' logs: $(grep -h -i -m3 panicked "$WORK"/agent-*.log)"
else
    pass "soak: no panic in the agents' logs"
fi
