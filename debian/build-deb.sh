#!/usr/bin/env bash
# Builds the deploy-agent Debian package and prints its path on the last
# line of stdout:
#
#   debian/build-deb.sh        # -> target/debian/deploy-agent_<version>-1_<arch>.deb
#
# Steps: the stripped binary (`--profile dist`, see Cargo.toml), the man
# pages and shell completions it generates from its own clap definitions
# (`deploy-agent generate`, hidden), then `cargo deb --no-build`, which
# packs what agent/Cargo.toml's [package.metadata.deb] lists.
#
# Installs cargo-deb first when it is missing. If this dies midway, run it
# again: every step rewrites its output whole.
set -euo pipefail
self=$(readlink -f "$0")
cd "$(dirname "$self")/.."
TARGET=${CARGO_TARGET_DIR:-$PWD/target}

if ! cargo deb --version >/dev/null 2>&1; then
  echo "build-deb.sh: installing cargo-deb (cargo install cargo-deb --locked)" >&2
  cargo install cargo-deb --locked >&2
fi

cargo build --locked --profile dist -p deploy-agent --bin deploy-agent >&2
bin=$TARGET/dist/deploy-agent
gen=$TARGET/dist/gen
rm -rf "$gen"
"$bin" generate man "$gen/man"
"$bin" generate completions "$gen/completions"
gzip -9n "$gen"/man/*.8

out=$TARGET/debian
mkdir -p "$out"
# --no-strip: the dist profile already stripped the binary.
cargo deb --locked -p deploy-agent --no-build --no-strip --profile dist --output "$out" >&2
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
arch=$(dpkg --print-architecture)
deb=$out/deploy-agent_${version}-1_${arch}.deb
test -f "$deb" || { echo "build-deb.sh: $deb was not written" >&2; exit 1; }
echo "$deb"
