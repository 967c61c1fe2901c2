#!/bin/sh
# Installs PostgreSQL 15 (the peer SphereDB's transactions are compared with) when it is
# missing: Debian's `postgresql` package. The benchmark starts its own throwaway server in a
# temporary directory; the package's own cluster is not used.
set -eu
PG_BIN_DIR=/usr/lib/postgresql/15/bin
if [ -x "$PG_BIN_DIR/postgres" ] && [ -x "$PG_BIN_DIR/initdb" ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing postgresql 15 (the comparison peer)..."
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null
else
    echo "error: the comparison needs PostgreSQL 15; install it with: sudo apt-get install -y postgresql-15" >&2
    exit 1
fi
