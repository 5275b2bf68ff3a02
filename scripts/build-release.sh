#!/usr/bin/env bash
# A release build that runs on other Linux distributions: glibc and the C
# parts (zstd) linked statically, so the node agent needs no shared library.
# `--target` is explicit so that the static flag does not reach build
# scripts and proc-macros (which must stay dynamic).
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked --target "$target"
bin="${CARGO_TARGET_DIR:-target}/$target/release/imaging"
echo "$bin"
deps=$(ldd "$bin" 2>&1 || true)
case "$deps" in
    *"statically linked"*|*"not a dynamic executable"*)
        echo "static: ldd says \"$(echo "$deps" | head -1 | sed 's/^[[:space:]]*//')\"" ;;
    *)
        echo "error: $bin has dynamic dependencies:" >&2
        echo "$deps" >&2
        exit 1 ;;
esac
