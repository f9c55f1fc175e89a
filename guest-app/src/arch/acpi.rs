//! Just enough ACPI to find the IOAPICs: RSDP (from the PVH start info, else the BIOS area
//! scan), RSDT/XSDT, and the MADT's IOAPIC and interrupt-source-override entries.
//!
//! Hand-rolled: the `acpi` crate wants an allocator and a mapping handler, and pulls in AML
//! support we do not need; this is ~100 lines over identity-mapped memory.

/// An IOAPIC as the MADT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoApicEntry {
    pub id: u8,
    pub address: u32,
    pub gsi_base: u32,
}

/// An ISA interrupt source override (e.g. IRQ 0 → GSI 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceOverride {
    pub isa_irq: u8,
    pub gsi: u32,
    /// MPS INTI flags: bits 1..0 polarity, 3..2 trigger mode.
    pub flags: u16,
}

pub const MAX_IOAPICS: usize = 8;
pub const MAX_OVERRIDES: usize = 16;

/// What the MADT told us.
#[derive(Clone, Copy, Debug, Default)]
pub struct Madt {
    pub ioapics: [Option<IoApicEntry>; MAX_IOAPICS],
    pub overrides: [Option<SourceOverride>; MAX_OVERRIDES],
}

/// Reads `N` bytes at physical address `addr`.
///
/// # Safety
/// `addr..addr + N` must be identity-mapped readable memory.
unsafe fn bytes<const N: usize>(addr: u64) -> [u8; N] {
    // SAFETY: forwarded to the caller; byte arrays have no alignment requirement.
    unsafe { core::ptr::read_unaligned(addr as usize as *const [u8; N]) }
}

/// # Safety
/// As for [`bytes`], over `len` bytes.
unsafe fn checksum_ok(addr: u64, len: usize) -> bool {
    // SAFETY: forwarded to the caller.
    let table = unsafe { core::slice::from_raw_parts(addr as usize as *const u8, len) };
    table.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Finds the RSDP: `hint` (from the PVH start info) when non-zero, else the EBDA's first KiB
/// and 0xE0000..0x100000, on 16-byte boundaries.
pub fn find_rsdp(hint: u64) -> Option<u64> {
    let valid = |addr: u64| {
        // SAFETY: all candidates lie in low memory (< 1 MiB) or where the firmware says the
        // RSDP is, identity-mapped; 20 bytes is the ACPI 1.0 RSDP length.
        let head: [u8; 20] = unsafe { bytes(addr) };
        // SAFETY: as above.
        &head[..8] == b"RSD PTR " && unsafe { checksum_ok(addr, 20) }
    };
    if hint != 0 && hint < 1 << 32 && valid(hint) {
        return Some(hint);
    }
    // SAFETY: 0x40E holds the EBDA segment in the BIOS data area, identity-mapped.
    let ebda = u64::from(u16::from_le_bytes(unsafe { bytes::<2>(0x40E) })) << 4;
    let ebda_range = if (0x8_0000..0xA_0000).contains(&ebda) {
        ebda..ebda + 1024
    } else {
        0..0
    };
    ebda_range
        .step_by(16)
        .chain((0xE_0000..0x10_0000).step_by(16))
        .find(|&addr| valid(addr))
}

/// Walks RSDT/XSDT for the MADT and extracts IOAPICs and source overrides.
pub fn parse_madt(rsdp: u64) -> Option<Madt> {
    // SAFETY: `rsdp` was validated by `find_rsdp`; the ACPI 2.0 RSDP is 36 bytes.
    let r: [u8; 36] = unsafe { bytes(rsdp) };
    let (root, entry_size) = if r[15] >= 2 {
        let xsdt = u64::from_le_bytes([r[24], r[25], r[26], r[27], r[28], r[29], r[30], r[31]]);
        (xsdt, 8)
    } else {
        (u64::from(u32_at(&r, 16)), 4)
    };
    let root_len = table_len(root, *b"XSDT").or_else(|| table_len(root, *b"RSDT"))?;
    let entries = (root_len - 36) / entry_size;
    let madt = (0..entries).find_map(|i| {
        let at = root + 36 + i * entry_size;
        // SAFETY: inside the root table, whose length and checksum were checked.
        let raw: [u8; 8] = unsafe { bytes(at) };
        let addr = if entry_size == 8 {
            u64::from_le_bytes(raw)
        } else {
            u64::from(u32_at(&raw, 0))
        };
        table_len(addr, *b"APIC").map(|len| (addr, len))
    });
    let (madt, len) = madt?;
    let mut out = Madt::default();
    let (mut n_io, mut n_iso) = (0, 0);
    let mut off = 44; // header (36) + local APIC address (4) + flags (4)
    while off + 2 <= len {
        // SAFETY: inside the MADT, whose length and checksum were checked.
        let [kind, entry_len]: [u8; 2] = unsafe { bytes(madt + off) };
        let entry_len = u64::from(entry_len);
        if entry_len < 2 || off + entry_len > len {
            break;
        }
        match (kind, entry_len) {
            (1, 12..) if n_io < MAX_IOAPICS => {
                // SAFETY: a 12-byte IOAPIC entry inside the MADT.
                let e: [u8; 12] = unsafe { bytes(madt + off) };
                out.ioapics[n_io] = Some(IoApicEntry {
                    id: e[2],
                    address: u32_at(&e, 4),
                    gsi_base: u32_at(&e, 8),
                });
                n_io += 1;
            }
            (2, 10..) if n_iso < MAX_OVERRIDES => {
                // SAFETY: a 10-byte interrupt source override entry inside the MADT.
                let e: [u8; 10] = unsafe { bytes(madt + off) };
                out.overrides[n_iso] = Some(SourceOverride {
                    isa_irq: e[3],
                    gsi: u32_at(&e, 4),
                    flags: u16::from_le_bytes([e[8], e[9]]),
                });
                n_iso += 1;
            }
            _ => {}
        }
        off += entry_len;
    }
    Some(out)
}

/// Length of the ACPI table at `addr` if its signature is `sig` and its checksum is right.
fn table_len(addr: u64, sig: [u8; 4]) -> Option<u64> {
    if addr == 0 || addr >= 1 << 32 {
        return None;
    }
    // SAFETY: table addresses come from validated RSDP/RSDT/XSDT entries and lie below 4 GiB,
    // identity-mapped; an ACPI header is 36 bytes.
    let header: [u8; 36] = unsafe { bytes(addr) };
    let len = u32_at(&header, 4);
    if header[..4] != sig || len < 36 || u64::from(len) > (1 << 20) {
        return None;
    }
    // SAFETY: the table claims `len` bytes (bounded to 1 MiB above) at an identity-mapped address.
    unsafe { checksum_ok(addr, len as usize) }.then_some(u64::from(len))
}
