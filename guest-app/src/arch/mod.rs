//! The x86_64 platform layer of the bare-metal guest: PVH boot, paging, GDT/IDT, LAPIC and
//! IOAPIC, COM1 console, TSC clock and LAPIC timer, heap, exit through isa-debug-exit.
//!
//! Boot sequence: `boot` (32-bit PVH entry → long mode) calls `rust_entry`, which brings up
//! serial, GDT/TSS, MTRRs, IDT + LAPIC (8259s masked), the heap, ACPI/IOAPICs and the clock,
//! enables interrupts and calls `crate::kernel_main(&BootInfo) -> !`.
//!
//! Reserved by this layer: vectors 0..=31 (exceptions, fatal) and 255 (LAPIC spurious); the
//! 8259s are remapped to 0x20..0x2F but fully masked (LINT0 masked too), so 32..=254 are free
//! for the app. Port 0x3f8 (COM1), 0xf4 (isa-debug-exit), PIT ports 0x40/0x43 at boot only.
//! Memory 0xB000_0000..4 GiB is mapped uncached; nothing above 4 GiB is mapped.

// This is the app's platform API: the app uses a subset of it.
#![allow(dead_code)]

mod acpi;
mod apic;
mod boot;
mod cpu;
mod heap;
pub mod interrupts;
pub mod ioapic;
pub mod serial;
pub mod time;

use core::sync::atomic::{AtomicBool, Ordering};

use spin::Once;
use x86_64::instructions::port::Port;

#[allow(unused_imports)]
pub use boot::{MemoryRegion, UNCACHED_START};
#[allow(unused_imports)]
pub use cpu::{cpuid, rdtsc, MtrrSetup};
pub use time::ClockSource;

/// The code [`exit`] is called with on a panic or CPU exception: QEMU exits with status
/// `(0x7E << 1) | 1` = 253.
pub const PANIC_EXIT_CODE: u8 = 0x7E;

/// The isa-debug-exit port (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// What the platform knows at the start of `kernel_main`.
#[derive(Debug)]
pub struct BootInfo {
    /// The kernel command line (`-append`; on microvm with `acpi=off` QEMU appends
    /// ` virtio_mmio.device=512@0x<addr>:<gsi>` per populated virtio-mmio transport).
    pub cmdline: &'static str,
    /// The PVH (E820-style) memory map.
    pub memory_map: &'static [MemoryRegion],
    /// Physical address of the ACPI RSDP, if there is one.
    pub rsdp_addr: Option<u64>,
    /// TSC frequency in Hz.
    pub tsc_hz: u64,
    /// LAPIC timer input frequency (divide-by-1) in Hz.
    pub lapic_timer_hz: u64,
    /// Where those two frequencies came from.
    pub clock_source: ClockSource,
    /// This CPU's LAPIC ID (MSI address `0xFEE0_0000 | lapic_id << 12`).
    pub lapic_id: u32,
    /// Number of IOAPICs found (see `ioapic::units`).
    pub ioapics: usize,
    /// The global allocator's region.
    pub heap: core::ops::Range<usize>,
    /// What was done about the MTRRs.
    pub mtrr: MtrrSetup,
    /// `time::now_ns()` when arch init was done (boot entry = 0).
    pub arch_init_ns: u64,
}

static BOOT_INFO: Once<BootInfo> = Once::new();

/// The boot information (also passed to `kernel_main`).
///
/// # Panics
/// Before arch init is complete.
pub fn boot_info() -> &'static BootInfo {
    BOOT_INFO
        .get()
        .expect("boot info requested before arch init")
}

/// Called by the 64-bit entry code with the physical address of `hvm_start_info`.
extern "C" fn rust_entry(start_info: u32) -> ! {
    serial::init();
    cpu::init_gdt();
    let mtrr = cpu::init_mtrrs();
    interrupts::init();
    let parsed = boot::parse_start_info(start_info);
    heap::init(parsed.memory_map);
    let rsdp_addr = acpi::find_rsdp(parsed.rsdp_paddr);
    let madt = rsdp_addr.and_then(acpi::parse_madt);
    let ioapics = ioapic::init(madt.as_ref());
    time::init();
    let (heap_start, heap_end) = heap::region();
    let info = BOOT_INFO.call_once(|| BootInfo {
        cmdline: parsed.cmdline,
        memory_map: parsed.memory_map,
        rsdp_addr,
        tsc_hz: time::tsc_hz(),
        lapic_timer_hz: time::lapic_timer_hz(),
        clock_source: time::clock_source(),
        lapic_id: interrupts::lapic_id(),
        ioapics,
        heap: heap_start..heap_end,
        mtrr,
        arch_init_ns: time::now_ns(),
    });
    crate::print!(
        "arch: up in {} us; tsc {} kHz, lapic timer {} kHz ({:?}); lapic id {}; mtrr {:?}; heap {} MiB; ioapics:",
        info.arch_init_ns / 1000,
        info.tsc_hz / 1000,
        info.lapic_timer_hz / 1000,
        info.clock_source,
        info.lapic_id,
        info.mtrr,
        (heap_end - heap_start) >> 20,
    );
    for (address, gsi_base, inputs) in ioapic::units() {
        crate::print!(" {address:#x} (GSI {gsi_base}..{})", gsi_base + inputs - 1);
    }
    crate::println!();
    interrupts::enable();
    crate::kernel_main(info)
}

/// Ends the guest: QEMU exits with status `(code << 1) | 1` through isa-debug-exit. Without
/// that device, halts forever with interrupts disabled.
pub fn exit(code: u8) -> ! {
    interrupts::disable();
    let mut port: Port<u32> = Port::new(DEBUG_EXIT_PORT);
    // SAFETY: port 0xf4 is isa-debug-exit when configured (QEMU exits); otherwise the write
    // goes to an unassigned port and is ignored.
    unsafe { port.write(u32::from(code)) };
    loop {
        x86_64::instructions::hlt();
    }
}

static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    interrupts::disable();
    if !PANICKING.swap(true, Ordering::Relaxed) {
        serial::emergency_print(format_args!("\nPANIC: {info}\n"));
    }
    exit(PANIC_EXIT_CODE)
}
