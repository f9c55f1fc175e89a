//! The vdaq guest: a bare-metal x86_64 program (PVH boot) that drives the vdaq device through
//! the reference driver, verifies every sample and reports (see `app`). `arch` is everything
//! x86-specific; `selftest` exercises it alone.

#![no_std]
#![no_main]

extern crate alloc;

mod app;
mod arch;
mod selftest;

/// Called by the arch layer once the CPU, memory, interrupts and clocks are set up.
fn kernel_main(info: &arch::BootInfo) -> ! {
    if info
        .cmdline
        .split_ascii_whitespace()
        .any(|word| word == "vdaq.selftest")
    {
        selftest::run(info)
    }
    app::run(info)
}
