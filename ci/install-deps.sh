#!/usr/bin/env bash
# Installs the toolchain pieces the build and tests need. Idempotent and fast when done.
set -euo pipefail
cd "$(dirname "$0")/.."
# rust-toolchain.toml names the toolchain, components and targets; this makes rustup fetch
# whatever of it is missing.
rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install
rustup component add rustfmt clippy >/dev/null
rustup target add x86_64-unknown-none x86_64-unknown-linux-musl >/dev/null
