#!/bin/bash
# Static addresses from the kernel command line: lab.net=eth0=10.0.12.1/24,eth1=10.0.13.1/24
ip link set lo up
for kv in $(tr ' ' '\n' < /proc/cmdline | sed -n 's/^lab\.net=//p' | tr ',' ' '); do
    dev=${kv%%=*}; addr=${kv#*=}
    for _ in $(seq 100); do [ -e "/sys/class/net/$dev" ] && break; sleep 0.05; done
    ip addr add "$addr" dev "$dev"; ip link set "$dev" up
done
