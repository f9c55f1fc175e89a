#!/usr/bin/env bash
# Every fuzz target (fuzz/, cargo-fuzz on nightly) builds and runs a few seconds over its
# committed corpus without a crash, so a target that no longer builds or fails at once fails CI.
# The long runs are by hand (fuzz/README.md). Installs nightly and cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${VDAQ_FUZZ_SECONDS:-5}
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal >/dev/null
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz >/dev/null
cargo fmt --manifest-path fuzz/Cargo.toml --check
cd fuzz
cargo +nightly fuzz build -O >/dev/null
for target in $(cargo +nightly fuzz list); do
    mkdir -p "corpus/$target"
    # The fake device's interrupt state is 'static by design (leaked once per run): no leak.
    leaks=1
    [ "$target" = driver_completions ] && leaks=0
    # A scratch copy: the committed corpus stays as it is.
    scratch=$(mktemp -d)
    cp -r "corpus/$target/." "$scratch/"
    if ! out=$(ASAN_OPTIONS="detect_leaks=$leaks" cargo +nightly fuzz run -O "$target" \
        "$scratch" -- -max_total_time="$seconds" -detect_leaks="$leaks" 2>&1); then
        echo "$out" | tail -40
        echo "fuzz-smoke: $target failed (input in fuzz/artifacts/$target)"
        exit 1
    fi
    echo "fuzz-smoke: $target: $(echo "$out" | grep -E '^Done [0-9]+ runs' | tail -1)"
    rm -rf "$scratch"
done
