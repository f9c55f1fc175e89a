//! Local APIC (xAPIC, memory-mapped at the base IA32_APIC_BASE names, normally 0xFEE0_0000)
//! and the legacy 8259 PICs, which are remapped and fully masked. Hand-rolled: it is a handful
//! of register writes, and the crates that wrap the LAPIC assume their own kernel frameworks.

use core::sync::atomic::{AtomicUsize, Ordering};

use x86_64::instructions::port::Port;

use super::cpu;

const IA32_APIC_BASE: u32 = 0x1B;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;

pub(super) const REG_ID: usize = 0x20;
pub(super) const REG_VERSION: usize = 0x30;
pub(super) const REG_TPR: usize = 0x80;
pub(super) const REG_EOI: usize = 0xB0;
pub(super) const REG_SVR: usize = 0xF0;
pub(super) const REG_ESR: usize = 0x280;
pub(super) const REG_LVT_CMCI: usize = 0x2F0;
pub(super) const REG_LVT_TIMER: usize = 0x320;
pub(super) const REG_LVT_THERMAL: usize = 0x330;
pub(super) const REG_LVT_PERF: usize = 0x340;
pub(super) const REG_LVT_LINT0: usize = 0x350;
pub(super) const REG_LVT_LINT1: usize = 0x360;
pub(super) const REG_LVT_ERROR: usize = 0x370;
pub(super) const REG_TIMER_INITIAL: usize = 0x380;
pub(super) const REG_TIMER_CURRENT: usize = 0x390;
pub(super) const REG_TIMER_DIVIDE: usize = 0x3E0;

pub(super) const LVT_MASKED: u32 = 1 << 16;
pub(super) const LVT_TIMER_PERIODIC: u32 = 1 << 17;
const LVT_DELIVERY_NMI: u32 = 0b100 << 8;
const SVR_ENABLE: u32 = 1 << 8;

/// Physical (= virtual) address of the LAPIC registers; 0 until [`init`].
static BASE: AtomicUsize = AtomicUsize::new(0);

pub(super) fn read(reg: usize) -> u32 {
    let base = BASE.load(Ordering::Relaxed);
    assert_ne!(base, 0, "LAPIC used before arch init");
    // SAFETY: `base` is the LAPIC's MMIO page (from IA32_APIC_BASE, identity-mapped uncached);
    // `reg` is one of the 16-byte aligned register offsets above, all inside that page.
    unsafe { core::ptr::read_volatile((base + reg) as *const u32) }
}

pub(super) fn write(reg: usize, value: u32) {
    let base = BASE.load(Ordering::Relaxed);
    assert_ne!(base, 0, "LAPIC used before arch init");
    // SAFETY: as in `read`; writes to these registers only affect interrupt delivery, which
    // is this module's job.
    unsafe { core::ptr::write_volatile((base + reg) as *mut u32, value) }
}

/// Signals end of interrupt.
pub(super) fn eoi() {
    write(REG_EOI, 0);
}

/// This CPU's xAPIC ID (bits 31..24 of the ID register).
pub(super) fn id() -> u32 {
    read(REG_ID) >> 24
}

/// Enables the LAPIC in xAPIC mode with `spurious_vector`, all local interrupt sources masked
/// except LINT1 (NMI), and the 8259s remapped to 0x20..0x2F and masked.
pub(super) fn init(spurious_vector: u8) {
    mask_8259();
    // SAFETY: IA32_APIC_BASE exists on every x86_64 CPU.
    let msr = unsafe { cpu::rdmsr(IA32_APIC_BASE) };
    assert!(
        msr & APIC_BASE_X2APIC == 0,
        "LAPIC is in x2APIC mode; this guest drives the xAPIC MMIO interface"
    );
    if msr & APIC_BASE_ENABLE == 0 {
        // SAFETY: setting the global enable bit keeps the base address; nothing else changes.
        unsafe { cpu::wrmsr(IA32_APIC_BASE, msr | APIC_BASE_ENABLE) };
    }
    let base = (msr & 0x000F_FFFF_FFFF_F000) as usize;
    assert!(
        base as u64 >= super::boot::UNCACHED_START && (base as u64) < 1 << 32,
        "LAPIC base {base:#x} is outside the uncached identity map"
    );
    BASE.store(base, Ordering::Relaxed);

    write(REG_TPR, 0);
    for reg in [
        REG_LVT_TIMER,
        REG_LVT_THERMAL,
        REG_LVT_PERF,
        REG_LVT_LINT0,
        REG_LVT_ERROR,
    ] {
        write(reg, LVT_MASKED);
    }
    // The CMCI LVT exists only with more than 6 LVT entries (version register bits 23..16).
    if (read(REG_VERSION) >> 16) & 0xFF >= 6 {
        write(REG_LVT_CMCI, LVT_MASKED);
    }
    write(REG_LVT_LINT1, LVT_DELIVERY_NMI);
    write(REG_TIMER_INITIAL, 0);
    // Clear the error status (write then read, as the SDM asks).
    write(REG_ESR, 0);
    let _ = read(REG_ESR);
    write(REG_SVR, SVR_ENABLE | u32::from(spurious_vector));
    eoi();
}

/// Remaps the two 8259s to vectors 0x20..0x2F (off the exception vectors) and masks all lines.
/// LINT0 is masked as well, so nothing from them reaches the CPU.
fn mask_8259() {
    const ICW1_INIT_ICW4: u8 = 0x11;
    const MASTER_CMD: u16 = 0x20;
    const MASTER_DATA: u16 = 0x21;
    const SLAVE_CMD: u16 = 0xA0;
    const SLAVE_DATA: u16 = 0xA1;
    let sequence: [(u16, u8); 10] = [
        (MASTER_CMD, ICW1_INIT_ICW4),
        (SLAVE_CMD, ICW1_INIT_ICW4),
        (MASTER_DATA, 0x20),
        (SLAVE_DATA, 0x28),
        (MASTER_DATA, 0x04),
        (SLAVE_DATA, 0x02),
        (MASTER_DATA, 0x01),
        (SLAVE_DATA, 0x01),
        (MASTER_DATA, 0xFF),
        (SLAVE_DATA, 0xFF),
    ];
    for (port, value) in sequence {
        let mut port: Port<u8> = Port::new(port);
        // SAFETY: ports 0x20/0x21/0xA0/0xA1 are the 8259 PICs (absent on some machines, where
        // the writes go nowhere); the ICW sequence is the standard one and ends with all
        // lines masked.
        unsafe { port.write(value) };
    }
}
