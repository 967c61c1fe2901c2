#!/bin/sh
# Installs what the Jepsen tester's faults need: iptables for partitions and libfaketime
# (Debian package `faketime`) for clock skew and clock rates. Both are used as root.
set -eu

pkgs=""
# SPHEREDB_JEPSEN_NO_NETFILTER=1 skips the partition tests, and with them iptables.
if [ "${SPHEREDB_JEPSEN_NO_NETFILTER:-}" != 1 ]; then
    command -v iptables >/dev/null 2>&1 || pkgs=" iptables"
fi
found=0
for f in /usr/lib/*-linux-gnu/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1; do
    [ -e "$f" ] && found=1
done
[ "$found" = 1 ] || pkgs="$pkgs faketime"
[ -z "$pkgs" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing$pkgs (needed by the Jepsen tester's faults)..."
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
else
    echo "error: the Jepsen tester needs the package(s)$pkgs; install with: sudo apt-get install -y$pkgs" >&2
    exit 1
fi
