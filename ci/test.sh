#!/usr/bin/env bash
# The whole test suite. On a machine with rustup this is all it takes: it installs the
# toolchain pieces, finds or provisions QEMU >= 10.2, builds the bare-metal guest image and the
# Linux guest image (Debian's kernel fetched into build/linux, the vdaq module, the io_uring
# application), then runs formatting and lint checks and every test of the workspace (unit,
# queue-level, loopback, guest driver on the host, and end to end in QEMU with both guests),
# checkpatch.pl over the kernel module, and a few seconds of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
ci/install-deps.sh
ci/provision-qemu.sh >/dev/null
images/build.sh >/dev/null
images/build-linux.sh >/dev/null
ci/checkpatch.sh
ci/check-install.sh
cargo fmt --all --check
(cd guest-app && cargo fmt --check && cargo clippy --release --locked -- -D warnings)
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
ci/fuzz-smoke.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
# One closing line over all test binaries (cargo prints one summary per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?/) p += $i; if ($(i+1) ~ /^failed;?/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
