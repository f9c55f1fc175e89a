#!/usr/bin/env bash
# Builds the Linux guest: Debian bookworm's kernel, the vdaq kernel module (linux-driver/) and a
# busybox initramfs that loads the virtio modules and vdaq.ko and runs the application.
#
#   images/build-linux.sh [--libiio] [APP]
#       APP (or $VDAQ_LINUX_APP): a static binary installed as /bin/vdaq-app; default: linux-app/
#       built here (Rust, musl); "none": no application, /init runs the C test tool
#       (linux-driver/tools/vdaqtest) as a smoke check.
#       --libiio: also build initramfs-libiio.cpio.gz (printed instead of initramfs.cpio.gz).
#
# Outputs (the last two stdout lines are their absolute paths):
#   build/images/linux/vmlinux              Debian's kernel, decompressed: QEMU boots it through its
#                                           PVH entry (Debian builds CONFIG_PVH), which skips the
#                                           bzImage's self-decompression, ~6 s under TCG here
#   build/images/linux/bzImage              Debian's vmlinuz as shipped
#   build/images/linux/initramfs.cpio.gz    busybox, virtio modules, vdaq.ko, /init, tools
#   build/images/linux/initramfs-libiio.cpio.gz   (--libiio) the same with Debian's libiio tools
#                                           (iio_info, iio_attr, iio_readdev, iiod), the shared
#                                           libraries they load and virtio-net: a second cpio
#                                           appended to the first (the kernel unpacks both), so
#                                           the default image stays small (libxml2 brings ICU's
#                                           30 MB of data)
#   build/linux/userland/bin/iio_*          (--libiio) the same libiio tools for the host
#
# Nothing on the host changes: the packages are fetched with `apt-get download` through a private
# apt configuration (own state and cache, bookworm sources with the mirror taken from the
# machine's /etc/apt, so it also works on an Ubuntu host) and unpacked with `dpkg-deb -x` into
# build/linux/pkgs. A second run with everything present skips the download; the module and the
# tools rebuild only when their sources changed.
#
# Environment: VDAQ_LINUX_APP (as APP), VDAQ_KERNEL_ABI (e.g. 6.1.0-57-amd64, to pin the kernel
# instead of following linux-image-amd64).
set -euo pipefail

readonly SUITE=bookworm
readonly KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
readonly ROOT
readonly PREFIX=$ROOT/build/linux
readonly PKGS=$PREFIX/pkgs
readonly OUT=$ROOT/build/images/linux
LIBIIO=false
if [[ ${1:-} == --libiio ]]; then
    LIBIIO=true
    shift
fi
APP=${1:-${VDAQ_LINUX_APP:-}}
readonly USERLAND=$PREFIX/userland
# Debian's libiio tools and iiod; their shared libraries come with them (dependency closure).
readonly LIBIIO_PACKAGES="libiio-utils iiod"
# Alternatives apt-cache lists beside the one used (libdbus: libsystemd0 | libelogind0).
readonly LIBIIO_SKIP="libelogind0"

# shellcheck source=../ci/debian-mirrors.sh
. "$ROOT/ci/debian-mirrors.sh"

log() { printf 'build-linux: %s\n' "$*" >&2; }
die() {
    printf 'build-linux: error: %s\n' "$*" >&2
    exit 1
}

# Writes the private apt configuration under $PREFIX/apt and exports APT_CONFIG.
private_apt() {
    local apt=$PREFIX/apt
    find_mirrors || die "no Debian archive entry in /etc/apt/sources.list(.d) to fetch $SUITE's kernel from"
    rm -rf "$apt"
    write_private_apt "$apt" images/build-linux.sh
    write_debian_sources "$apt" "$SUITE" "$SUITE-updates"
    export APT_CONFIG=$apt/apt.conf DEBIAN_FRONTEND=noninteractive
}

# Fetches and unpacks the kernel, its headers, kbuild and busybox-static into $PKGS, once.
fetch_packages() {
    local abi ver debs deb logf
    if [[ -f $PKGS/.complete ]]; then
        KABI=$(cat "$PKGS/.complete")
        return
    fi
    command -v apt-get >/dev/null || die "apt-get not found"
    command -v dpkg-deb >/dev/null || die "dpkg-deb not found"
    [[ -r $KEYRING ]] || die "$KEYRING missing (package debian-archive-keyring), needed to verify $SUITE"
    mkdir -p "$PREFIX"
    exec 9>"$PREFIX/.fetch.lock"
    flock 9 || die "cannot lock $PREFIX/.fetch.lock"
    if [[ -f $PKGS/.complete ]]; then
        KABI=$(cat "$PKGS/.complete")
        return
    fi
    private_apt
    logf=$PREFIX/apt/log/build-linux.log
    log "apt-get update (private $SUITE sources from $MIRROR, state in $PREFIX/apt)"
    apt-get -q --error-on=any update >"$logf" 2>&1 || {
        tail -n 20 "$logf" >&2
        die "apt-get update failed"
    }
    abi=${VDAQ_KERNEL_ABI:-}
    if [[ -z $abi ]]; then
        # linux-image-amd64 depends on linux-image-6.1.0-NN-amd64 (the signed image).
        abi=$(apt-cache depends linux-image-amd64 |
            sed -nE 's/^ *Depends: linux-image-([0-9][^ ]*-amd64)$/\1/p' | head -n 1)
        [[ -n $abi ]] || die "cannot resolve linux-image-amd64's kernel from apt-cache depends"
    fi
    ver=$(apt-cache policy "linux-image-$abi" | sed -nE 's/^ *Candidate: (.*)$/\1/p')
    [[ -n $ver && $ver != "(none)" ]] || die "no candidate for linux-image-$abi"
    log "kernel linux-image-$abi $ver"
    rm -rf "$PREFIX/debs" "$PKGS"
    mkdir -p "$PREFIX/debs" "$PKGS"
    chmod 777 "$PREFIX/debs" # apt's sandbox user downloads into the current directory
    (cd "$PREFIX/debs" && apt-get -q download \
        "linux-image-$abi=$ver" "linux-headers-$abi=$ver" \
        "linux-headers-${abi%-amd64}-common=$ver" "linux-kbuild-6.1=$ver" busybox-static) \
        >>"$logf" 2>&1 || {
        tail -n 20 "$logf" >&2
        die "apt-get download failed"
    }
    shopt -s nullglob
    debs=("$PREFIX"/debs/*.deb)
    shopt -u nullglob
    ((${#debs[@]} == 5)) || die "expected 5 packages in $PREFIX/debs, got ${#debs[@]}"
    for deb in "${debs[@]}"; do
        log "  unpack $(basename "$deb")"
        dpkg-deb -x "$deb" "$PKGS" || die "dpkg-deb -x $deb failed"
    done
    # The amd64 headers' Makefile includes the common headers by absolute path.
    sed -i -E "s#^include /usr/src/(linux-headers-[^/]*-common)/Makefile#include $PKGS/usr/src/\\1/Makefile#" \
        "$PKGS/usr/src/linux-headers-$abi/Makefile"
    grep -q "^include $PKGS/usr/src/" "$PKGS/usr/src/linux-headers-$abi/Makefile" ||
        die "could not fix the include line of linux-headers-$abi/Makefile"
    rm -rf "$PKGS"/usr/share/{doc,man,lintian} "$PREFIX/debs"
    echo "$abi" >"$PKGS/.complete"
    KABI=$abi
}

# Fetches and unpacks $LIBIIO_PACKAGES and their dependency closure into $USERLAND/root, once.
fetch_userland() {
    local logf pkgs deb
    [[ -f $USERLAND/.complete ]] && return
    exec 8>"$PREFIX/.userland.lock"
    flock 8 || die "cannot lock $PREFIX/.userland.lock"
    [[ -f $USERLAND/.complete ]] && return
    private_apt
    logf=$PREFIX/apt/log/build-linux-userland.log
    apt-get -q --error-on=any update >"$logf" 2>&1 || {
        tail -n 20 "$logf" >&2
        die "apt-get update failed"
    }
    # shellcheck disable=SC2086 # package lists
    pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances $LIBIIO_PACKAGES 2>>"$logf" | grep -v '^ ' | grep -v '^<' |
        grep -vxF -f <(tr ' ' '\n' <<<"$LIBIIO_SKIP") | sort -u)
    [[ -n $pkgs ]] || die "cannot resolve the dependencies of $LIBIIO_PACKAGES"
    log "libiio: $(wc -w <<<"$pkgs") packages"
    rm -rf "$USERLAND"
    mkdir -p "$USERLAND/debs" "$USERLAND/root"
    chmod 777 "$USERLAND/debs"
    # shellcheck disable=SC2086
    (cd "$USERLAND/debs" && apt-get -q download $pkgs) >>"$logf" 2>&1 || {
        tail -n 20 "$logf" >&2
        die "apt-get download of the libiio packages failed"
    }
    for deb in "$USERLAND"/debs/*.deb; do
        dpkg-deb -x "$deb" "$USERLAND/root" || die "dpkg-deb -x $deb failed"
    done
    rm -rf "$USERLAND/debs"
    touch "$USERLAND/.complete"
}

# Prints the shared libraries (paths inside $USERLAND/root) that the ELF files $@ load,
# transitively, by their DT_NEEDED entries: what the dynamic loader will open.
needed_libs() {
    local root=$USERLAND/root queue=("$@") seen=" " f lib path dir
    while ((${#queue[@]})); do
        f=${queue[0]}
        queue=("${queue[@]:1}")
        for lib in $(readelf -d "$root/$f" 2>/dev/null | sed -nE 's/.*\(NEEDED\).*\[(.*)\]/\1/p'); do
            [[ $seen == *" $lib "* ]] && continue
            seen+="$lib "
            path=
            for dir in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu; do
                [[ -e $root/$dir/$lib ]] && path=$dir/$lib && break
            done
            [[ -n $path ]] || die "$lib (needed by $f) is in none of the fetched packages"
            echo "$path"
            queue+=("$path")
        done
    done
}

# Builds initramfs-libiio.cpio.gz: the default initramfs with a second archive appended that
# adds the libiio tools, iiod, their libraries, the dynamic loader and virtio-net.
build_libiio_initramfs() {
    local stage=$USERLAND/stage root=$USERLAND/root f
    local bins=(usr/bin/iio_info usr/bin/iio_attr usr/bin/iio_readdev usr/bin/iio_writedev usr/sbin/iiod)
    rm -rf "$stage"
    mkdir -p "$stage/lib64" "$stage/lib/modules"
    for f in "${bins[@]}" $(needed_libs "${bins[@]}") lib/x86_64-linux-gnu/ld-linux-x86-64.so.2; do
        mkdir -p "$stage/$(dirname "$f")"
        cp -L "$root/$f" "$stage/$f"
    done
    ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$stage/lib64/ld-linux-x86-64.so.2"
    # virtio-net for iiod's TCP port (QEMU user networking); /init loads these after the rest.
    install_modules "$stage/lib/modules" load-order.libiio failover net_failover virtio_net
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | "$PKGS/bin/busybox" cpio -o -H newc 2>/dev/null) |
        gzip -6 >"$USERLAND/libiio.cpio.gz"
    cat "$OUT/initramfs.cpio.gz" "$USERLAND/libiio.cpio.gz" >"$OUT/initramfs-libiio.cpio.gz.$$"
    mv -f "$OUT/initramfs-libiio.cpio.gz.$$" "$OUT/initramfs-libiio.cpio.gz"
}

# Writes build/linux/userland/bin/{iio_info,iio_attr,iio_readdev,iio_writedev}: the same Debian
# libiio tools for the host, run through the fetched dynamic loader and libraries (as
# ci/provision-qemu.sh runs its QEMU), so the host needs no libiio package to reach iiod.
write_host_tools() {
    local tool
    mkdir -p "$USERLAND/bin"
    for tool in iio_info iio_attr iio_readdev iio_writedev; do
        cat >"$USERLAND/bin/$tool" <<EOF
#!/bin/sh
# Written by images/build-linux.sh --libiio: Debian bookworm's $tool with its own libraries.
root=\$(dirname "\$(dirname "\$(readlink -f "\$0")")")/root
exec "\$root/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --argv0 "\$0" \\
    --library-path "\$root/lib/x86_64-linux-gnu:\$root/usr/lib/x86_64-linux-gnu" \\
    "\$root/usr/bin/$tool" "\$@"
EOF
        chmod 755 "$USERLAND/bin/$tool"
    done
}

# Builds vdaq.ko from a copy of linux-driver/ (so the source folder stays clean) and the tools.
build_module() {
    local src=$ROOT/linux-driver mod=$PREFIX/module kdir=$PKGS/usr/src/linux-headers-$KABI
    mkdir -p "$mod"
    # Copy what changed (keeping mtimes, so kbuild rebuilds only what it must).
    (cd "$src" && find . -path ./tools -prune -o -type f \( -name '*.c' -o -name '*.h' -o -name Kbuild -o -name Makefile \) -print) |
        while read -r f; do
            mkdir -p "$mod/$(dirname "$f")"
            cmp -s "$src/$f" "$mod/$f" || cp -p "$src/$f" "$mod/$f"
        done
    if [[ ! -f $mod/vdaq.ko || -n $(find "$mod" -maxdepth 2 \( -name '*.[ch]' -o -name Kbuild \) -newer "$mod/vdaq.ko") ]]; then
        log "make -C $kdir M=$mod modules W=1"
        make -s -C "$kdir" M="$mod" W=1 modules >&2 || die "building vdaq.ko failed"
    fi
    [[ -f $mod/vdaq.ko ]] || die "no vdaq.ko"
    # The test tool: static, no libc beyond glibc's static archive.
    local t
    mkdir -p "$PREFIX/tools"
    for t in "$src"/tools/*.c; do
        [[ -f $t ]] || continue
        local bin=$PREFIX/tools/$(basename "${t%.c}")
        if [[ ! -x $bin || $t -nt $bin || $src/uapi/vdaq.h -nt $bin ]]; then
            log "cc $(basename "$t")"
            gcc -static -O2 -Wall -Wextra -Werror -I"$src" -o "$bin" "$t" || die "building $t failed"
        fi
    done
}

# install_modules DIR LIST MODULE...: Debian's MODULE.ko files (decompressed) into DIR, and their
# names, in the order given, into DIR/LIST: insmod has no dependency resolution, so /init loads
# them in that order, which must be the dependency order. A module built into the kernel (or
# absent) is skipped.
install_modules() {
    local dir=$1 list=$2 m found
    shift 2
    : >"$dir/$list"
    for m in "$@"; do
        found=$(find "$PKGS/lib/modules/$KABI/kernel" -name "$m.ko*" | head -n 1)
        [[ -n $found ]] || {
            log "  $m is not a module in $KABI (built in or absent)"
            continue
        }
        case $found in
        *.ko.xz) xz -dc "$found" >"$dir/$m.ko" ;;
        *.ko.zst) zstd -dqc "$found" >"$dir/$m.ko" ;;
        *.ko.gz) gzip -dc "$found" >"$dir/$m.ko" ;;
        *) cp "$found" "$dir/$m.ko" ;;
        esac
        # Rewriting the ELF drops Debian's appended signature: the kernel then skips checking
        # it (RSA and SHA-256 in software under TCG, tens of ms a module) and taints, as the
        # unsigned vdaq.ko taints it anyway; signatures are not enforced.
        strip --strip-debug "$dir/$m.ko"
        echo "$m" >>"$dir/$list"
    done
}

# Assembles the initramfs.
build_initramfs() {
    local stage=$PREFIX/initramfs f bb
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,lib/modules,etc}
    bb=$PKGS/bin/busybox
    [[ -x $bb ]] || die "busybox-static did not provide bin/busybox"
    cp "$bb" "$stage/bin/busybox"
    for f in $("$bb" --list-full); do
        [[ $f == bin/busybox ]] && continue
        mkdir -p "$stage/$(dirname "$f")"
        ln -sf /bin/busybox "$stage/$f"
    done
    # The virtio transports, and IIO with its kfifo buffer for vdaq.ko's IIO device.
    install_modules "$stage/lib/modules" load-order virtio_ring virtio virtio_pci_modern_dev \
        virtio_pci_legacy_dev virtio_pci virtio_mmio industrialio kfifo_buf
    # Debug information and symbol tables stripped: under TCG the kernel unpacks the initramfs
    # at a few MB/s, and vdaq.ko's debug sections alone are 1.2 MB (~1/4 of the image).
    strip --strip-debug -o "$stage/lib/modules/vdaq.ko" "$PREFIX/module/vdaq.ko"
    for f in "$PREFIX"/tools/*; do
        [[ -x $f ]] && strip --strip-all -o "$stage/bin/$(basename "$f")" "$f"
    done
    if [[ -n $APP ]]; then
        [[ -x $APP ]] || die "application $APP is not an executable file"
        strip --strip-all -o "$stage/bin/vdaq-app" "$APP"
        log "application: $APP"
    fi
    cp "$ROOT/images/linux/init" "$stage/init"
    chmod 755 "$stage/init"
    mkdir -p "$OUT"
    # Nothing changed since the last image: keep it.
    local stamp
    stamp=$( (cd "$stage" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1)
    if [[ -f $OUT/initramfs.cpio.gz && -f $OUT/bzImage && -f $OUT/vmlinux && -f $PREFIX/.initramfs.stamp &&
        $(cat "$PREFIX/.initramfs.stamp") == "$stamp-$KABI" ]]; then
        return
    fi
    # busybox's cpio writes the newc format; run from the staging dir for relative names.
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | "$bb" cpio -o -H newc 2>/dev/null) |
        gzip -9 >"$OUT/initramfs.cpio.gz.$$"
    mv -f "$OUT/initramfs.cpio.gz.$$" "$OUT/initramfs.cpio.gz"
    cp -p "$PKGS/boot/vmlinuz-$KABI" "$OUT/bzImage.$$"
    mv -f "$OUT/bzImage.$$" "$OUT/bzImage"
    extract_vmlinux "$OUT/bzImage" "$OUT/vmlinux"
    echo "$stamp-$KABI" >"$PREFIX/.initramfs.stamp"
}

# extract_vmlinux BZIMAGE OUT: the ELF kernel inside a bzImage (XZ, as Debian compresses it),
# kept only if it has the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) QEMU boots it through.
extract_vmlinux() {
    python3 - "$1" "$2.$$" <<'PY' || die "cannot extract vmlinux from $1"
import lzma, struct, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("no XZ stream in the bzImage")
elf = lzma.LZMADecompressor().decompress(data[start:])
if elf[:4] != b"\x7fELF":
    sys.exit("the XZ stream is not an ELF kernel")
# ELF64 program headers: a PT_NOTE with name "Xen" and type 18 is the PVH entry.
phoff, = struct.unpack_from("<Q", elf, 0x20)
phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
pvh = False
for i in range(phnum):
    ptype, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
    pos, end = offset, offset + filesz
    while ptype == 4 and pos + 12 <= end:
        namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
        name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
        pvh |= name == b"Xen" and ntype == 18
        pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
if not pvh:
    sys.exit("the kernel has no PVH entry")
open(sys.argv[2], "wb").write(elf)
PY
    mv -f "$2.$$" "$2"
}

# Builds linux-app/ (a member of the root workspace) as a static musl binary and sets APP to it.
build_app() {
    rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl ||
        rustup target add x86_64-unknown-linux-musl >&2
    # No auto-vectorisation: the guest runs under TCG, which emulates SSE instructions more
    # slowly than the scalar ones they replace (the verifier checked about 870 MB/s vectorised,
    # about 1400 MB/s scalar: vdaq bench --guest linux, consume MB/s). The bare-metal guest's
    # target has no SSE at all.
    (cd "$ROOT" && CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C llvm-args=-vectorize-loops=false -C llvm-args=-vectorize-slp=false" \
        cargo build --release --locked -p vdaq-linux-app \
        --target x86_64-unknown-linux-musl >&2) || die "building linux-app failed"
    local target_dir=${CARGO_TARGET_DIR:-$ROOT/target}
    [[ $target_dir == /* ]] || target_dir=$ROOT/$target_dir
    APP=$target_dir/x86_64-unknown-linux-musl/release/vdaq-app
}

main() {
    # One build at a time (parallel test runs, two terminals): they share the staging tree.
    mkdir -p "$PREFIX"
    exec 9>"$PREFIX/.build.lock"
    flock 9
    fetch_packages
    build_module
    case $APP in
    "") build_app ;;
    none) APP= ;;
    esac
    build_initramfs
    log "kernel $KABI, initramfs $(du -h "$OUT/initramfs.cpio.gz" | cut -f1)"
    echo "$OUT/vmlinux"
    if $LIBIIO; then
        fetch_userland
        build_libiio_initramfs
        write_host_tools
        log "with libiio: $(du -h "$OUT/initramfs-libiio.cpio.gz" | cut -f1)"
        echo "$OUT/initramfs-libiio.cpio.gz"
    else
        echo "$OUT/initramfs.cpio.gz"
    fi
}

main "$@"
