#!/usr/bin/env bash
# Builds the Debian package of enlight (both commands, the systemd unit, the default
# configuration, man pages and shell completions) with cargo-deb.
#
#   packaging/build-deb.sh                          # release build -> target/debian/
#   packaging/build-deb.sh --from target/debug --output DIR --fast
#                                                   # binaries built already (the package test)
#
# Needs cargo-deb: `cargo install cargo-deb --locked --no-default-features` (scripts/test-all.sh
# installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
from=""
out=target/debian
fast=()
while (($#)); do
    case "$1" in
        --from) from="$2"; shift 2 ;;
        --output) out="$2"; shift 2 ;;
        --fast) fast=(--fast); shift ;;
        *) echo "build-deb: unknown argument $1" >&2; exit 2 ;;
    esac
done
command -v cargo-deb >/dev/null || { echo "build-deb: cargo-deb is missing: cargo install cargo-deb --locked --no-default-features" >&2; exit 1; }
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
if [[ -z $from ]]; then
    cargo build --locked --release -p enlight --bins
    from="$target_dir/release"
fi
# cargo-deb takes the binaries from <target dir>/release: a staging target dir holds (links to)
# the ones to package, and the man pages and completions written by those very binaries from
# their own command-line definitions.
stage="$target_dir/deb-stage"
rm -rf "$stage"
mkdir -p "$stage/release"
for bin in enlight enlightd; do
    ln "$from/$bin" "$stage/release/$bin" 2>/dev/null || cp "$from/$bin" "$stage/release/$bin"
done
docs="$stage/release/package-docs"
"$stage/release/enlight" generate-docs --out "$docs"
"$stage/release/enlightd" --generate-docs "$docs"
gzip -9n "$docs"/man/*
mkdir -p "$out"
CARGO_TARGET_DIR="$stage" cargo deb -p enlight --no-build --strip --compress-system "${fast[@]}" --output "$out"
rm -rf "$stage"
