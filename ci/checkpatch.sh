#!/usr/bin/env bash
# Runs the kernel's checkpatch.pl (--strict, as for a new driver) over linux-driver/'s kernel C and
# headers; exits 1 on any ERROR or WARNING (CHECK notes are printed, the ones left are explained in
# docs/linux-driver.md). checkpatch comes from Debian's linux-source-6.1 (the header packages do
# not ship it), fetched through the private apt configuration images/build-linux.sh wrote (run
# that first) and cached in build/linux/checkpatch/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
readonly ROOT
readonly DIR=$ROOT/build/linux/checkpatch
readonly SCRIPTS="scripts/checkpatch.pl scripts/spelling.txt scripts/const_structs.checkpatch"

die() {
    printf 'checkpatch: error: %s\n' "$*" >&2
    exit 1
}

fetch() {
    local deb tarball member members=()
    [[ -f $DIR/scripts/checkpatch.pl ]] && return
    export APT_CONFIG=$ROOT/build/linux/apt/apt.conf
    [[ -f $APT_CONFIG ]] || die "no $APT_CONFIG: run images/build-linux.sh first"
    rm -rf "$DIR"
    mkdir -p "$DIR/debs"
    chmod 777 "$DIR/debs"
    (cd "$DIR/debs" && apt-get -q download linux-source-6.1) >"$DIR/download.log" 2>&1 || {
        tail -n 20 "$DIR/download.log" >&2
        die "apt-get download linux-source-6.1 failed"
    }
    deb=$(ls "$DIR"/debs/linux-source-6.1_*.deb)
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$DIR/debs" --wildcards './usr/src/linux-source-6.1.tar.*'
    tarball=$(ls "$DIR"/debs/usr/src/linux-source-6.1.tar.*)
    for member in $SCRIPTS; do
        members+=("linux-source-6.1/$member")
    done
    tar -x -C "$DIR" -f "$tarball" --strip-components=1 "${members[@]}" || die "cannot extract checkpatch from $tarball"
    rm -rf "$DIR/debs"
}

main() {
    local out status=0
    fetch
    cd "$ROOT/linux-driver"
    out=$(perl "$DIR/scripts/checkpatch.pl" --strict --no-tree --terse --show-types -f \
        ./*.c ./*.h uapi/*.h 2>&1) || true
    printf '%s\n' "$out"
    if grep -qE ': (ERROR|WARNING):' <<<"$out"; then
        status=1
        echo "checkpatch: errors or warnings in linux-driver/ (see above)" >&2
    else
        echo "checkpatch: linux-driver/ clean ($(grep -c ': CHECK:' <<<"$out" || true) CHECK notes)"
    fi
    return $status
}

main "$@"
