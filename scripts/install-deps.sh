#!/bin/sh
# Installs what building SphereDB needs beyond a Rust toolchain and a C++ compiler:
# libclang (RocksDB's bindings are generated with bindgen). protoc is vendored.
set -eu

have_libclang() {
    [ -n "${LIBCLANG_PATH:-}" ] && return 0
    for f in /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/*-linux-gnu/libclang*.so*; do
        [ -e "$f" ] && return 0
    done
    return 1
}

if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found; install Rust from https://rustup.rs" >&2
    exit 1
fi
if ! command -v c++ >/dev/null 2>&1; then
    missing_cxx=1
else
    missing_cxx=0
fi

if have_libclang && [ "$missing_cxx" = 0 ]; then
    exit 0
fi
pkgs="libclang-dev"
[ "$missing_cxx" = 1 ] && pkgs="$pkgs g++"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing $pkgs (needed to build RocksDB)..."
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs >/dev/null
else
    echo "error: building SphereDB needs the package(s) $pkgs; install with: sudo apt-get install -y $pkgs" >&2
    exit 1
fi
