//! CPU setup after the entry code: the final GDT with a TSS (an IST stack for double faults),
//! MTRRs (qboot leaves them disabled, which makes all memory uncached under KVM), and small
//! CPUID/MSR/TSC helpers. GDT, TSS and MSR access come from the `x86_64` crate; the MTRR
//! programming is hand-rolled (no maintained crate covers it).

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::model_specific::Msr;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slot (0-based, as the IDT entry names it) used by the double-fault handler.
pub(super) const DOUBLE_FAULT_IST: u16 = 0;
const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct IstStack([u8; IST_STACK_SIZE]);

static mut DOUBLE_FAULT_STACK: IstStack = IstStack([0; IST_STACK_SIZE]);

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(GlobalDescriptorTable, Selectors)> = Once::new();

struct Selectors {
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

/// Loads the final GDT (same code/data selectors as the boot GDT: 0x08, 0x10) plus a TSS.
pub(super) fn init_gdt() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        let stack = VirtAddr::from_ptr(&raw const DOUBLE_FAULT_STACK);
        tss.interrupt_stack_table[usize::from(DOUBLE_FAULT_IST)] = stack + IST_STACK_SIZE as u64;
        tss
    });
    let (gdt, sel) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        (gdt, Selectors { code, data, tss })
    });
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, which is 'static; code is a 64-bit
    // ring-0 code segment, data a writable ring-0 data segment.
    unsafe { CS::set_reg(sel.code) };
    // SAFETY: as above, a valid data segment.
    unsafe { SS::set_reg(sel.data) };
    // SAFETY: as above.
    unsafe { DS::set_reg(sel.data) };
    // SAFETY: as above.
    unsafe { ES::set_reg(sel.data) };
    // SAFETY: the selector names an available 64-bit TSS descriptor in the loaded GDT, loaded once.
    unsafe { load_tss(sel.tss) };
}

/// `cpuid` with a sub-leaf.
pub fn cpuid(leaf: u32, subleaf: u32) -> core::arch::x86_64::CpuidResult {
    // (`__cpuid_count` is a safe function since Rust 1.9x, unsafe before.)
    #[allow(unused_unsafe)]
    // SAFETY: cpuid is available on every x86_64 CPU and has no side effects.
    unsafe {
        core::arch::x86_64::__cpuid_count(leaf, subleaf)
    }
}

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    #[allow(unused_unsafe)]
    // SAFETY: rdtsc is available on every x86_64 CPU (CR4.TSD is clear: ring 0 anyway).
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
}

/// Reads an MSR.
///
/// # Safety
/// The MSR must exist on this CPU (else #GP) and reading it must have no unwanted side effect.
pub(super) unsafe fn rdmsr(msr: u32) -> u64 {
    // SAFETY: forwarded to the caller.
    unsafe { Msr::new(msr).read() }
}

/// Writes an MSR.
///
/// # Safety
/// The MSR must exist and the value must be valid for it; the effect must be intended.
pub(super) unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { Msr::new(msr).write(value) }
}

const IA32_MTRRCAP: u32 = 0xFE;
const IA32_MTRR_PHYSBASE0: u32 = 0x200;
const IA32_MTRR_DEF_TYPE: u32 = 0x2FF;
const MTRR_ENABLE: u64 = 1 << 11;
const MEMTYPE_UC: u64 = 0;
const MEMTYPE_WB: u64 = 6;

/// Outcome of [`init_mtrrs`], for the boot log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtrrSetup {
    /// CPUID reports no MTRRs.
    Unsupported,
    /// Firmware had already enabled them (e.g. SeaBIOS); left alone.
    AlreadyEnabled,
    /// Enabled here: default write-back, the 0xB000_0000..4 GiB hole uncached.
    Enabled,
}

/// Enables the MTRRs with write-back as default type when the firmware left them disabled,
/// and marks 0xB000_0000..4 GiB uncached with two variable ranges when there are enough
/// (the page tables mark that range uncached through PAT as well).
pub(super) fn init_mtrrs() -> MtrrSetup {
    const CPUID_MTRR: u32 = 1 << 12;
    if cpuid(1, 0).edx & CPUID_MTRR == 0 {
        return MtrrSetup::Unsupported;
    }
    // SAFETY: CPUID says MTRRs exist, so the MTRR MSRs do.
    let def_type = unsafe { rdmsr(IA32_MTRR_DEF_TYPE) };
    if def_type & MTRR_ENABLE != 0 {
        return MtrrSetup::AlreadyEnabled;
    }
    // SAFETY: as above.
    let vcnt = (unsafe { rdmsr(IA32_MTRRCAP) } & 0xFF) as u32;
    let phys_bits = if cpuid(0x8000_0000, 0).eax >= 0x8000_0008 {
        cpuid(0x8000_0008, 0).eax & 0xFF
    } else {
        36
    };
    let addr_mask = (1u64 << phys_bits) - 1;
    // (base, size): naturally aligned powers of two covering 0xB000_0000..0x1_0000_0000.
    let uncached: [(u64, u64); 2] = [(0xB000_0000, 0x1000_0000), (0xC000_0000, 0x4000_0000)];
    if vcnt as usize >= uncached.len() {
        for (i, (base, size)) in (0u32..).zip(uncached) {
            let mask = !(size - 1) & addr_mask & !0xFFF;
            // SAFETY: MTRR pair i < VCNT exists; base/mask are page-aligned and within
            // MAXPHYADDR; MTRRs are still disabled, so nothing changes until DEF_TYPE is written.
            unsafe { wrmsr(IA32_MTRR_PHYSBASE0 + 2 * i, base | MEMTYPE_UC) };
            // SAFETY: as above; bit 11 is the valid bit.
            unsafe { wrmsr(IA32_MTRR_PHYSBASE0 + 2 * i + 1, mask | (1 << 11)) };
        }
    }
    x86_64::instructions::interrupts::without_interrupts(|| {
        // SAFETY: write back and invalidate caches around the memory-type change, as the SDM's
        // MTRR update procedure asks; no other CPU runs.
        unsafe { core::arch::asm!("wbinvd", options(nostack, preserves_flags)) };
        // SAFETY: enables MTRRs (fixed ranges stay disabled) with write-back default type.
        unsafe { wrmsr(IA32_MTRR_DEF_TYPE, MTRR_ENABLE | MEMTYPE_WB) };
        // SAFETY: as above.
        unsafe { core::arch::asm!("wbinvd", options(nostack, preserves_flags)) };
    });
    MtrrSetup::Enabled
}
