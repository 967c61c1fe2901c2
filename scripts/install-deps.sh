#!/bin/sh
# Installs what building SphereDB needs beyond a Rust toolchain and a C++ compiler:
# libclang (RocksDB's bindings are generated with bindgen). protoc is vendored.
#
# Only `libclang.so*` or `libclang-<version>.so*` is libclang. `libclang-cpp.so.*` (the C++
# library, shipped in some machine images without libclang) is not, and bindgen cannot load it.
# SPHEREDB_LIBCLANG_ROOT (default /) names the root the search starts from, so the detection
# can be tested against a prepared directory tree (scripts/test-install-deps.sh).
set -eu

root="${SPHEREDB_LIBCLANG_ROOT:-}"

is_libclang() {
    case "$(basename "$1")" in
        libclang-cpp*) return 1 ;;
        libclang.so | libclang.so.*) return 0 ;;
        libclang-[0-9]*.so | libclang-[0-9]*.so.*) return 0 ;;
        *) return 1 ;;
    esac
}

have_libclang() {
    if [ -n "${LIBCLANG_PATH:-}" ]; then
        for f in "$LIBCLANG_PATH"/libclang*.so*; do
            [ -e "$f" ] && is_libclang "$f" && return 0
        done
        echo "warning: LIBCLANG_PATH=$LIBCLANG_PATH holds no libclang.so; looking elsewhere" >&2
    fi
    for f in "$root"/usr/lib/llvm-*/lib/libclang*.so* "$root"/usr/lib/*-linux-gnu/libclang*.so* \
        "$root"/usr/lib/libclang*.so* "$root"/usr/lib64/libclang*.so*; do
        [ -e "$f" ] && is_libclang "$f" && return 0
    done
    return 1
}

if [ "${1:-}" = "--check-libclang" ]; then
    # Exit 0 when libclang is found, 1 when not; installs nothing.
    have_libclang
    exit $?
fi

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
    if ! have_libclang; then
        echo "error: installed $pkgs but found no libclang.so; set LIBCLANG_PATH to its folder" >&2
        exit 1
    fi
else
    echo "error: building SphereDB needs the package(s) $pkgs; install with: sudo apt-get install -y $pkgs" >&2
    exit 1
fi
