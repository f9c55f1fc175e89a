//! IOAPIC(s): routing of global system interrupts (GSIs) to vectors on this CPU.
//!
//! IOAPICs are found through the ACPI MADT; without ACPI the standard one at 0xFEC0_0000
//! (GSI 0..) is assumed, plus microvm's second one at 0xFEC1_0000 (GSI 24..) if it answers.
//! On microvm with ACPI (the default) virtio-mmio transport n raises GSI 24 + n on that second
//! IOAPIC; with `-machine microvm,acpi=off` it raises GSI 5 + n on the first, and QEMU then
//! appends `virtio_mmio.device=512@0x…:<gsi>` to the command line. Hand-rolled: two
//! registers per IOAPIC, no crate needed.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use spin::Mutex;

use super::acpi;
use super::interrupts;

const REG_VERSION: u32 = 0x01;
const REG_REDIRECTION: u32 = 0x10;

const RTE_MASKED: u32 = 1 << 16;
const RTE_LEVEL: u32 = 1 << 15;
const RTE_ACTIVE_LOW: u32 = 1 << 13;

/// Default addresses (chipset convention; microvm's second IOAPIC follows the first by 64 KiB).
const DEFAULT_IOAPIC: u32 = 0xFEC0_0000;
const MICROVM_IOAPIC2: u32 = 0xFEC1_0000;
const MICROVM_IOAPIC2_GSI_BASE: u32 = 24;

/// One IOAPIC: MMIO base, first GSI, number of inputs. `address == 0` marks an empty slot.
struct Unit {
    address: AtomicUsize,
    gsi_base: AtomicU32,
    inputs: AtomicU32,
}

static UNITS: [Unit; acpi::MAX_IOAPICS] = [const {
    Unit {
        address: AtomicUsize::new(0),
        gsi_base: AtomicU32::new(0),
        inputs: AtomicU32::new(0),
    }
}; acpi::MAX_IOAPICS];

/// Serialises the IOREGSEL/IOWIN register pairs.
static LOCK: Mutex<()> = Mutex::new(());

/// # Safety
/// `address` must be the MMIO base of an IOAPIC, identity-mapped uncached. Callers hold `LOCK`
/// with interrupts disabled.
unsafe fn read_reg(address: usize, reg: u32) -> u32 {
    // SAFETY: IOREGSEL (offset 0) and IOWIN (offset 0x10) of the IOAPIC at `address`.
    unsafe { core::ptr::write_volatile(address as *mut u32, reg) };
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile((address + 0x10) as *const u32) }
}

/// # Safety
/// As for [`read_reg`]; the value must be meaningful for `reg`.
unsafe fn write_reg(address: usize, reg: u32, value: u32) {
    // SAFETY: IOREGSEL (offset 0) and IOWIN (offset 0x10) of the IOAPIC at `address`.
    unsafe { core::ptr::write_volatile(address as *mut u32, reg) };
    // SAFETY: as above; the caller vouches for the value.
    unsafe { core::ptr::write_volatile((address + 0x10) as *mut u32, value) };
}

/// Number of redirection entries, or `None` when nothing IOAPIC-like answers at `address`.
fn probe(address: u32) -> Option<u32> {
    if u64::from(address) < super::boot::UNCACHED_START {
        return None;
    }
    let version = interrupts::without_interrupts(|| {
        let _guard = LOCK.lock();
        // SAFETY: the address is in the uncached MMIO range; reading the version register of
        // an absent device reads unassigned memory, which is harmless.
        unsafe { read_reg(address as usize, REG_VERSION) }
    });
    let (ver, max_entry) = (version & 0xFF, (version >> 16) & 0xFF);
    ((0x11..=0x20).contains(&ver) && max_entry >= 15).then_some(max_entry + 1)
}

/// Registers the IOAPICs (MADT if any, else defaults) and masks every input.
pub(super) fn init(madt: Option<&acpi::Madt>) -> usize {
    let mut found = [None; acpi::MAX_IOAPICS];
    match madt {
        Some(m) if m.ioapics.iter().any(Option::is_some) => {
            for (slot, e) in found.iter_mut().zip(m.ioapics.iter().flatten()) {
                *slot = Some((e.address, e.gsi_base));
            }
        }
        _ => {
            found[0] = Some((DEFAULT_IOAPIC, 0));
            if probe(MICROVM_IOAPIC2).is_some() {
                found[1] = Some((MICROVM_IOAPIC2, MICROVM_IOAPIC2_GSI_BASE));
            }
        }
    }
    let mut n = 0;
    for (address, gsi_base) in found.into_iter().flatten() {
        let Some(inputs) = probe(address) else {
            continue;
        };
        let unit = &UNITS[n];
        unit.gsi_base.store(gsi_base, Ordering::Relaxed);
        unit.inputs.store(inputs, Ordering::Relaxed);
        unit.address.store(address as usize, Ordering::Release);
        n += 1;
        for pin in 0..inputs {
            write_entry(address as usize, pin, RTE_MASKED, 0);
        }
    }
    n
}

fn write_entry(address: usize, pin: u32, low: u32, high: u32) {
    interrupts::without_interrupts(|| {
        let _guard = LOCK.lock();
        // Mask first, then destination, then the final low word (which may unmask).
        // SAFETY: `address` is a probed IOAPIC; `pin` < its entry count; LOCK held, IF=0.
        unsafe { write_reg(address, REG_REDIRECTION + 2 * pin, RTE_MASKED) };
        // SAFETY: as above.
        unsafe { write_reg(address, REG_REDIRECTION + 2 * pin + 1, high) };
        // SAFETY: as above.
        unsafe { write_reg(address, REG_REDIRECTION + 2 * pin, low) };
    });
}

/// (MMIO address, pin) serving `gsi`.
fn locate(gsi: u32) -> Option<(usize, u32)> {
    UNITS.iter().find_map(|u| {
        let address = u.address.load(Ordering::Acquire);
        let base = u.gsi_base.load(Ordering::Relaxed);
        let inputs = u.inputs.load(Ordering::Relaxed);
        (address != 0 && gsi >= base && gsi - base < inputs).then_some((address, gsi - base))
    })
}

/// Routes `gsi` to `vector` on this CPU (fixed delivery, physical destination) and unmasks it.
/// Install the vector's handler first. Virtio-mmio lines (microvm) are level-triggered,
/// active-high: `route(gsi, vector, true, false)`.
///
/// # Panics
/// If no IOAPIC serves `gsi`, or `vector` is outside 32..=254.
pub fn route(gsi: u32, vector: u8, level_triggered: bool, active_low: bool) {
    assert!(
        (interrupts::FIRST_VECTOR..=interrupts::LAST_VECTOR).contains(&vector),
        "vector {vector} is not routable"
    );
    let (address, pin) = locate(gsi).unwrap_or_else(|| panic!("no IOAPIC serves GSI {gsi}"));
    let mut low = u32::from(vector);
    if level_triggered {
        low |= RTE_LEVEL;
    }
    if active_low {
        low |= RTE_ACTIVE_LOW;
    }
    interrupts::note_route(vector, gsi);
    write_entry(address, pin, low, interrupts::lapic_id() << 24);
}

/// Masks (`true`) or unmasks (`false`) `gsi`, keeping its routing.
///
/// # Panics
/// If no IOAPIC serves `gsi`.
pub fn mask(gsi: u32, masked: bool) {
    let (address, pin) = locate(gsi).unwrap_or_else(|| panic!("no IOAPIC serves GSI {gsi}"));
    interrupts::without_interrupts(|| {
        let _guard = LOCK.lock();
        let reg = REG_REDIRECTION + 2 * pin;
        // SAFETY: `address` is a probed IOAPIC; `pin` < its entry count; LOCK held, IF=0.
        let low = unsafe { read_reg(address, reg) };
        let low = if masked {
            low | RTE_MASKED
        } else {
            low & !RTE_MASKED
        };
        // SAFETY: as above; only the mask bit changed.
        unsafe { write_reg(address, reg, low) };
    });
}

/// The IOAPICs in use: (MMIO address, first GSI, number of inputs).
pub fn units() -> impl Iterator<Item = (usize, u32, u32)> {
    UNITS.iter().filter_map(|u| {
        let address = u.address.load(Ordering::Acquire);
        (address != 0).then(|| {
            (
                address,
                u.gsi_base.load(Ordering::Relaxed),
                u.inputs.load(Ordering::Relaxed),
            )
        })
    })
}
