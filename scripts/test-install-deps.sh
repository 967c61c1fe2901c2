#!/bin/sh
# Tests libclang detection in install-deps.sh against prepared directory trees: a machine
# image that ships only libclang-cpp must count as "no libclang" (the build would fail in
# clang-sys), while versioned and unversioned libclang must count as present.
set -eu
cd "$(dirname "$0")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fail=0

check() { # name, expected exit code, files...
    name="$1"; want="$2"; shift 2
    tree="$tmp/$name"
    mkdir -p "$tree"
    for f in "$@"; do mkdir -p "$tree/$(dirname "$f")"; : > "$tree/$f"; done
    got=0
    LIBCLANG_PATH= SPHEREDB_LIBCLANG_ROOT="$tree" sh ./install-deps.sh --check-libclang 2>/dev/null || got=$?
    if [ "$got" = "$want" ]; then
        echo "ok   $name"
    else
        echo "FAIL $name: exit $got, expected $want"
        fail=1
    fi
}

check only-libclang-cpp 1 usr/lib/llvm-14/lib/libclang-cpp.so.14 usr/lib/x86_64-linux-gnu/libclang-cpp.so.14
check empty 1
check llvm-unversioned 0 usr/lib/llvm-14/lib/libclang.so
check llvm-versioned 0 usr/lib/llvm-14/lib/libclang.so.1
check debian-versioned 0 usr/lib/x86_64-linux-gnu/libclang-14.so.1
check cpp-and-real 0 usr/lib/x86_64-linux-gnu/libclang-cpp.so.14 usr/lib/x86_64-linux-gnu/libclang-14.so.14.0.6
exit $fail
