#!/bin/sh
# Build the Debian package: target/debian/imaging_<version>_<arch>.deb.
# Needs cargo-deb (`cargo install cargo-deb`).
set -eu
cd "$(dirname "$0")/.."
cargo build --release
bin=target/release/imaging
out=target/deb-assets
rm -rf "$out"
mkdir -p "$out/links" "$out/completions" "$out/man"
"$bin" completions bash > "$out/completions/imaging.bash"
"$bin" completions zsh > "$out/completions/_imaging"
"$bin" completions fish > "$out/completions/imaging.fish"
"$bin" man "$out/man" > /dev/null
gzip -9n "$out"/man/*.1
for sub in load save wait list nodes config; do
    ln -s imaging "$out/links/imaging-$sub"
done
cargo deb --no-build "$@"
