//! Finding the vdaq PCI function on q35, assigning its BARs (qboot leaves 64-bit BARs
//! unassigned) and handing it to the driver's MSI-X PCI transport.

use virtio_drivers::transport::pci::bus::{
    BarInfo, ConfigurationAccess, DeviceFunction, MemoryBarType, PciRoot,
};
use x86_64::instructions::port::Port;

/// PCI configuration mechanism #1 (ports 0xCF8/0xCFC). Hand-rolled: virtio-drivers only ships
/// memory-mapped CAMs, and the port mechanism needs no firmware setup (ECAM needs the MCH's
/// PCIEXBAR programmed).
#[derive(Debug, Clone, Copy)]
pub struct PortCam;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

fn address(function: DeviceFunction, offset: u8) -> u32 {
    0x8000_0000
        | u32::from(function.bus) << 16
        | u32::from(function.device) << 11
        | u32::from(function.function) << 8
        | u32::from(offset & 0xfc)
}

impl ConfigurationAccess for PortCam {
    fn read_word(&self, function: DeviceFunction, offset: u8) -> u32 {
        crate::arch::interrupts::without_interrupts(|| {
            // SAFETY: the PCI configuration ports; the address/data pair is used with
            // interrupts off so nothing interleaves.
            unsafe { Port::<u32>::new(CONFIG_ADDRESS).write(address(function, offset)) };
            // SAFETY: as above.
            unsafe { Port::<u32>::new(CONFIG_DATA).read() }
        })
    }

    fn write_word(&mut self, function: DeviceFunction, offset: u8, data: u32) {
        crate::arch::interrupts::without_interrupts(|| {
            // SAFETY: as in read_word.
            unsafe { Port::<u32>::new(CONFIG_ADDRESS).write(address(function, offset)) };
            // SAFETY: as in read_word.
            unsafe { Port::<u32>::new(CONFIG_DATA).write(data) };
        })
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}

/// PCI vendor ID of virtio devices; device ID = 0x1040 + virtio ID (modern).
const VIRTIO_VENDOR: u16 = 0x1af4;

/// Where unassigned BARs go: above every BAR already assigned, below the IOAPIC.
const WINDOW_END: u64 = 0xfec0_0000;

/// Finds the virtio device with `virtio_id` on bus 0 and assigns its unassigned memory BARs.
pub fn find_and_assign(root: &mut PciRoot<PortCam>, virtio_id: u16) -> Option<DeviceFunction> {
    let mut found = None;
    let mut next_free: u64 = 0xc000_0000;
    for (function, info) in root.enumerate_bus(0) {
        if let Ok(bars) = root.bars(function) {
            for bar in bars.iter().flatten() {
                if let Some((address, size)) = bar.memory_address_size() {
                    if address != 0 && address < WINDOW_END {
                        next_free = next_free.max(address + size);
                    }
                }
            }
        }
        if info.vendor_id == VIRTIO_VENDOR && info.device_id == 0x1040 + virtio_id {
            found = Some(function);
        }
    }
    let function = found?;
    let bars = root.bars(function).ok()?;
    for (index, bar) in bars.iter().enumerate() {
        let Some(BarInfo::Memory {
            address_type,
            size,
            address,
            ..
        }) = bar
        else {
            continue;
        };
        if *address != 0 || *size == 0 {
            continue;
        }
        let base = next_free.next_multiple_of(*size);
        if base + size > WINDOW_END {
            crate::println!("vdaq: no room for BAR{index} ({size:#x} bytes)");
            return None;
        }
        match address_type {
            MemoryBarType::Width64 => root.set_bar_64(function, index as u8, base),
            _ => root.set_bar_32(function, index as u8, base as u32),
        }
        next_free = base + size;
    }
    Some(function)
}
