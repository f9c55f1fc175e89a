//! PVH entry: the ELF note QEMU looks for, the 32-bit entry code (zero .bss, identity-map the
//! low 4 GiB with 2 MiB pages — 0xB000_0000 and up uncached, the 2 MiB stack guard below the
//! stack left unmapped — enter long mode) and the reading of `hvm_start_info`.
//!
//! Hand-rolled because no crate provides a PVH entry for a bare-metal Rust binary: the code has
//! to run before Rust can (32-bit protected mode, no stack, paging off), so it is assembly.

use core::sync::atomic::AtomicU64;

/// TSC value at the first instruction of the guest (written by the entry code).
pub(super) static BOOT_TSC: AtomicU64 = AtomicU64::new(0);

/// Start of the range mapped uncached (PCD|PWT): PCIe ECAM, PCI BARs, IOAPIC, LAPIC,
/// virtio-mmio — everything from here up to 4 GiB.
pub const UNCACHED_START: u64 = 0xB000_0000;

/// The page-table entry bits of one 2 MiB page: present, writable, page size.
const PDE_FLAGS: u32 = 0x83;
/// Page-level write-through and cache disable: PAT entry 3, uncached with the reset PAT.
const PDE_UNCACHED: u32 = 0x18;

// The PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY = 18): QEMU reads a pointer-sized descriptor for
// 64-bit ELF files, so the 32-bit entry address is stored as a quad with zero upper half.
core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad vdaq_pvh_start32

    .section .text.vdaq_boot, "ax", @progbits
    .code32
    .global vdaq_pvh_start32
vdaq_pvh_start32:
    cli
    cld
    rdtsc
    mov ebp, eax
    mov esi, ebx
    mov ebx, edx

    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    shr ecx, 2
    xor eax, eax
    rep stosd

    mov dword ptr [{boot_tsc}], ebp
    mov dword ptr [{boot_tsc} + 4], ebx

    mov edi, offset vdaq_boot_pd
    xor ecx, ecx
2:
    mov eax, ecx
    shl eax, 21
    or eax, {pde_flags}
    cmp ecx, {uc_first}
    jb 3f
    or eax, {pde_uncached}
3:
    mov dword ptr [edi + ecx * 8], eax
    inc ecx
    cmp ecx, 2048
    jb 2b
    mov eax, offset __stack_guard
    shr eax, 21
    mov dword ptr [edi + eax * 8], 0

    mov eax, offset vdaq_boot_pd
    or eax, 3
    mov dword ptr [vdaq_boot_pdpt], eax
    add eax, 4096
    mov dword ptr [vdaq_boot_pdpt + 8], eax
    add eax, 4096
    mov dword ptr [vdaq_boot_pdpt + 16], eax
    add eax, 4096
    mov dword ptr [vdaq_boot_pdpt + 24], eax
    mov eax, offset vdaq_boot_pdpt
    or eax, 3
    mov dword ptr [vdaq_boot_pml4], eax

    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, offset vdaq_boot_pml4
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    and eax, 0x9FFFFFFF
    or eax, 0x80000001
    mov cr0, eax

    lgdt [vdaq_boot_gdtr]
    mov esp, offset __stack_top
    push 0x08
    mov eax, offset vdaq_long_mode
    push eax
    retf

    .code64
vdaq_long_mode:
    mov eax, 0x10
    mov ds, eax
    mov es, eax
    mov ss, eax
    xor eax, eax
    mov fs, eax
    mov gs, eax
    mov rsp, offset __stack_top
    xor ebp, ebp
    mov edi, esi
    call {rust_entry}
    ud2

    .section .rodata.vdaq_boot, "a", @progbits
    .balign 16
vdaq_boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
vdaq_boot_gdtr:
    .short 23
    .long vdaq_boot_gdt

    .section .bss.vdaq_boot, "aw", @nobits
    .balign 4096
vdaq_boot_pml4:
    .skip 4096
vdaq_boot_pdpt:
    .skip 4096
vdaq_boot_pd:
    .skip 4096 * 4

    .text
    "#,
    boot_tsc = sym BOOT_TSC,
    rust_entry = sym super::rust_entry,
    pde_flags = const PDE_FLAGS,
    pde_uncached = const PDE_UNCACHED,
    uc_first = const UNCACHED_START >> 21,
);

extern "C" {
    static __stack_guard: u8;
    static __stack_bottom: u8;
}

/// The unmapped page below the stack (linker.ld): a fault address in it means stack overflow.
pub(super) fn stack_guard() -> core::ops::Range<u64> {
    (&raw const __stack_guard) as u64..(&raw const __stack_bottom) as u64
}

/// `hvm_start_info` as the PVH boot protocol defines it (version 1).
#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    _flags: u32,
    _nr_modules: u32,
    _modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    _reserved: u32,
}

const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Upper bound on the command line we accept (QEMU's own limit is far below).
const CMDLINE_MAX: usize = 64 * 1024;

/// One entry of the PVH memory map (`hvm_memmap_table_entry`, E820 types).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Physical start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type: 1 RAM, 2 reserved, 3 ACPI reclaimable, 4 ACPI NVS, 5 unusable.
    pub kind: u32,
    _reserved: u32,
}

impl MemoryRegion {
    /// E820 type of usable RAM.
    pub const RAM: u32 = 1;

    /// Whether this region is usable RAM.
    pub fn is_ram(&self) -> bool {
        self.kind == Self::RAM
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// What the PVH start info told us, validated.
pub(super) struct Parsed {
    pub cmdline: &'static str,
    pub memory_map: &'static [MemoryRegion],
    pub rsdp_paddr: u64,
}

/// Reads the `hvm_start_info` at physical address `paddr`.
///
/// Panics when the structure is missing or malformed: without it we know neither the command
/// line nor the memory map.
pub(super) fn parse_start_info(paddr: u32) -> Parsed {
    let ptr = paddr as usize as *const StartInfo;
    assert!(
        !ptr.is_null() && ptr.is_aligned(),
        "PVH start info pointer {paddr:#x} is invalid"
    );
    // SAFETY: the PVH boot protocol passes the physical address of an `hvm_start_info` in %ebx
    // and the low 4 GiB are identity-mapped; the firmware-owned memory it lives in is never
    // reused by this guest (heap and stack are linker-reserved regions above the image).
    let info = unsafe { &*ptr };
    assert_eq!(
        info.magic, START_INFO_MAGIC,
        "PVH start info at {paddr:#x} has a bad magic"
    );
    let cmdline = if info.cmdline_paddr == 0 {
        ""
    } else {
        // SAFETY: the firmware stores a NUL-terminated command line at `cmdline_paddr`; it is
        // identity-mapped and never overwritten (see above).
        unsafe { c_str(info.cmdline_paddr) }
    };
    let memory_map = if info.version >= 1 && info.memmap_paddr != 0 && info.memmap_entries > 0 {
        let table = info.memmap_paddr as usize as *const MemoryRegion;
        if table.is_aligned() {
            // SAFETY: version ≥ 1 start info points to `memmap_entries` entries of this layout,
            // aligned as checked, in identity-mapped memory nobody overwrites.
            let map = unsafe { core::slice::from_raw_parts(table, info.memmap_entries as usize) };
            // qboot counts one empty entry too many on microvm: drop empty trailing entries.
            let used = map.iter().rposition(|r| r.size != 0).map_or(0, |i| i + 1);
            &map[..used]
        } else {
            &[]
        }
    } else {
        &[]
    };
    Parsed {
        cmdline,
        memory_map,
        rsdp_paddr: info.rsdp_paddr,
    }
}

/// Borrows the NUL-terminated string at `paddr` (invalid UTF-8 yields "").
///
/// # Safety
/// `paddr` must point to readable, identity-mapped memory holding a NUL within `CMDLINE_MAX`
/// bytes (or at least `CMDLINE_MAX` readable bytes), which stays unchanged for the program's life.
unsafe fn c_str(paddr: u64) -> &'static str {
    let base = paddr as usize as *const u8;
    let mut len = 0;
    // SAFETY: the caller guarantees the bytes up to the NUL (or CMDLINE_MAX) are readable.
    while len < CMDLINE_MAX && unsafe { base.wrapping_add(len).read() } != 0 {
        len += 1;
    }
    // SAFETY: `len` bytes from `base` were just read and are immutable from now on.
    let bytes = unsafe { core::slice::from_raw_parts(base, len) };
    core::str::from_utf8(bytes).unwrap_or("")
}
