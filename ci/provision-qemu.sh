#!/usr/bin/env bash
# Finds a QEMU that can run vdaq: version >= 10.2 (the first with the generic vhost-user device,
# `vhost-user-test-device-pci` / `vhost-user-test-device`) and qboot.rom among its firmware.
#
# Uses the system's qemu-system-x86_64 when it qualifies. Otherwise provisions a private QEMU from
# Debian trixie-backports into build/qemu/ without touching the system's packages: apt runs with
# its own configuration, state, cache and an empty dpkg status file, downloads the packages and
# their whole dependency closure (libc included), and every .deb is unpacked into the prefix. The
# wrapper build/qemu/bin/qemu-system-x86_64 runs QEMU through the prefix's own dynamic loader.
# A second run finds the working wrapper and returns at once.
#
# The last line on stdout is the absolute path of the qemu-system-x86_64 to use; progress and
# errors go to stderr. Provisioning needs root (or a user apt accepts) and network access to the
# Debian mirror named in the machine's own /etc/apt sources.
set -euo pipefail

readonly MIN_MAJOR=10 MIN_MINOR=2
readonly SUITE=trixie
readonly PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
readonly KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
readonly ROOT
readonly PREFIX=$ROOT/build/qemu
readonly WRAPPER=$PREFIX/bin/qemu-system-x86_64

# shellcheck source=debian-mirrors.sh
. "$ROOT/ci/debian-mirrors.sh"

log() { printf 'provision-qemu: %s\n' "$*" >&2; }
die() {
    printf 'provision-qemu: error: %s\n' "$*" >&2
    exit 1
}

# Why the last qemu_ok call refused its candidate.
why=
# The qboot.rom the last successful qemu_ok call found.
qboot=

# qemu_ok BIN: true when BIN runs, reports version >= MIN_MAJOR.MIN_MINOR, lists both generic
# vhost-user devices, and has qboot.rom in one of its firmware directories (`-L help`).
qemu_ok() {
    local bin=$1 out major minor dir
    why= qboot=
    if ! out=$("$bin" --version </dev/null 2>&1); then
        why="'$bin --version' failed: $(head -n 1 <<<"$out")"
        return 1
    fi
    if ! [[ $out =~ version\ ([0-9]+)\.([0-9]+) ]]; then
        why="'$bin --version' printed no version: $(head -n 1 <<<"$out")"
        return 1
    fi
    major=${BASH_REMATCH[1]} minor=${BASH_REMATCH[2]}
    if ((major < MIN_MAJOR || (major == MIN_MAJOR && minor < MIN_MINOR))); then
        why="$bin is QEMU $major.$minor, older than $MIN_MAJOR.$MIN_MINOR"
        return 1
    fi
    if ! out=$("$bin" -device help </dev/null 2>&1); then
        why="'$bin -device help' failed: $(head -n 1 <<<"$out")"
        return 1
    fi
    if ! grep -q '"vhost-user-test-device-pci"' <<<"$out" ||
        ! grep -q '"vhost-user-test-device"' <<<"$out"; then
        why="$bin lacks vhost-user-test-device(-pci)"
        return 1
    fi
    # `-L help` lists the directories QEMU searches for firmware, one per line.
    if ! out=$("$bin" -L help </dev/null 2>&1); then
        why="'$bin -L help' failed: $(head -n 1 <<<"$out")"
        return 1
    fi
    while IFS= read -r dir; do
        if [[ $dir == /* && -f $dir/qboot.rom ]]; then
            qboot=$dir/qboot.rom
            return 0
        fi
    done <<<"$out"
    why="$bin finds no qboot.rom in its firmware directories ($(paste -sd ' ' <<<"$out"))"
    return 1
}

# run_logged WHAT CMD...: runs CMD with its output in $LOGFILE; on failure shows the log's tail
# and dies naming WHAT.
run_logged() {
    local what=$1
    shift
    if ! "$@" >>"$LOGFILE" 2>&1 </dev/null; then
        tail -n 20 "$LOGFILE" | sed 's/^/    /' >&2
        die "$what failed"
    fi
}

provision() {
    local work apt prefix deb libdirs debs
    command -v apt-get >/dev/null || die "apt-get not found: install QEMU >= $MIN_MAJOR.$MIN_MINOR yourself"
    command -v dpkg-deb >/dev/null || die "dpkg-deb not found: install QEMU >= $MIN_MAJOR.$MIN_MINOR yourself"
    [[ $(dpkg --print-architecture) == amd64 ]] ||
        die "private QEMU provisioning supports amd64 hosts only (this is $(dpkg --print-architecture))"
    [[ -r $KEYRING ]] || die "$KEYRING missing (package debian-archive-keyring), needed to verify $SUITE"
    find_mirrors ||
        die "no Debian archive entry found in /etc/apt/sources.list or /etc/apt/sources.list.d/ (needed to fetch QEMU from $SUITE-backports)"
    log "provisioning QEMU from $SUITE-backports ($MIRROR, $SECURITY_MIRROR) into $PREFIX"

    mkdir -p "$ROOT/build"
    work=$(mktemp -d "$ROOT/build/.qemu-provision.XXXXXX")
    # shellcheck disable=SC2064 # expand now: $work is local
    trap "rm -rf '$work'" EXIT
    apt=$work/apt prefix=$work/prefix
    LOGFILE=$work/log
    mkdir -p "$prefix"
    chmod 755 "$work" # mktemp's 0700 would keep apt's sandbox user out
    write_private_apt "$apt" ci/provision-qemu.sh
    write_debian_sources "$apt" "$SUITE" "$SUITE-updates" "$SUITE-backports"

    export APT_CONFIG=$apt/apt.conf DEBIAN_FRONTEND=noninteractive
    log "apt-get update (private state in $work)"
    run_logged "apt-get update of the private $SUITE sources ($MIRROR, $SECURITY_MIRROR)" \
        apt-get -q --error-on=any update
    # -t: the qemu packages and the dependencies that need backports versions (seabios > 1.17)
    # come from backports, everything else from trixie.
    log "apt-get install --download-only -t $SUITE-backports ${PACKAGES[*]}"
    run_logged "apt-get install --download-only -t $SUITE-backports ${PACKAGES[*]}" \
        apt-get -q -y --no-install-recommends -t "$SUITE-backports" install --download-only "${PACKAGES[@]}"
    unset APT_CONFIG

    shopt -s nullglob
    debs=("$apt"/cache/archives/*.deb)
    shopt -u nullglob
    ((${#debs[@]} > 0)) || die "apt-get install --download-only downloaded no .deb files"
    log "unpacking ${#debs[@]} packages ($(du -sh "$apt/cache/archives" | cut -f1))"
    for deb in "${debs[@]}"; do
        dpkg-deb -x "$deb" "$prefix" 2>>"$LOGFILE" || die "dpkg-deb -x $(basename "$deb") failed"
    done
    for deb in "$apt"/cache/archives/{qemu-system-x86,seabios,libc6}_*.deb; do
        [[ -f $deb ]] && log "  $(dpkg-deb -f "$deb" Package Version | paste -sd ' ')"
    done

    # Documentation and the 32-bit-only binary are a third of the unpacked size and never used.
    rm -rf "$prefix"/usr/share/{doc,man,info,locale,lintian} "$prefix/usr/bin/qemu-system-i386"

    [[ -x $prefix/usr/bin/qemu-system-x86_64 ]] || die "unpacked packages contain no usr/bin/qemu-system-x86_64"
    [[ -e $prefix/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 ]] ||
        die "unpacked packages contain no usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    # QEMU looks for <dir of its executable>/qemu-bundle/<install path> before its relocated
    # install paths. Run through ld-linux, its executable is the loader in usr/lib/x86_64-linux-gnu,
    # so this link makes it use the prefix's firmware and modules instead of the host's.
    ln -sfn ../../.. "$prefix/usr/lib/x86_64-linux-gnu/qemu-bundle"

    libdirs='$prefix/usr/lib/x86_64-linux-gnu'
    [[ -d $prefix/lib/x86_64-linux-gnu && ! -L $prefix/lib ]] && libdirs+=':$prefix/lib/x86_64-linux-gnu'
    mkdir -p "$prefix/bin"
    cat >"$prefix/bin/qemu-system-x86_64" <<EOF
#!/bin/sh
# Written by ci/provision-qemu.sh: runs the private QEMU with the prefix's own loader and libraries.
# exec keeps the pid, so the process is QEMU (it shows as ld-linux-x86-64.so.2 in ps).
prefix=\$(dirname "\$(dirname "\$(readlink -f "\$0")")")
exec "\$prefix/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --argv0 "\$0" \\
    --library-path "$libdirs" "\$prefix/usr/bin/qemu-system-x86_64" "\$@"
EOF
    chmod +x "$prefix/bin/qemu-system-x86_64"

    qemu_ok "$prefix/bin/qemu-system-x86_64" || die "provisioned QEMU does not work: $why"
    rm -rf "$PREFIX"
    mv "$prefix" "$PREFIX"
    rm -rf "$work"
    trap - EXIT
}

main() {
    local sys
    if sys=$(command -v qemu-system-x86_64) && [[ $sys == /* ]]; then
        if qemu_ok "$sys"; then
            log "using system QEMU $sys (qboot: $qboot)"
            echo "$sys"
            return
        fi
        log "system QEMU not usable: $why"
    fi
    if [[ -x $WRAPPER ]] && qemu_ok "$WRAPPER"; then
        log "using provisioned QEMU $WRAPPER (qboot: $qboot)"
        echo "$WRAPPER"
        return
    fi
    mkdir -p "$ROOT/build"
    # One provisioner at a time; a concurrent run may have finished while we waited.
    exec 9>"$ROOT/build/.qemu-provision.lock"
    flock 9 || die "cannot lock $ROOT/build/.qemu-provision.lock"
    if [[ -x $WRAPPER ]] && qemu_ok "$WRAPPER"; then
        echo "$WRAPPER"
        return
    fi
    [[ -e $WRAPPER ]] && log "existing $WRAPPER not usable: $why; provisioning again"
    local start=$SECONDS
    provision
    qemu_ok "$WRAPPER" || die "provisioned QEMU does not work after moving it into place: $why"
    log "provisioned $("$WRAPPER" --version | head -n 1) in $((SECONDS - start)) s, $(du -sh "$PREFIX" | cut -f1) (qboot: $qboot)"
    echo "$WRAPPER"
}

main "$@"
