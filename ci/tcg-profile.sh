#!/usr/bin/env bash
# Where a vdaq run's time goes under TCG, from the host: `perf record` of the whole machine while
# `vdaq` runs, QEMU started with -perfmap (it names each translated guest instruction by its
# guest address), then ci/tcg_profile.py: the vCPU thread's time by guest function (the time of
# the QEMU helpers it called counted with it: TLB refills, indirect-jump lookups), the host time
# outside translated code, and the other threads (backend, QEMU's main loop).
#
#   ci/tcg-profile.sh [vdaq options...]
#   ci/tcg-profile.sh --reads 64 --buffer-size 65536 --clock free
#   ci/tcg-profile.sh --guest linux --reads 64 --buffer-size 65536 --clock free --poll-us 200
#
# Needs root (system-wide sampling) and perf (Debian: linux-perf; Ubuntu: linux-tools-common and
# linux-tools-$(uname -r)). Guest symbols: the bare-metal image's own; for the Linux guest the
# kernel's (recovered from the image's vmlinux by kallsyms-finder, from the vmlinux-to-elf
# package on PyPI, in a venv under build/profile/), the modules' and the application's (where
# they were loaded, which the guest prints with vdaq.symbols=1). The recording stays in build/profile/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
readonly ROOT
readonly OUT=$ROOT/build/profile

die() {
    printf 'tcg-profile: error: %s\n' "$*" >&2
    exit 1
}

command -v perf >/dev/null ||
    die "perf not found: apt-get install linux-perf (Debian) or linux-tools-$(uname -r) (Ubuntu)"
[[ $(id -u) == 0 ]] || die "system-wide sampling needs root"
mkdir -p "$OUT"
linux=false
for arg in "$@"; do
    [[ $arg == linux ]] && linux=true
done

qemu=$("$ROOT/ci/provision-qemu.sh" | tail -n 1)
(cd "$ROOT" && cargo build -q --release -p vdaq-launcher -p vhost-device-daq)

append_arg=
if $linux; then
    append_arg=" vdaq.symbols=1"
fi
# The QEMU the launcher runs: the real one, with -perfmap and perf recording while it lives.
# Other invocations (--version, the capability probe) go straight through.
cat >"$OUT/qemu" <<EOF
#!/usr/bin/env bash
case " \$* " in *" -kernel "*) ;; *) exec "$qemu" "\$@" ;; esac
# A Linux guest gets vdaq.symbols=1: it prints its modules' addresses.
args=()
append=false
for arg in "\$@"; do
    if \$append; then arg="\$arg$append_arg"; fi
    append=false
    [[ \$arg == -append ]] && append=true
    args+=("\$arg")
done
"$qemu" -perfmap "\${args[@]}" &
qemu_pid=\$!
perf record -q -a -F 499 --call-graph dwarf,2048 -o "$OUT/perf.data" 2>"$OUT/perf.log" &
perf_pid=\$!
wait \$qemu_pid
status=\$?
kill -INT \$perf_pid 2>/dev/null
wait \$perf_pid
echo \$qemu_pid >"$OUT/qemu.pid"
exit \$status
EOF
chmod +x "$OUT/qemu"

extra=()
if $linux; then
    extra=(-v)
fi
"$ROOT/target/release/vdaq" --qemu "$OUT/qemu" "${extra[@]}" "$@" 2>&1 | tee "$OUT/run.log" |
    grep -v '^guest: ' || true

symbols=()
if $linux; then
    kallsyms=$OUT/kallsyms.txt
    vmlinux=$ROOT/build/images/linux/vmlinux
    if [[ ! -s $kallsyms || $kallsyms -ot $vmlinux ]]; then
        [[ -x $OUT/venv/bin/kallsyms-finder ]] || {
            python3 -m venv "$OUT/venv"
            "$OUT/venv/bin/pip" install -q vmlinux-to-elf
        }
        "$OUT/venv/bin/kallsyms-finder" "$vmlinux" >"$kallsyms" 2>"$OUT/kallsyms.log" ||
            die "kallsyms-finder failed (see $OUT/kallsyms.log)"
    fi
    symbols+=(--kallsyms "$kallsyms")
    while read -r _ _ _ name _ text; do
        ko=$ROOT/build/linux/initramfs/lib/modules/$name.ko
        if [[ -f $ko ]]; then
            symbols+=(--module "$name=$text=$ko")
        fi
    done < <(sed -n 's/^guest: vdaq-init: module /x x x /p' "$OUT/run.log")
    app=$ROOT/target/x86_64-unknown-linux-musl/release/vdaq-app
    loaded=$(awk '/^guest: vdaq-app: symbol main at / && !found { print $NF; found = 1 }' "$OUT/run.log")
    linked=$(nm -C "$app" | awk '$3 == "vdaq_app::main" && !found { print $1; found = 1 }')
    if [[ -n $loaded && -n $linked ]]; then
        symbols+=(--elf "$app=$(printf '%#x' $((loaded - 0x$linked)))")
    fi
else
    symbols+=(--elf "$ROOT/build/images/vdaq-guest.elf")
fi
perf script -i "$OUT/perf.data" -F comm,tid,time,ip,sym 2>/dev/null >"$OUT/perf.txt"
python3 "$ROOT/ci/tcg_profile.py" "$OUT/perf.txt" "${symbols[@]}"
