#!/usr/bin/env bash
# Builds every probes/src/bpf/<name>.bpf.c into <name>.bpf.o (clang, BPF target, BTF kept, DWARF
# stripped so no build path leaks in). The objects are committed, so building enlight needs no
# clang; `--check` rebuilds each into a temporary file and fails if any differs from the committed
# one. DO NOT EDIT a .bpf.o by hand: change the C source and rerun this script.
#
# -mcpu=v2: clang 14's default (v1) has no JLT/JLE/JSLT/JSLE, so bounds checks compile to
# reversed JGT/JGE branches that the 6.1 verifier (Debian 12's guest kernel) cannot follow:
# it rejects enlight_io_reap ("R0 invalid mem access 'scalar'") and enlight_blk_complete,
# while 6.18 accepts them. v3 (32-bit jumps and ALU) fails on 6.1 too (enlight_io_reap:
# "invalid indirect access to stack"). v2 objects load on 6.1 and 6.18 (docs/lab.md).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$here/src/bpf"
build() {
    local source="$1" target="$2"
    (cd "$src" && clang -O2 -g -target bpf -mcpu=v2 -D__TARGET_ARCH_x86 \
        -I/usr/include/"$(uname -m)"-linux-gnu \
        -fdebug-prefix-map="$src"=. -fdebug-compilation-dir=. \
        -Wall -Werror -c "$source" -o "$target")
    llvm-strip -g "$target"
}
for tool in clang llvm-strip; do
    command -v "$tool" >/dev/null || { echo "build-bpf: $tool not found (apt-get install clang llvm)" >&2; exit 1; }
done
status=0
for c in "$src"/*.bpf.c; do
    name="$(basename "$c" .c)"
    out="$src/$name.o"
    if [[ "${1:-}" == "--check" ]]; then
        tmp="$(mktemp --suffix=.bpf.o)"
        build "$name.c" "$tmp"
        if ! cmp -s "$tmp" "$out"; then
            echo "build-bpf: probes/src/bpf/$name.o does not match its source; run probes/build-bpf.sh and commit the result" >&2
            status=1
        else
            echo "build-bpf: $name.o matches its source ($(clang --version | head -1))"
        fi
        rm -f "$tmp"
    else
        build "$name.c" "$out"
        echo "build-bpf: wrote $out ($(stat -c %s "$out") bytes)"
    fi
done
exit "$status"
