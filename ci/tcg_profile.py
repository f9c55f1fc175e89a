#!/usr/bin/env python3
"""Summarises `perf script` output of a TCG QEMU run (ci/tcg-profile.sh).

Samples of the vCPU thread are charged to a guest function: the one running, when the sample
is in translated code (QEMU's -perfmap names it `guest-0xADDR`), or the one whose translated
code called the QEMU helper or host code the sample is in (the first guest frame of its call
chain). Samples with no guest frame are QEMU's own loop, interrupt injection and device
emulation. The other threads (backend, QEMU's main loop) are listed by share of the machine.
"""

import argparse
import bisect
import collections
import re
import subprocess

KERNEL_START = 0xFFFF800000000000
MODULES_START = 0xFFFFFFFFC0000000


class Symbols:
    """Address to name: sorted starts of functions."""

    def __init__(self):
        self.starts, self.names = [], []

    def add(self, start, name):
        self.starts.append(start)
        self.names.append(name)

    def finish(self):
        order = sorted(range(len(self.starts)), key=self.starts.__getitem__)
        self.starts = [self.starts[i] for i in order]
        self.names = [self.names[i] for i in order]

    def name(self, address):
        i = bisect.bisect_right(self.starts, address) - 1
        return self.names[i] if i >= 0 else None


def nm_functions(path, base, symbols):
    """Adds the text symbols of an ELF file, relocated by `base`."""
    listing = subprocess.run(
        ["nm", "-C", "--defined-only", path], capture_output=True, text=True, check=True
    ).stdout
    for line in listing.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            symbols.add(base + int(parts[0], 16), parts[2])


def parse_samples(path):
    """(comm, time, [frame symbol, ...]) per sample, innermost frame first."""
    samples, header, frames = [], None, []
    head = re.compile(r"^(\S.*?)\s+\d+\s+([\d.]+):")
    frame = re.compile(r"^\s+[0-9a-f]+\s+(.*?)(?:\s+\((.*)\))?$")
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if not line.strip():
            if header:
                samples.append((header[0], header[1], frames))
            header, frames = None, []
            continue
        match = None if line.startswith("\t") else head.match(line.lstrip())
        if match:
            if header:
                samples.append((header[0], header[1], frames))
            header, frames = (match.group(1).strip(), float(match.group(2))), []
            rest = line.lstrip()[match.end():].strip()
            if rest:  # no call chain: the sample's own frame is on the header line
                parts = rest.split(None, 1)
                frames.append(parts[1] if len(parts) > 1 else parts[0])
            continue
        match = frame.match(line)
        if match and header:
            frames.append(match.group(1))
    if header:
        samples.append((header[0], header[1], frames))
    return samples


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("perf_script", help="`perf script -F comm,tid,time,ip,sym` output")
    parser.add_argument("--elf", help="the guest's program: the bare-metal image, or the "
                        "Linux application as FILE=LOAD_BIAS")
    parser.add_argument("--kallsyms", help="the Linux guest kernel's symbols (nm format)")
    parser.add_argument("--module", action="append", default=[],
                        help="NAME=TEXT_ADDRESS=FILE.ko of a Linux guest module")
    parser.add_argument("--skip", type=float, default=0.3,
                        help="seconds left out at the end (shutdown)")
    parser.add_argument("--window", type=float, default=0.0,
                        help="seconds analysed before that (0: from the first vCPU sample "
                             "after boot, i.e. the last 60 %% of the vCPU's samples)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()

    guest, kernel = Symbols(), Symbols()
    if args.elf:
        path, _, bias = args.elf.partition("=")
        nm_functions(path, int(bias, 16) if bias else 0, guest)
    if args.kallsyms:
        for line in open(args.kallsyms):
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "tTwW":
                kernel.add(int(parts[0], 16), parts[2])
    for spec in args.module:
        name, text, path = spec.split("=", 2)
        base = int(text, 16)
        module = Symbols()
        nm_functions(path, 0, module)
        for start, function in zip(module.starts, module.names):
            kernel.add(base + start, f"{name}:{function}")
    guest.finish()
    kernel.finish()

    samples = parse_samples(args.perf_script)
    vcpu_times = sorted(t for comm, t, _ in samples if comm.startswith("CPU "))
    if not vcpu_times:
        raise SystemExit("tcg_profile: no samples of a vCPU thread")
    end = vcpu_times[-1] - args.skip
    if args.window > 0:
        start = end - args.window
    else:
        start = vcpu_times[int(len(vcpu_times) * 0.4)]

    threads = collections.Counter()
    kinds = collections.Counter()
    functions = collections.Counter()
    vcpu = 0
    for comm, t, frames in samples:
        if not start <= t <= end:
            continue
        threads[comm] += 1
        if not comm.startswith("CPU ") or not frames:
            continue
        vcpu += 1
        first_guest = next((f for f in frames if f.startswith("guest-0x")), None)
        if first_guest is None:
            kinds["host: QEMU, no guest frame"] += 1
            functions["host: " + " < ".join(
                re.sub(r"\+0x[0-9a-f]+$", "", f) for f in frames[:3])] += 1
            continue
        address = int(first_guest[len("guest-0x"):], 16)
        in_jit = frames[0].startswith("guest-0x")
        if address >= KERNEL_START:
            where = "guest kernel"
            name = kernel.name(address) if kernel.starts else None
            if address >= MODULES_START and (name is None or ":" not in name):
                name = "(a module)"
        else:
            where = "guest user" if args.kallsyms else "guest"
            name = guest.name(address) if guest.starts else None
        name = name or hex(address)
        kinds[f"{where} ({'translated code' if in_jit else 'QEMU helpers it called'})"] += 1
        functions[f"{where}: {name}"] += 1

    total = sum(threads.values())
    print(f"window {end - start:.2f} s, {total} samples of the whole machine "
          f"({vcpu} of vCPU threads)")
    print("threads (share of all samples, idle included):")
    for comm, count in threads.most_common(8):
        print(f"  {100 * count / total:5.1f}%  {comm}")
    print("vCPU time by kind:")
    for kind, count in kinds.most_common():
        print(f"  {100 * count / vcpu:5.1f}%  {kind}")
    print("vCPU time by guest function (helpers included) and host path:")
    for function, count in functions.most_common(args.top):
        print(f"  {100 * count / vcpu:5.1f}%  {function[:120]}")


if __name__ == "__main__":
    main()
