//! Interrupts: the IDT (the `x86_64` crate's table type), one small assembly stub per vector
//! that saves all general registers and calls one Rust dispatcher, per-vector handler and count
//! tables, LAPIC EOI, and fatal reporting of CPU exceptions.
//!
//! The stubs are hand-rolled: the `extern "x86-interrupt"` ABI the `x86_64` crate builds on is
//! nightly-only, and a uniform stub that passes the vector number lets one dispatcher serve all
//! 256 vectors.

use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use spin::Once;
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::VirtAddr;

use super::{apic, cpu, ioapic};

/// The LAPIC spurious-interrupt vector (reserved: no handler, no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xFF;
/// First vector available to [`set_handler`] (0..=31 are CPU exceptions).
pub const FIRST_VECTOR: u8 = 32;
/// Last vector available to [`set_handler`].
pub const LAST_VECTOR: u8 = 254;

static HANDLERS: [AtomicPtr<()>; 256] = [const { AtomicPtr::new(core::ptr::null_mut()) }; 256];
static COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
/// The IOAPIC input routed to each vector (`NO_GSI` if none), so an unhandled level-triggered
/// line can be masked instead of storming.
static ROUTED_GSI: [AtomicU32; 256] = [const { AtomicU32::new(NO_GSI) }; 256];
const NO_GSI: u32 = u32::MAX;

static IDT: Once<InterruptDescriptorTable> = Once::new();

// Vectors whose exception pushes an error code: 8, 10–14, 17, 21, 29, 30.
const ERROR_CODE_VECTORS: u32 = 0x6022_7D00;

core::arch::global_asm!(
    r#"
    .section .text.vdaq_isr, "ax", @progbits
    .balign 16
    .global vdaq_isr_table
vdaq_isr_table:
    .set vdaq_vec, 0
    .rept 256
    .balign 16
    .if (vdaq_vec < 32) && ((({err} >> (vdaq_vec & 31)) & 1) != 0)
    .else
    push 0
    .endif
    push vdaq_vec
    jmp vdaq_isr_common
    .set vdaq_vec, vdaq_vec + 1
    .endr

vdaq_isr_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    mov rbp, rsp
    and rsp, -16
    cld
    call {dispatch}
    mov rsp, rbp
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq
    .text
    "#,
    err = const ERROR_CODE_VECTORS,
    dispatch = sym dispatch,
);

/// Stub stride in `vdaq_isr_table`.
const STUB_SIZE: u64 = 16;

/// Registers as the stubs leave them on the stack.
#[repr(C)]
#[derive(Debug)]
struct TrapFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

extern "C" fn dispatch(frame: &mut TrapFrame) {
    // Vectors ≥ 128 were pushed as sign-extended imm8/imm32.
    let vector = (frame.vector & 0xFF) as u8;
    if vector < FIRST_VECTOR {
        exception(vector, frame);
    }
    COUNTS[usize::from(vector)].fetch_add(1, Ordering::Relaxed);
    if vector == SPURIOUS_VECTOR {
        // Spurious interrupts must not be acknowledged.
        return;
    }
    let handler = HANDLERS[usize::from(vector)].load(Ordering::Acquire);
    if handler.is_null() {
        let gsi = ROUTED_GSI[usize::from(vector)].load(Ordering::Relaxed);
        if gsi != NO_GSI {
            ioapic::mask(gsi, true);
            crate::println!("arch: no handler for vector {vector} (GSI {gsi}); GSI masked");
        }
    } else {
        // SAFETY: only `set_handler` stores into HANDLERS, and it stores `fn()` pointers.
        let handler = unsafe { core::mem::transmute::<*mut (), fn()>(handler) };
        handler();
    }
    apic::eoi();
}

const EXCEPTION_NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range exceeded",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor segment overrun",
    "invalid TSS",
    "segment not present",
    "stack-segment fault",
    "general protection fault",
    "page fault",
    "reserved",
    "x87 floating-point",
    "alignment check",
    "machine check",
    "SIMD floating-point",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

fn exception(vector: u8, f: &TrapFrame) -> ! {
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    super::serial::emergency_print(format_args!(
        "\nEXCEPTION {vector} ({}), error code {:#x}\n\
         rip {:#018x} cs {:#x} rflags {:#x} rsp {:#018x} ss {:#x} cr2 {cr2:#x}\n\
         rax {:#018x} rbx {:#018x} rcx {:#018x} rdx {:#018x}\n\
         rsi {:#018x} rdi {:#018x} rbp {:#018x} r8  {:#018x}\n\
         r9  {:#018x} r10 {:#018x} r11 {:#018x} r12 {:#018x}\n\
         r13 {:#018x} r14 {:#018x} r15 {:#018x}\n",
        EXCEPTION_NAMES[usize::from(vector)],
        f.error_code,
        f.rip,
        f.cs,
        f.rflags,
        f.rsp,
        f.ss,
        f.rax,
        f.rbx,
        f.rcx,
        f.rdx,
        f.rsi,
        f.rdi,
        f.rbp,
        f.r8,
        f.r9,
        f.r10,
        f.r11,
        f.r12,
        f.r13,
        f.r14,
        f.r15,
    ));
    if super::boot::stack_guard().contains(&cr2) {
        super::serial::emergency_print(format_args!(
            "(CR2 is in the stack guard page: stack overflow)\n"
        ));
    }
    super::exit(super::PANIC_EXIT_CODE)
}

/// Builds and loads the IDT, enables the LAPIC and masks the 8259s. Interrupts stay disabled.
pub(super) fn init() {
    extern "C" {
        static vdaq_isr_table: u8;
    }
    let table = VirtAddr::from_ptr(&raw const vdaq_isr_table).as_u64();
    let stub = |vector: u8| VirtAddr::new(table + STUB_SIZE * u64::from(vector));
    let idt = IDT.call_once(|| {
        let mut idt = InterruptDescriptorTable::new();
        for vector in [0u8, 1, 2, 3, 4, 5, 6, 7, 9, 16, 19, 20, 28]
            .into_iter()
            .chain(FIRST_VECTOR..=u8::MAX)
        {
            // SAFETY: the stub at this address saves the registers, pushes the vector (and a
            // dummy error code, since these vectors push none) and returns with iretq.
            unsafe { idt[vector].set_handler_addr(stub(vector)) };
        }
        macro_rules! with_error_code {
            ($($field:ident = $vector:expr),* $(,)?) => {$(
                // SAFETY: the stub for this vector leaves the CPU-pushed error code in place,
                // so the frame layout is the same as for the other vectors.
                unsafe { idt.$field.set_handler_addr(stub($vector)) };
            )*};
        }
        with_error_code!(
            invalid_tss = 10,
            segment_not_present = 11,
            stack_segment_fault = 12,
            general_protection_fault = 13,
            page_fault = 14,
            alignment_check = 17,
            cp_protection_exception = 21,
            vmm_communication_exception = 29,
            security_exception = 30,
        );
        // SAFETY: the machine-check stub pushes a dummy error code; the handler never returns.
        unsafe { idt.machine_check.set_handler_addr(stub(18)) };
        // SAFETY: as for the other error-code vectors; the handler never returns.
        let double_fault = unsafe { idt.double_fault.set_handler_addr(stub(8)) };
        // SAFETY: IST slot DOUBLE_FAULT_IST of the loaded TSS points to a dedicated stack, so a
        // double fault caused by a stack overflow still has a stack to report on.
        unsafe { double_fault.set_stack_index(cpu::DOUBLE_FAULT_IST) };
        idt
    });
    idt.load();
    apic::init(SPURIOUS_VECTOR);
}

/// Installs `handler` for `vector` (32..=254), replacing any previous one. It runs in interrupt
/// context (interrupts disabled, on the interrupted stack); the LAPIC EOI is sent after it
/// returns.
///
/// # Panics
/// If `vector` is outside 32..=254.
pub fn set_handler(vector: u8, handler: fn()) {
    assert!(
        (FIRST_VECTOR..=LAST_VECTOR).contains(&vector),
        "vector {vector} is not in {FIRST_VECTOR}..={LAST_VECTOR}"
    );
    HANDLERS[usize::from(vector)].store(handler as *mut (), Ordering::Release);
}

/// Removes the handler of `vector`; its interrupts are then only counted (and acknowledged).
pub fn clear_handler(vector: u8) {
    HANDLERS[usize::from(vector)].store(core::ptr::null_mut(), Ordering::Release);
}

/// Records which IOAPIC input feeds `vector` (see `ROUTED_GSI`).
pub(super) fn note_route(vector: u8, gsi: u32) {
    for slot in &ROUTED_GSI {
        let _ = slot.compare_exchange(gsi, NO_GSI, Ordering::Relaxed, Ordering::Relaxed);
    }
    ROUTED_GSI[usize::from(vector)].store(gsi, Ordering::Relaxed);
}

/// Enables interrupts (`sti`).
pub fn enable() {
    x86_64::instructions::interrupts::enable();
}

/// Disables interrupts (`cli`).
pub fn disable() {
    x86_64::instructions::interrupts::disable();
}

/// Whether interrupts are enabled.
pub fn are_enabled() -> bool {
    x86_64::instructions::interrupts::are_enabled()
}

/// Enables interrupts and halts in one step (`sti; hlt`: the interrupt shadow of `sti` closes
/// the lost-wakeup window). Returns after an interrupt was handled, with interrupts enabled.
///
/// Typical use: `loop { interrupts::disable(); if done() { break } interrupts::wait_for_interrupt() }`.
pub fn wait_for_interrupt() {
    x86_64::instructions::interrupts::enable_and_hlt();
}

/// Runs `f` with interrupts disabled, restoring the previous state afterwards.
pub fn without_interrupts<R>(f: impl FnOnce() -> R) -> R {
    x86_64::instructions::interrupts::without_interrupts(f)
}

/// This CPU's local APIC ID, for MSI/MSI-X addresses: `0xFEE0_0000 | (lapic_id() << 12)`.
pub fn lapic_id() -> u32 {
    apic::id()
}

/// Interrupts taken on `vector` since boot (vector 255 counts spurious interrupts).
pub fn count(vector: u8) -> u64 {
    COUNTS[usize::from(vector)].load(Ordering::Relaxed)
}
