#!/usr/bin/env bash
# Builds the bare-metal guest image (guest-app/, its own cargo workspace, target
# x86_64-unknown-none) and copies it to a stable path, printed as the last stdout line:
#   build/images/vdaq-guest.elf
# Cargo's own lockfile and incremental build make it reproducible and a no-op when current.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
OUT=$ROOT/build/images
mkdir -p "$OUT"
rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-none \
    || rustup target add x86_64-unknown-none >&2
# The guest is a workspace of its own: its target directory is fixed, whatever CARGO_TARGET_DIR
# the host build uses.
TARGET_DIR=$ROOT/guest-app/target
(cd "$ROOT/guest-app" && cargo build --release --locked --target-dir "$TARGET_DIR" >&2)
# Copy under a private name, then rename: concurrent builds never see a partial image.
cp -p "$TARGET_DIR/x86_64-unknown-none/release/vdaq-guest" "$OUT/vdaq-guest.elf.$$"
mv -f "$OUT/vdaq-guest.elf.$$" "$OUT/vdaq-guest.elf"
echo "$OUT/vdaq-guest.elf"
