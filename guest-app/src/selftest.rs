//! Self-test of the arch layer (`vdaq.selftest` on the command line): timer calibration,
//! periodic timer, IOAPIC routing (RTC, and a virtio-mmio device when present), heap, and the
//! exception reports (`vdaq.test_panic`, `vdaq.test_fault`, `vdaq.test_overflow`).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::{self, interrupts, ioapic, time};
use crate::println;

const TIMER_VECTOR: u8 = 0x40;
const TEST_VECTOR: u8 = 0x41;
const TICKS: u64 = 50;

static TICKS_SEEN: AtomicU64 = AtomicU64::new(0);

fn on_tick() {
    TICKS_SEEN.fetch_add(1, Ordering::Relaxed);
}

fn on_test_line() {}

const RTC_VECTOR: u8 = 0x42;

fn cmos_read(reg: u8) -> u8 {
    let mut index: x86_64::instructions::port::Port<u8> =
        x86_64::instructions::port::Port::new(0x70);
    let mut data: x86_64::instructions::port::Port<u8> =
        x86_64::instructions::port::Port::new(0x71);
    // SAFETY: CMOS/RTC index and data ports; bit 7 set keeps NMIs disabled.
    unsafe { index.write(0x80 | reg) };
    // SAFETY: as above.
    unsafe { data.read() }
}

fn cmos_write(reg: u8, value: u8) {
    let mut index: x86_64::instructions::port::Port<u8> =
        x86_64::instructions::port::Port::new(0x70);
    let mut data: x86_64::instructions::port::Port<u8> =
        x86_64::instructions::port::Port::new(0x71);
    // SAFETY: CMOS/RTC index and data ports; bit 7 set keeps NMIs disabled.
    unsafe { index.write(0x80 | reg) };
    // SAFETY: as above; the caller writes RTC control registers only.
    unsafe { data.write(value) };
}

/// RTC periodic interrupt: acknowledge by reading register C.
fn on_rtc() {
    let _ = cmos_read(0x0C);
}

/// End-to-end IOAPIC test with a real device: the RTC's periodic interrupt on ISA IRQ 8.
fn rtc_test() {
    if cmos_read(0x0A) == 0xFF {
        println!("skip RTC IOAPIC test: no RTC");
        return;
    }
    interrupts::set_handler(RTC_VECTOR, on_rtc);
    let gsi = 8;
    ioapic::route(gsi, RTC_VECTOR, false, false);
    interrupts::without_interrupts(|| {
        cmos_write(0x0A, (cmos_read(0x0A) & 0xF0) | 0x06); // 1024 Hz
        cmos_write(0x0B, cmos_read(0x0B) | 0x40); // periodic interrupt enable
        let _ = cmos_read(0x0C);
    });
    let start = time::now_ns();
    while interrupts::count(RTC_VECTOR) < 20 && time::now_ns() - start < 1_000_000_000 {
        interrupts::wait_for_interrupt();
    }
    cmos_write(0x0B, cmos_read(0x0B) & !0x40);
    ioapic::mask(gsi, true);
    let n = interrupts::count(RTC_VECTOR);
    println!(
        "rtc: {n} interrupts via IOAPIC GSI {gsi} in {} us",
        (time::now_ns() - start) / 1000
    );
    check(
        n >= 20,
        "IOAPIC delivers a real device interrupt (RTC, GSI 8)",
    );
}

fn check(ok: bool, what: &str) {
    if ok {
        println!("ok   {what}");
    } else {
        println!("FAIL {what}");
        arch::exit(1);
    }
}

#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let buf = core::hint::black_box([depth; 512]);
    recurse(depth + 1) + buf[7]
}

const VIRTIO_VECTOR: u8 = 0x43;
static VIRTIO_BASE: AtomicU64 = AtomicU64::new(0);

fn mmio_r(addr: u64) -> u32 {
    // SAFETY: a virtio-mmio register in the uncached identity-mapped MMIO range.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn mmio_w(addr: u64, v: u32) {
    // SAFETY: a virtio-mmio register in the uncached identity-mapped MMIO range.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// Volatile store into the test's own ring page.
fn poke<T: Copy>(addr: u64, value: T) {
    // SAFETY: only called with addresses inside the page `virtio_mmio_irq_test` allocated,
    // naturally aligned for T.
    unsafe { (addr as *mut T).write_volatile(value) }
}

fn on_virtio() {
    let base = VIRTIO_BASE.load(Ordering::Relaxed);
    let isr = mmio_r(base + 0x60);
    mmio_w(base + 0x64, isr);
}

/// microvm only: finds a virtio-rng-device (virtio-mmio v2), posts one buffer and waits for
/// the used-buffer interrupt on the GSI the transport slot implies.
fn virtio_mmio_irq_test() {
    let Some(slot) = (0..24u64).find(|n| {
        let b = 0xFEB0_0000 + n * 0x200;
        mmio_r(b) == 0x7472_6976 && mmio_r(b + 8) == 4
    }) else {
        println!("skip virtio-mmio test: no virtio-rng-device");
        return;
    };
    let base = 0xFEB0_0000 + slot * 0x200;
    let two_ioapics = ioapic::units().count() > 1;
    let gsi = if two_ioapics {
        24 + slot as u32
    } else {
        5 + slot as u32
    };
    println!(
        "virtio-mmio: rng at {base:#x} (slot {slot}, version {}), expecting GSI {gsi}",
        mmio_r(base + 4)
    );
    VIRTIO_BASE.store(base, Ordering::Relaxed);
    interrupts::set_handler(VIRTIO_VECTOR, on_virtio);
    ioapic::route(gsi, VIRTIO_VECTOR, true, false);
    let layout = alloc::alloc::Layout::from_size_align(4096, 4096).expect("layout");
    // SAFETY: non-zero size; leaked on purpose (the device owns it until exit).
    let page = unsafe { alloc::alloc::alloc_zeroed(layout) } as u64;
    mmio_w(base + 0x70, 0);
    mmio_w(base + 0x70, 1 | 2);
    mmio_w(base + 0x24, 1);
    mmio_w(base + 0x20, 1); // VIRTIO_F_VERSION_1
    mmio_w(base + 0x24, 0);
    mmio_w(base + 0x20, 0);
    mmio_w(base + 0x70, 1 | 2 | 8);
    check(mmio_r(base + 0x70) & 8 != 0, "virtio FEATURES_OK");
    mmio_w(base + 0x30, 0);
    mmio_w(base + 0x38, 4);
    for (reg, addr) in [(0x80, page), (0x90, page + 0x100), (0xA0, page + 0x200)] {
        mmio_w(base + reg, addr as u32);
        mmio_w(base + reg + 4, (addr >> 32) as u32);
    }
    mmio_w(base + 0x44, 1);
    mmio_w(base + 0x70, 1 | 2 | 8 | 4);
    // Descriptor 0 = {addr, len 16, flags WRITE}; avail ring entry 0 = 0; then avail.idx = 1.
    let ring_writes: [(u64, u64, usize); 5] = [
        (page, page + 0x400, 8),
        (page + 8, 16, 4),
        (page + 12, 2, 2),
        (page + 0x104, 0, 2),
        (page + 0x102, 1, 2),
    ];
    for (addr, value, size) in ring_writes {
        match size {
            8 => poke::<u64>(addr, value),
            4 => poke::<u32>(addr, value as u32),
            _ => poke::<u16>(addr, value as u16),
        }
    }
    let start = time::now_ns();
    mmio_w(base + 0x50, 0);
    while interrupts::count(VIRTIO_VECTOR) == 0 && time::now_ns() - start < 1_000_000_000 {
        interrupts::wait_for_interrupt();
    }
    // SAFETY: used.idx of our ring.
    let used_idx = unsafe { ((page + 0x202) as *const u16).read_volatile() };
    println!(
        "virtio-mmio: {} interrupt(s) on GSI {gsi} (level, active-high), used.idx {used_idx}, after {} us",
        interrupts::count(VIRTIO_VECTOR),
        (time::now_ns() - start) / 1000
    );
    check(
        interrupts::count(VIRTIO_VECTOR) == 1 && used_idx == 1,
        "virtio-mmio used-buffer interrupt arrives on the expected GSI",
    );
    mmio_w(base + 0x70, 0);
    ioapic::mask(gsi, true);
}

/// Runs the self-test and exits.
pub fn run(info: &arch::BootInfo) -> ! {
    println!("cmdline: {:?}", info.cmdline);
    let has = |flag: &str| info.cmdline.split_whitespace().any(|a| a == flag);
    if has("vdaq.test_panic") {
        panic!("test panic requested");
    }
    if has("vdaq.test_fault") {
        // SAFETY: deliberately reads unmapped memory (above 4 GiB) to test the #PF report.
        let _ = unsafe { core::ptr::read_volatile(0x2_0000_0000 as *const u64) };
    }
    if has("vdaq.test_overflow") {
        recurse(0);
    }
    if has("vdaq.exit_now") {
        println!("exit_now at {} us since boot", time::now_ns() / 1000);
        arch::exit(0);
    }
    for r in info.memory_map {
        println!(
            "memory: {:#012x}..{:#012x} type {}",
            r.addr,
            r.end(),
            r.kind
        );
    }
    println!(
        "rsdp: {:x?}; cmdline at {:p}, memory map at {:p}",
        info.rsdp_addr,
        info.cmdline.as_ptr(),
        info.memory_map.as_ptr()
    );

    let t0 = time::now_ns();
    time::delay_us(100_000);
    let t1 = time::now_ns();
    let elapsed_us = (t1 - t0) / 1000;
    println!("delay_us(100000): now_ns {t0} -> {t1}, {elapsed_us} us");
    check((100_000..101_000).contains(&elapsed_us), "delay ~100 ms");

    interrupts::set_handler(TIMER_VECTOR, on_tick);
    let start = time::now_ns();
    time::start_periodic_timer(TIMER_VECTOR, 1000);
    loop {
        interrupts::disable();
        if TICKS_SEEN.load(Ordering::Relaxed) >= TICKS {
            break;
        }
        interrupts::wait_for_interrupt();
    }
    let elapsed = time::now_ns() - start;
    interrupts::enable();
    time::stop_periodic_timer();
    println!(
        "timer: {} ticks (count {}) in {} us",
        TICKS_SEEN.load(Ordering::Relaxed),
        interrupts::count(TIMER_VECTOR),
        elapsed / 1000
    );
    check(
        (49_000_000..52_000_000).contains(&elapsed),
        "50 ticks at 1 kHz take ~50 ms",
    );
    check(
        interrupts::count(TIMER_VECTOR) >= TICKS,
        "per-vector interrupt count",
    );

    // Exercise the IOAPIC: route GSI 9 (free on both machines) edge/high, mask it again.
    interrupts::set_handler(TEST_VECTOR, on_test_line);
    ioapic::route(9, TEST_VECTOR, false, false);
    ioapic::mask(9, true);
    ioapic::route(9, TEST_VECTOR, true, true);
    ioapic::mask(9, true);
    check(interrupts::count(TEST_VECTOR) == 0, "ioapic route/mask");
    rtc_test();
    virtio_mmio_irq_test();
    println!(
        "lapic id {} -> MSI address {:#x}",
        interrupts::lapic_id(),
        0xFEE0_0000u32 | (interrupts::lapic_id() << 12)
    );
    let flag = interrupts::without_interrupts(interrupts::are_enabled);
    check(!flag && interrupts::are_enabled(), "without_interrupts");

    let mut v: Vec<u64> = (0..100_000).collect();
    v.retain(|x| x % 3 == 0);
    let b = Box::new([0xA5u8; 4096]);
    let big: Vec<u8> = alloc::vec![1; 16 << 20];
    check(
        v.len() == 33_334 && b.iter().all(|&x| x == 0xA5) && big.len() == 16 << 20,
        "heap Vec/Box (16 MiB)",
    );
    drop(big);
    let aligned = alloc::alloc::Layout::from_size_align(8192, 4096).expect("layout");
    // SAFETY: the layout has non-zero size; the block is freed right away with the same layout.
    let p = unsafe { alloc::alloc::alloc_zeroed(aligned) };
    check(!p.is_null() && p as usize % 4096 == 0, "page-aligned alloc");
    // SAFETY: `p` came from alloc_zeroed with `aligned`.
    unsafe { alloc::alloc::dealloc(p, aligned) };

    println!("done at {} us since boot", time::now_ns() / 1000);
    arch::exit(0)
}
