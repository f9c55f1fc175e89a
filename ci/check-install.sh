#!/usr/bin/env bash
# Installs the backend and the launcher as a user would (`cargo install --path`, into a
# scratch root), then uses them from another directory: --version on every command, shell
# completions, and a short verified run in which the installed vdaq finds the installed
# backend beside it and the guest image and QEMU through the source tree it was built from.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# A target directory of its own: release builds, kept between runs like target/.
for crate in vhost-device launcher; do
    cargo install --quiet --locked --path "$crate" --root "$root" --target-dir target/install
done
export PATH="$root/bin:$PATH"
cd "$root"
for command in "vdaq" "vdaq bench" "vhost-device-daq" "vhost-device-daq plot" "vhost-device-daq ctl"; do
    version=$($command --version)
    [[ $version == *" 0."* ]] || { echo "check-install: '$command --version' printed no version" >&2; exit 1; }
done
# Into files first: `grep -q` stops reading at the first match, and under pipefail the writer's
# broken pipe would fail the check.
for shell in bash zsh fish; do
    vdaq completions "$shell" >vdaq.$shell
    grep -q 'bench' vdaq.$shell || { echo "check-install: vdaq completions $shell lacks bench" >&2; exit 1; }
    vhost-device-daq completions "$shell" >vhost-device-daq.$shell
    grep -q 'plot' vhost-device-daq.$shell || { echo "check-install: vhost-device-daq completions $shell lacks plot" >&2; exit 1; }
done
vdaq --accel tcg --duration 0.5 --json >run.json 2>run.log || { cat run.log >&2; exit 1; }
grep -q '"pass":true' run.json || { cat run.log >&2; exit 1; }
echo "check-install: cargo install --path vhost-device and --path launcher work; the installed vdaq ran and passed"
