//! virtio-mmio: where the devices are (from the kernel command line) and how their interrupt
//! is acknowledged. The transport itself is virtio-drivers' `MmioTransport` (v2), which
//! accepts the vdaq device ID.

use crate::irq::Acknowledge;

/// One virtio-mmio device slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Physical base address.
    pub base: u64,
    /// Size of the register window.
    pub size: u64,
    /// Interrupt line (GSI).
    pub irq: u32,
}

/// Offsets of InterruptStatus and InterruptACK in the virtio-mmio register block.
const INTERRUPT_STATUS: usize = 0x60;
const INTERRUPT_ACK: usize = 0x64;

impl MmioSlot {
    /// How to acknowledge this device's interrupt, given where its registers are mapped.
    pub fn acknowledge(mapped_base: usize) -> Acknowledge {
        Acknowledge::Mmio {
            status: mapped_base + INTERRUPT_STATUS,
            ack: mapped_base + INTERRUPT_ACK,
        }
    }
}

/// Parses the `virtio_mmio.device=<size>@<base>:<irq>` entries a VMM (QEMU microvm) appends to
/// the kernel command line. Size takes K/M/G suffixes, numbers may be hex (0x…).
pub fn slots_from_cmdline(cmdline: &str) -> impl Iterator<Item = MmioSlot> + '_ {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.strip_prefix("virtio_mmio.device="))
        .filter_map(parse_slot)
}

fn parse_slot(spec: &str) -> Option<MmioSlot> {
    let (size, rest) = spec.split_once('@')?;
    let (base, irq) = rest.split_once(':')?;
    // A ":<id>" suffix after the irq is allowed by Linux; ignore it.
    let irq = irq.split(':').next()?;
    Some(MmioSlot {
        base: parse_number(base)?,
        size: parse_size(size)?,
        irq: u32::try_from(parse_number(irq)?).ok()?,
    })
}

fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'K' | b'k' => (&text[..text.len() - 1], 10),
        b'M' | b'm' => (&text[..text.len() - 1], 20),
        b'G' | b'g' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    parse_number(digits)?.checked_mul(1 << shift)
}

fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_entries_microvm_appends() {
        let cmdline = "console=ttyS0 virtio_mmio.device=512@0xfeb00e00:12 vdaq.reads=8 \
                       virtio_mmio.device=4K@0xfeb00000:5:3 virtio_mmio.device=junk";
        let slots: alloc::vec::Vec<_> = slots_from_cmdline(cmdline).collect();
        assert_eq!(
            slots,
            [
                MmioSlot {
                    base: 0xfeb0_0e00,
                    size: 512,
                    irq: 12
                },
                MmioSlot {
                    base: 0xfeb0_0000,
                    size: 4096,
                    irq: 5
                }
            ]
        );
    }
}
