//! virtio-pci (modern) with MSI-X: virtio-drivers' `PciTransport` does capabilities, BARs,
//! features, status and queues; it has no MSI-X support, so this wrapper programs the MSI-X
//! table and the common configuration's `msix_config` / `queue_msix_vector` registers itself.
//!
//! QEMU's generic vhost-user PCI device has a single MSI-X vector shared by configuration
//! changes and all queues; the wrapper routes everything to table entry 0.

use core::ptr;

use virtio_drivers::transport::pci::bus::{Command, ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::{PciTransport, VirtioPciError};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Hal, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::irq::{Acknowledge, InterruptLine};

const PCI_CAP_ID_VNDR: u8 = 0x09;
const PCI_CAP_ID_MSIX: u8 = 0x11;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// MSI-X message control: enable (bit 15) and function mask (bit 14).
const MSIX_ENABLE: u32 = 1 << 15;
const MSIX_FUNCTION_MASK: u32 = 1 << 14;
/// Offsets in `virtio_pci_common_cfg`.
const COMMON_MSIX_CONFIG: usize = 0x10;
const COMMON_QUEUE_SELECT: usize = 0x16;
const COMMON_QUEUE_MSIX_VECTOR: usize = 0x1a;
/// "No vector" value of the MSI-X vector registers.
const NO_VECTOR: u16 = 0xffff;
/// MSI-X table entry: address low, address high, data, vector control (bit 0 = masked).
const MSIX_ENTRY_SIZE: usize = 16;

/// Why a PCI function could not be set up.
#[derive(Debug)]
pub enum PciSetupError {
    /// virtio-drivers refused the function.
    Transport(VirtioPciError),
    /// A capability the device must have is missing.
    MissingCapability(&'static str),
    /// A capability points into a BAR that is not assigned (or is an I/O BAR).
    BarNotAssigned(u8),
}

/// Where the device's MSI goes: the local APIC's address and the vector number.
#[derive(Clone, Copy, Debug)]
pub struct MsiMessage {
    /// Message address (x86: 0xFEE0_0000 | APIC ID << 12).
    pub address: u64,
    /// Message data (x86: the vector).
    pub data: u32,
}

/// Maps `len` bytes of device memory at physical `address`.
fn map<H: Hal>(address: u64, len: usize) -> usize {
    // SAFETY: only called from `PciDaqTransport::new`, whose caller guarantees the BARs are
    // assigned and mappable; the regions are the ones the device's capabilities describe.
    unsafe { H::mmio_phys_to_virt(address as PhysAddr, len) }.as_ptr() as usize
}

/// Writes a 32-bit device register at a mapped address.
fn write_u32(address: usize, value: u32) {
    // SAFETY: only called with addresses inside the MSI-X table entry mapped by `map`.
    unsafe { ptr::write_volatile(address as *mut u32, value) };
}

/// Masks and unmasks one MSI-X table entry (its vector-control word).
#[derive(Debug)]
pub struct MsixEntryLine {
    vector_control: usize,
}

impl InterruptLine for MsixEntryLine {
    fn mask(&self) {
        // SAFETY: `vector_control` is the mapped vector-control word of the device's MSI-X
        // table entry 0 (set up in `PciDaqTransport::new`); masking only defers delivery.
        unsafe { ptr::write_volatile(self.vector_control as *mut u32, 1) };
    }

    fn unmask(&self) {
        // SAFETY: as in `mask`; a message that arrived while masked is delivered now.
        unsafe { ptr::write_volatile(self.vector_control as *mut u32, 0) };
    }
}

/// The interrupt side of a PCI device: how to acknowledge it and how to mask its vector.
#[derive(Debug)]
pub struct PciInterrupt {
    /// ISR acknowledgement (tells configuration changes apart).
    pub acknowledge: Acknowledge,
    /// Mask/unmask of MSI-X entry 0.
    pub line: MsixEntryLine,
}

/// virtio-pci transport with MSI-X.
#[derive(Debug)]
pub struct PciDaqTransport {
    inner: PciTransport,
    common_cfg: usize,
    msix_failures: u32,
}

struct Capability {
    bar: u8,
    offset: u32,
}

fn virtio_capability<C: ConfigurationAccess, R: ConfigurationAccess>(
    root: &PciRoot<C>,
    config: &R,
    function: DeviceFunction,
    wanted: u8,
) -> Option<Capability> {
    root.capabilities(function)
        .filter(|cap| cap.id == PCI_CAP_ID_VNDR && (cap.private_header >> 8) as u8 == wanted)
        .map(|cap| Capability {
            bar: config.read_word(function, cap.offset + 4) as u8,
            offset: config.read_word(function, cap.offset + 8),
        })
        .next()
}

fn bar_address<C: ConfigurationAccess>(
    root: &mut PciRoot<C>,
    function: DeviceFunction,
    bar: u8,
) -> Result<u64, PciSetupError> {
    root.bar_info(function, bar)
        .ok()
        .flatten()
        .and_then(|info| info.memory_address_size())
        .map(|(address, _)| address)
        .filter(|&address| address != 0)
        .ok_or(PciSetupError::BarNotAssigned(bar))
}

impl PciDaqTransport {
    /// Sets up the virtio PCI function at `function`: memory decoding and bus mastering on,
    /// MSI-X entry 0 pointed at `msi` (masked until the driver is ready), the transport.
    /// `config` accesses the same configuration space as `root` (virtio-drivers' `PciRoot`
    /// does not expose raw register access, which the virtio and MSI-X capability fields
    /// need).
    ///
    /// # Safety
    ///
    /// The function's memory BARs must be assigned to otherwise unused physical addresses,
    /// and `H::mmio_phys_to_virt` must map them (uncached) for the life of the transport:
    /// this writes the device's MSI-X table and common configuration through those mappings.
    pub unsafe fn new<H: Hal, C: ConfigurationAccess, R: ConfigurationAccess>(
        root: &mut PciRoot<C>,
        config: &mut R,
        function: DeviceFunction,
        msi: MsiMessage,
    ) -> Result<(Self, PciInterrupt), PciSetupError> {
        root.set_command(
            function,
            Command::MEMORY_SPACE | Command::BUS_MASTER | Command::INTERRUPT_DISABLE,
        );
        let common = virtio_capability(root, config, function, VIRTIO_PCI_CAP_COMMON_CFG)
            .ok_or(PciSetupError::MissingCapability("common configuration"))?;
        let isr = virtio_capability(root, config, function, VIRTIO_PCI_CAP_ISR_CFG)
            .ok_or(PciSetupError::MissingCapability("ISR status"))?;
        let msix = root
            .capabilities(function)
            .find(|cap| cap.id == PCI_CAP_ID_MSIX)
            .ok_or(PciSetupError::MissingCapability("MSI-X"))?;

        let common_cfg = bar_address(root, function, common.bar)? + u64::from(common.offset);
        let isr_addr = bar_address(root, function, isr.bar)? + u64::from(isr.offset);
        let table = config.read_word(function, msix.offset + 4);
        let table_addr =
            bar_address(root, function, (table & 0x7) as u8)? + u64::from(table & !0x7);

        let common_cfg = map::<H>(common_cfg, 0x40);
        let isr_addr = map::<H>(isr_addr, 1);
        let entry = map::<H>(table_addr, MSIX_ENTRY_SIZE);

        // Program entry 0, masked; the driver unmasks it once it can take interrupts.
        write_u32(entry + 12, 1);
        write_u32(entry, msi.address as u32);
        write_u32(entry + 4, (msi.address >> 32) as u32);
        write_u32(entry + 8, msi.data);
        let control = config.read_word(function, msix.offset);
        config.write_word(
            function,
            msix.offset,
            (control | (MSIX_ENABLE << 16)) & !(MSIX_FUNCTION_MASK << 16),
        );

        let inner = PciTransport::new::<H, C>(root, function).map_err(PciSetupError::Transport)?;
        Ok((
            PciDaqTransport {
                inner,
                common_cfg,
                msix_failures: 0,
            },
            PciInterrupt {
                acknowledge: Acknowledge::PciIsr(isr_addr),
                line: MsixEntryLine {
                    vector_control: entry + 12,
                },
            },
        ))
    }

    /// How many vector assignments the device refused (it answers NO_VECTOR when it has no
    /// resources); nonzero means interrupts will not arrive.
    pub fn msix_failures(&self) -> u32 {
        self.msix_failures
    }

    fn write_common_u16(&self, offset: usize, value: u16) {
        // SAFETY: `common_cfg` maps the device's common configuration structure (at least
        // 0x38 bytes); `offset` is one of its 16-bit registers.
        unsafe { ptr::write_volatile((self.common_cfg + offset) as *mut u16, value) };
    }

    fn read_common_u16(&self, offset: usize) -> u16 {
        // SAFETY: as in `write_common_u16`.
        unsafe { ptr::read_volatile((self.common_cfg + offset) as *const u16) }
    }

    fn assign_vector(&mut self, register: usize) {
        self.write_common_u16(register, 0);
        if self.read_common_u16(register) == NO_VECTOR {
            self.msix_failures += 1;
        }
    }
}

impl Transport for PciDaqTransport {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner.write_driver_features(driver_features);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue);
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status);
        if status == DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER {
            // Reset cleared the vectors; configuration changes go to entry 0.
            self.assign_vector(COMMON_MSIX_CONFIG);
        }
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size);
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area);
        // Before DRIVER_OK, when QEMU wires the vector to the backend's call eventfd.
        self.write_common_u16(COMMON_QUEUE_SELECT, queue);
        self.assign_vector(COMMON_QUEUE_MSIX_VECTOR);
    }

    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue);
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        self.inner.read_config_space(offset)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        self.inner.write_config_space(offset, value)
    }
}
