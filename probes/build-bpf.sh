#!/usr/bin/env bash
# Builds probes/src/bpf/enlight.bpf.o from enlight.bpf.c (clang, BPF target, BTF kept, DWARF
# stripped so no build path leaks in). The object is committed, so building enlight needs no
# clang; `--check` rebuilds into a temporary file and fails if it differs from the committed one.
# DO NOT EDIT enlight.bpf.o by hand: change the C source and rerun this script.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$here/src/bpf"
out="$src/enlight.bpf.o"
build() {
    local target="$1"
    (cd "$src" && clang -O2 -g -target bpf -D__TARGET_ARCH_x86 \
        -I/usr/include/"$(uname -m)"-linux-gnu \
        -fdebug-prefix-map="$src"=. -fdebug-compilation-dir=. \
        -Wall -Werror -c enlight.bpf.c -o "$target")
    llvm-strip -g "$target"
}
for tool in clang llvm-strip; do
    command -v "$tool" >/dev/null || { echo "build-bpf: $tool not found (apt-get install clang llvm)" >&2; exit 1; }
done
if [[ "${1:-}" == "--check" ]]; then
    tmp="$(mktemp --suffix=.bpf.o)"
    trap 'rm -f "$tmp"' EXIT
    build "$tmp"
    if ! cmp -s "$tmp" "$out"; then
        echo "build-bpf: probes/src/bpf/enlight.bpf.o does not match its source; run probes/build-bpf.sh and commit the result" >&2
        exit 1
    fi
    echo "build-bpf: enlight.bpf.o matches its source ($(clang --version | head -1))"
else
    build "$out"
    echo "build-bpf: wrote $out ($(stat -c %s "$out") bytes)"
fi
