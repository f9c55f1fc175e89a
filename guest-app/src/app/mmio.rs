//! Finding the vdaq device among microvm's virtio-mmio slots (listed on the command line).

use core::ptr::NonNull;

use vdaq_driver::mmio::{slots_from_cmdline, MmioSlot};
use virtio_drivers::transport::mmio::VirtIOHeader;

const MAGIC: u32 = 0x7472_6976; // "virt"

/// microvm's transport layout when it does not list them on the command line (its default,
/// with ACPI): 24 slots of 512 bytes from 0xfeb0_0000, slot n on GSI 24 + n (the second
/// IOAPIC). Parsing the ACPI DSDT's AML would find the same; no maintained no_std crate makes
/// that small.
fn microvm_default_slots() -> impl Iterator<Item = MmioSlot> {
    (0..24u32).map(|n| MmioSlot {
        base: 0xfeb0_0000 + u64::from(n) * 0x200,
        size: 0x200,
        irq: 24 + n,
    })
}

/// The slot holding virtio device `virtio_id`, if any: from the command line's
/// `virtio_mmio.device=` entries when present, else microvm's default layout.
pub fn find(cmdline: &str, virtio_id: u16) -> Option<MmioSlot> {
    let listed: alloc::vec::Vec<MmioSlot> = slots_from_cmdline(cmdline).collect();
    let candidates: alloc::vec::Vec<MmioSlot> = if listed.is_empty() {
        microvm_default_slots().collect()
    } else {
        listed
    };
    candidates.into_iter().find(|slot| {
        let base = slot.base as usize;
        // SAFETY: the VMM lists these windows as virtio-mmio register blocks; the arch layer
        // maps that range uncached; magic (offset 0) and device ID (offset 8) are read-only.
        let magic = unsafe { core::ptr::read_volatile(base as *const u32) };
        // SAFETY: as above.
        let device = unsafe { core::ptr::read_volatile((base + 8) as *const u32) };
        magic == MAGIC && device == u32::from(virtio_id)
    })
}

/// The register block as virtio-drivers wants it.
pub fn header(slot: &MmioSlot) -> Option<NonNull<VirtIOHeader>> {
    NonNull::new(slot.base as usize as *mut VirtIOHeader)
}
