//! The guest application: find the device (PCI on q35, MMIO on microvm), wire its interrupt
//! to the driver's top half, run the reader, print the report, exit through isa-debug-exit.

mod hal;
mod logger;
mod mmio;
mod params;
mod pci;
mod reader;

use spin::Once;
use vdaq_driver::irq::{InterruptLine, IrqState};
use vdaq_driver::mmio::MmioSlot;
use vdaq_driver::pci::{MsiMessage, MsixEntryLine, PciDaqTransport};
use vdaq_wire::report::REPORT_PREFIX;
use vdaq_wire::VIRTIO_ID_DAQ;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::pci::bus::PciRoot;

use crate::arch::{self, interrupts, ioapic, time, BootInfo};
use hal::GuestHal;
use params::{Params, TransportKind};
use reader::Outcome;

/// Vector of the device's interrupt (MSI-X message data, or the IOAPIC redirection).
const DAQ_VECTOR: u8 = 0x40;
/// Vector of the periodic wake-up timer (deadlines, progress).
const TICK_VECTOR: u8 = 0x41;

static IRQ: Once<IrqState> = Once::new();
static MSIX_LINE: Once<MsixEntryLine> = Once::new();
static IOAPIC_LINE: Once<IoApicLine> = Once::new();

/// The device's interrupt handler: the driver's top half, nothing else.
fn daq_interrupt() {
    if let Some(irq) = IRQ.get() {
        irq.top_half();
    }
}

/// Nothing to do: the tick only ends a halt so the main loop looks at the clock.
fn tick() {}

/// An IOAPIC pin as the driver's interrupt line.
#[derive(Debug)]
struct IoApicLine {
    gsi: u32,
}

impl InterruptLine for IoApicLine {
    fn mask(&self) {
        ioapic::mask(self.gsi, true);
    }

    fn unmask(&self) {
        ioapic::mask(self.gsi, false);
    }
}

/// Device ID to look for: vdaq.device_id=N overrides the default.
fn device_id(cmdline: &str) -> u16 {
    cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("vdaq.device_id="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(VIRTIO_ID_DAQ)
}

fn run_pci(params: &Params, id: u16) -> Result<Outcome, &'static str> {
    let mut root = PciRoot::new(pci::PortCam);
    let function = pci::find_and_assign(&mut root, id).ok_or("no vdaq PCI device found")?;
    let msi = MsiMessage {
        address: 0xfee0_0000 | (u64::from(interrupts::lapic_id()) << 12),
        data: u32::from(DAQ_VECTOR),
    };
    // SAFETY: `find_and_assign` put the BARs in the free window 0xC000_0000..0xFEC0_0000,
    // which the arch layer identity-maps uncached, and GuestHal maps physical = virtual.
    let (transport, interrupt) = unsafe {
        PciDaqTransport::new::<GuestHal, _, _>(&mut root, &mut pci::PortCam, function, msi)
    }
    .map_err(|err| {
        crate::println!("vdaq: PCI setup failed: {err:?}");
        "PCI transport setup failed"
    })?;
    let line: &'static MsixEntryLine = MSIX_LINE.call_once(|| interrupt.line);
    // SAFETY: the acknowledgement address is the device's ISR register, mapped (identity,
    // uncached) for as long as the program runs.
    let irq = IRQ.call_once(|| unsafe { IrqState::new(interrupt.acknowledge, line) });
    interrupts::set_handler(DAQ_VECTOR, daq_interrupt);
    let outcome = reader::run(transport, irq, params, "pci");
    Ok(outcome)
}

fn run_mmio(params: &Params, cmdline: &'static str, id: u16) -> Result<Outcome, &'static str> {
    let slot = mmio::find(cmdline, id).ok_or("no vdaq virtio-mmio device found")?;
    let header = mmio::header(&slot).ok_or("virtio-mmio slot at address 0")?;
    // SAFETY: the slot is a virtio-mmio register block the VMM announced, identity-mapped
    // uncached, used by nothing else.
    let transport = unsafe { MmioTransport::new(header, slot.size as usize) }.map_err(|err| {
        crate::println!("vdaq: MMIO transport failed: {err:?}");
        "MMIO transport setup failed"
    })?;
    let line: &'static IoApicLine = IOAPIC_LINE.call_once(|| IoApicLine { gsi: slot.irq });
    // SAFETY: InterruptStatus/ACK of this register block, mapped for the program's life.
    let irq =
        IRQ.call_once(|| unsafe { IrqState::new(MmioSlot::acknowledge(slot.base as usize), line) });
    interrupts::set_handler(DAQ_VECTOR, daq_interrupt);
    // virtio-mmio holds its line asserted until acknowledged: level-triggered, active high.
    ioapic::route(slot.irq, DAQ_VECTOR, true, false);
    ioapic::mask(slot.irq, false);
    Ok(reader::run(transport, irq, params, "mmio"))
}

/// The application entry point, called by the arch layer.
pub fn run(boot: &BootInfo) -> ! {
    let params = Params::parse(boot.cmdline);
    logger::init();
    crate::println!("vdaq guest: {:?}", params);
    interrupts::set_handler(TICK_VECTOR, tick);
    time::start_periodic_timer(TICK_VECTOR, 10_000);
    interrupts::enable();
    let id = device_id(boot.cmdline);
    let result = match params.transport {
        TransportKind::Pci => run_pci(&params, id),
        TransportKind::Mmio => run_mmio(&params, boot.cmdline, id),
    };
    time::stop_periodic_timer();
    let report = match result {
        Ok(outcome) => outcome.report,
        Err(why) => vdaq_wire::report::Report {
            transport: match params.transport {
                TransportKind::Pci => "pci",
                TransportKind::Mmio => "mmio",
            },
            mode: params.mode,
            failure: why,
            ..Default::default()
        },
    };
    let mut line = alloc::string::String::from(REPORT_PREFIX);
    if report.write_json(&mut line).is_err() {
        line.push_str("{}");
    }
    crate::println!("{line}");
    arch::exit(if report.pass { 0 } else { 1 })
}
