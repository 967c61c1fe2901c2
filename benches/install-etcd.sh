#!/bin/sh
# Installs etcd (the peer SphereDB is compared with) when it is missing.
set -eu
if command -v etcd >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing etcd-server (the comparison peer)..."
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
else
    echo "error: the comparison needs etcd; install it with: sudo apt-get install -y etcd-server" >&2
    exit 1
fi
