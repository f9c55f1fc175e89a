//! The top half: what runs in interrupt context, and the little state it shares with the
//! bottom half (atomics only, so the interrupt never waits for a lock).

use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// An interrupt line the top half masks and the bottom half unmasks (an IOAPIC pin, an MSI-X
/// vector). Implemented by the application or the transport.
pub trait InterruptLine: Sync {
    /// Stop delivery; an interrupt raised meanwhile stays pending in the controller.
    fn mask(&self);
    /// Resume delivery (a pending interrupt is delivered now).
    fn unmask(&self);
}

/// A line with nothing to mask (host tests, where the "interrupt" is an eventfd read).
#[derive(Debug)]
pub struct NoLine;

impl InterruptLine for NoLine {
    fn mask(&self) {}
    fn unmask(&self) {}
}

/// How the device's interrupt is acknowledged.
#[derive(Clone, Copy, Debug)]
pub enum Acknowledge {
    /// Nothing to acknowledge (host tests).
    None,
    /// virtio-pci ISR status byte at this address: reading it acknowledges.
    PciIsr(usize),
    /// virtio-mmio InterruptStatus / InterruptACK registers at these addresses.
    Mmio {
        /// InterruptStatus register.
        status: usize,
        /// InterruptACK register.
        ack: usize,
    },
}

/// Interrupt-cause bit for a configuration change (virtio ISR / InterruptStatus bit 1).
const CONFIG_CHANGE: u32 = 1 << 1;

/// State shared between the top half and the driver.
pub struct IrqState {
    acknowledge: Acknowledge,
    line: &'static dyn InterruptLine,
    pending: AtomicBool,
    config_changed: AtomicBool,
    interrupts: AtomicU64,
}

impl core::fmt::Debug for IrqState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IrqState")
            .field("acknowledge", &self.acknowledge)
            .field("pending", &self.pending)
            .field("interrupts", &self.interrupts)
            .finish_non_exhaustive()
    }
}

impl IrqState {
    /// State for a device acknowledged by `acknowledge` whose interrupt arrives on `line`.
    ///
    /// # Safety
    ///
    /// The addresses in `acknowledge` must be the device's mapped ISR or
    /// InterruptStatus/InterruptACK registers, valid for the life of this value.
    pub const unsafe fn new(acknowledge: Acknowledge, line: &'static dyn InterruptLine) -> Self {
        IrqState {
            acknowledge,
            line,
            pending: AtomicBool::new(false),
            config_changed: AtomicBool::new(false),
            interrupts: AtomicU64::new(0),
        }
    }

    /// State for host tests: nothing to acknowledge or mask.
    pub const fn host() -> Self {
        IrqState {
            acknowledge: Acknowledge::None,
            line: &NoLine,
            pending: AtomicBool::new(false),
            config_changed: AtomicBool::new(false),
            interrupts: AtomicU64::new(0),
        }
    }

    /// The top half, for the interrupt handler: acknowledge the device, mask the line, mark
    /// work pending. Nothing else — the bottom half ([`crate::DaqDriver::service`]) does the
    /// work outside interrupt context.
    pub fn top_half(&self) {
        let cause = match self.acknowledge {
            Acknowledge::None => 0,
            // SAFETY: the constructor's contract: a mapped ISR register; reading it is the
            // acknowledgement.
            Acknowledge::PciIsr(isr) => u32::from(unsafe { ptr::read_volatile(isr as *const u8) }),
            Acknowledge::Mmio { status, ack } => {
                // SAFETY: the constructor's contract: mapped InterruptStatus/ACK registers.
                let cause = unsafe { ptr::read_volatile(status as *const u32) };
                if cause != 0 {
                    // SAFETY: as above; writing the cause bits acknowledges them.
                    unsafe { ptr::write_volatile(ack as *mut u32, cause) };
                }
                cause
            }
        };
        if cause & CONFIG_CHANGE != 0 {
            self.config_changed.store(true, Ordering::Release);
        }
        self.line.mask();
        self.interrupts.fetch_add(1, Ordering::Relaxed);
        self.pending.store(true, Ordering::Release);
    }

    /// Records a configuration change the transport reported by other means than the
    /// acknowledge register (a host test's relay); the next [`IrqState::top_half`] follows.
    pub fn note_config_change(&self) {
        self.config_changed.store(true, Ordering::Release);
    }

    /// Marks work pending without an interrupt (a watchdog, or a host test's eventfd).
    pub fn raise(&self) {
        self.pending.store(true, Ordering::Release);
    }

    /// Takes the pending mark.
    pub(crate) fn take_pending(&self) -> bool {
        self.pending.swap(false, Ordering::AcqRel)
    }

    /// Whether work is pending.
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Takes the configuration-change mark.
    pub(crate) fn take_config_changed(&self) -> bool {
        self.config_changed.swap(false, Ordering::AcqRel)
    }

    /// Re-enables the line after the bottom half drained the rings.
    pub(crate) fn unmask(&self) {
        self.line.unmask();
    }

    /// Interrupts taken so far.
    pub fn interrupts(&self) -> u64 {
        self.interrupts.load(Ordering::Relaxed)
    }
}
