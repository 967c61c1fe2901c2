#!/bin/sh
# Installs the real PostgreSQL clients the SQL tests drive SphereDB with: psql (Debian
# `postgresql-client`) and Python's psycopg 3 (`python3-psycopg`), for /usr/bin/python3.
set -eu
pkgs=""
command -v psql >/dev/null 2>&1 || pkgs=" postgresql-client"
/usr/bin/python3 -c "import psycopg" >/dev/null 2>&1 || pkgs="$pkgs python3-psycopg"
[ -z "$pkgs" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing$pkgs (the SQL tests' clients)..."
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
else
    echo "error: the SQL tests need$pkgs; install with: sudo apt-get install -y$pkgs" >&2
    exit 1
fi
