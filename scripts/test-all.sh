#!/usr/bin/env bash
# The whole test suite, from a fresh machine of this image: installs what the tests need (Debian
# packages), prepares the kernel interfaces the probes use, and runs every check and test,
# privileged eBPF tests included. Run as root (the eBPF tests load and attach real programs).
set -euo pipefail
# Tests that need promtool fail, rather than skip, when it is missing.
export ENLIGHT_REQUIRE_PROMTOOL=1
# Where /dev/kvm exists, the KVM tests must run: a KVM that fails its detection there fails them
# instead of letting them skip (a skip prints only inside captured test output).
if [[ -e /dev/kvm ]]; then
    export ENLIGHT_REQUIRE_KVM=1
else
    echo "test-all: no /dev/kvm: the KVM transport tests skip (the thread transport is tested)" >&2
fi
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "test-all: run as root (the privileged eBPF tests load and attach real programs)" >&2
    exit 1
fi

# Tools the tests use as independent checks, and clang for the probe reproducibility check.
# clang/llvm/libbpf-dev/bpftool: rebuild probes/src/bpf/enlight.bpf.o and compare with the shipped one.
# bpftrace: lists our USDT sites (interoperability). prometheus: promtool parses /metrics.
# python3-prometheus-client: its OpenMetrics parser reads /metrics as OpenMetrics.
# tmux: runs `enlight top` in a real terminal and reads its screen back (cli/tests/top_tmux.rs).
# iproute2, iputils-ping, iperf3: traffic through the emulated NIC's namespaces; bpftrace also
# counts kvm:kvm_pio independently (cli/tests/emulated.rs). fonts-dejavu-core: bench charts.
# fio, ethtool: the kernel-device tests' independent checks (fio's latency and op counts on a
# loop device; ethtool -g/-c against our netlink reads and writes). systemd, util-linux, xz-utils:
# the package test verifies the unit (systemd-analyze), runs its command line under its
# capability bounds (setpriv, nsenter) and compresses the package (xz).
# qemu-system-x86, busybox-static, binutils: the guest lab (cli/tests/lab.rs boots Debian's kernel,
# which it fetches with apt-get download, around a busybox initramfs; objcopy strips debug info).
packages=(clang llvm libbpf-dev bpftool bpftrace prometheus python3-prometheus-client tmux iproute2 iputils-ping iperf3 fonts-dejavu-core fio ethtool systemd util-linux xz-utils qemu-system-x86 busybox-static binutils)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# node and npm: the dashboard schema check (dashboards/schema). The image ships Node.js; a
# machine without it gets Debian's.
command -v npm >/dev/null || missing+=(nodejs npm)
if ((${#missing[@]})); then
    step "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# cargo-deb builds the Debian package in cli/tests/package.rs (from crates.io, once: about two
# minutes of compiling on two cores; without its lzma feature it compresses with the xz tool).
if ! cargo deb --version >/dev/null 2>&1; then
    step "cargo install cargo-deb"
    cargo install cargo-deb --locked --version 3.8.0 --no-default-features
fi

step "kernel interfaces"
if [[ ! -d /sys/kernel/tracing/events ]]; then
    mount -t tracefs nodev /sys/kernel/tracing
fi
test -r /sys/kernel/btf/vmlinux || { echo "kernel has no BTF (/sys/kernel/btf/vmlinux)" >&2; exit 1; }

step "probe object matches its source"
probes/build-bpf.sh --check

step "Grafana dashboards against @grafana/schema"
(cd dashboards/schema && npm ci --no-audit --no-fund --loglevel=error && node check.mjs)

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "data races with a peer scribbling into shared memory (ThreadSanitizer)"
# Every access our channel ends make to memory a peer can write must be atomic
# (vmbus/src/shmem.rs); driver/tests/peer_races.rs runs both ends beside a thread that scribbles
# over the rings and the shared area, and ThreadSanitizer fails it on any non-atomic access. The
# standard library is not rebuilt with the sanitizer (that needs its source, which the stable
# toolchain here does not ship): hence RUSTC_BOOTSTRAP for -Z and the ABI-mismatch allowance.
RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zsanitizer=thread -Cunsafe-allow-abi-mismatch=sanitizer" \
    cargo test -p enlight-driver --test peer_races --locked \
    --target "$(rustc -vV | sed -n 's/^host: //p')" --target-dir target/tsan

step "fuzz targets: a short smoke run of each (cargo-fuzz, libFuzzer)"
# The harnesses are library code (enlight_vmbus::fuzzing for the ring and channel,
# enlight_driver::fuzzing for the devices); cargo test below replays every seed corpus file and
# every saved crash. Here each cargo-fuzz target of both fuzz crates (vmbus/fuzz, driver/fuzz)
# runs for a few seconds on top of its seeds, as libFuzzer builds it (coverage-instrumented,
# AddressSanitizer). cargo-fuzz passes -Z flags, hence RUSTC_BOOTSTRAP on the stable toolchain;
# the debug build compiles fastest.
# Fuzzing for longer: README.md. New inputs go to a scratch directory, not the seed corpus.
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --version 0.13.2 --locked
fuzz_tmp="$(mktemp -d)"
trap 'rm -rf "$fuzz_tmp"' EXIT
for crate in vmbus driver; do
    (
        cd "$crate"
        export RUSTC_BOOTSTRAP=1
        cargo fuzz build --dev
        for target in $(cargo fuzz list); do
            mkdir -p "$fuzz_tmp/$target"
            if ! cargo fuzz run --dev "$target" "$fuzz_tmp/$target" "fuzz/corpus/$target" -- \
                -max_total_time=5 -timeout=20 -print_final_stats=1 >"$fuzz_tmp/$target.log" 2>&1; then
                cat "$fuzz_tmp/$target.log" >&2
                echo "test-all: fuzz target $target failed (input saved under $crate/fuzz/artifacts/$target)" >&2
                exit 1
            fi
            printf '%-16s %s\n' "$target" "$(grep -m1 'DONE' "$fuzz_tmp/$target.log")"
        done
    ) || exit 1
done
rm -rf "$fuzz_tmp"

step "cargo test (unit, integration and privileged eBPF tests)"
# Two test threads per binary keep the privileged tests (which attach uprobes and read shared
# kernel maps) from timing each other out on a 2-core machine; tests that run a daemon also
# take a lock (cli/tests/support), and binaries run one after another.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked -- --test-threads=2 2>&1 | tee "$log"
# One closing line for the whole suite (cargo prints one per test binary, the last of which is
# often an empty doc-test run).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?/) p += $i; if ($(i+1) ~ /^failed;?/) f += $i; if ($(i+1) ~ /^ignored;?/) s += $i } }
     END { printf "\nsuite: %d passed, %d failed, %d skipped\n", p, f, s; if (p == 0 || f > 0) exit 1 }' "$log"
