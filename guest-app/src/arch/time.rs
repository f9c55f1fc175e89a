//! Time: a monotonic nanosecond clock from the TSC, busy-wait delays, and the LAPIC timer in
//! periodic mode.
//!
//! The TSC and LAPIC-timer frequencies come from the hypervisor's timing leaf (CPUID
//! 0x4000_0010: TSC and APIC-bus kHz) when it is offered, else from calibration against the
//! i8254 PIT, read by polling channel 0 — q35 and microvm (pit=auto, the default) both have it,
//! and channel 0 needs no port 0x61 gate (which microvm lacks, having no PC speaker). Each PIT
//! read is bracketed by two TSC reads and the tightest of several samples is kept at both ends
//! of a 10 ms window, so slow (trapping) port I/O barely affects the result. Hand-rolled: no
//! crate does TSC calibration for a bare-metal guest.

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use x86_64::instructions::port::Port;

use super::apic;
use super::boot::BOOT_TSC;
use super::cpu::{cpuid, rdtsc};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// Nanoseconds per TSC tick, as a 32.32 fixed-point number.
static NS_PER_TICK_FP32: AtomicU64 = AtomicU64::new(0);
/// LAPIC timer input frequency with divide-by-1.
static LAPIC_HZ: AtomicU64 = AtomicU64::new(0);
static SOURCE: AtomicU8 = AtomicU8::new(0);

/// Where the TSC and LAPIC timer frequencies came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockSource {
    /// Not initialised yet.
    None,
    /// CPUID leaf 0x4000_0010 (hypervisor-provided TSC and APIC-bus frequencies).
    HypervisorLeaf,
    /// Measured against the i8254 PIT (channel 0, 1.193182 MHz).
    Pit,
}

impl ClockSource {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::HypervisorLeaf,
            2 => Self::Pit,
            _ => Self::None,
        }
    }
}

const PIT_HZ: u64 = 1_193_182;
const CALIBRATION_WINDOW_TICKS: u64 = PIT_HZ / 100; // 10 ms
const SAMPLES_PER_END: usize = 8;

/// Nanoseconds since the guest's first instruction (monotonic, TSC-based).
pub fn now_ns() -> u64 {
    let ticks = rdtsc().wrapping_sub(BOOT_TSC.load(Ordering::Relaxed));
    ticks_to_ns(ticks)
}

fn ticks_to_ns(ticks: u64) -> u64 {
    let fp = NS_PER_TICK_FP32.load(Ordering::Relaxed);
    ((u128::from(ticks) * u128::from(fp)) >> 32) as u64
}

/// Busy-waits at least `us` microseconds (interrupts keep being served if enabled).
pub fn delay_us(us: u64) {
    let hz = TSC_HZ.load(Ordering::Relaxed);
    assert_ne!(hz, 0, "time used before arch init");
    let ticks = (u128::from(us) * u128::from(hz) / 1_000_000) as u64;
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
}

/// TSC frequency in Hz.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// LAPIC timer input frequency (divide-by-1) in Hz.
pub fn lapic_timer_hz() -> u64 {
    LAPIC_HZ.load(Ordering::Relaxed)
}

/// How the frequencies were obtained.
pub fn clock_source() -> ClockSource {
    ClockSource::from_u8(SOURCE.load(Ordering::Relaxed))
}

/// Starts the LAPIC timer in periodic mode: an interrupt on `vector` every `period_us`
/// microseconds (install the handler with `interrupts::set_handler` first; interrupts are
/// counted per vector anyway). Replaces a running periodic timer.
///
/// # Panics
/// If `vector` is outside 32..=254 or `period_us` is 0.
pub fn start_periodic_timer(vector: u8, period_us: u32) {
    assert!(
        (super::interrupts::FIRST_VECTOR..=super::interrupts::LAST_VECTOR).contains(&vector),
        "vector {vector} is not usable for the timer"
    );
    assert!(period_us > 0, "timer period must be positive");
    let hz = LAPIC_HZ.load(Ordering::Relaxed);
    assert_ne!(hz, 0, "time used before arch init");
    let ticks = u64::from(period_us) * hz / 1_000_000;
    // Divide configuration encodings for 1, 2, 4, …, 128 (bits 3, 1, 0 of the DCR).
    const DIVIDE: [u32; 8] = [
        0b1011, 0b0000, 0b0001, 0b0010, 0b0011, 0b1000, 0b1001, 0b1010,
    ];
    let (shift, count) = (0..8u32)
        .map(|shift| (shift, ticks >> shift))
        .find(|&(_, count)| count <= u64::from(u32::MAX))
        .unwrap_or((7, u64::from(u32::MAX)));
    super::interrupts::without_interrupts(|| {
        apic::write(apic::REG_LVT_TIMER, apic::LVT_MASKED);
        apic::write(apic::REG_TIMER_INITIAL, 0);
        apic::write(apic::REG_TIMER_DIVIDE, DIVIDE[shift as usize]);
        apic::write(
            apic::REG_LVT_TIMER,
            u32::from(vector) | apic::LVT_TIMER_PERIODIC,
        );
        apic::write(apic::REG_TIMER_INITIAL, count.max(1) as u32);
    });
}

/// Stops the LAPIC timer (masks it; a pending interrupt may still be delivered once).
pub fn stop_periodic_timer() {
    super::interrupts::without_interrupts(|| {
        apic::write(apic::REG_LVT_TIMER, apic::LVT_MASKED);
        apic::write(apic::REG_TIMER_INITIAL, 0);
    });
}

fn set_frequencies(tsc_hz: u64, lapic_hz: u64, source: ClockSource) {
    assert!(tsc_hz > 0 && lapic_hz > 0, "bad clock calibration");
    TSC_HZ.store(tsc_hz, Ordering::Relaxed);
    NS_PER_TICK_FP32.store(
        ((1_000_000_000u128 << 32) / u128::from(tsc_hz)) as u64,
        Ordering::Relaxed,
    );
    LAPIC_HZ.store(lapic_hz, Ordering::Relaxed);
    SOURCE.store(source as u8, Ordering::Relaxed);
}

/// Determines the TSC and LAPIC timer frequencies. Interrupts must be disabled.
pub(super) fn init() {
    if let Some((tsc_khz, bus_khz)) = hypervisor_timing_leaf() {
        set_frequencies(tsc_khz * 1000, bus_khz * 1000, ClockSource::HypervisorLeaf);
        return;
    }
    let (tsc_hz, lapic_hz) = calibrate_with_pit();
    set_frequencies(tsc_hz, lapic_hz, ClockSource::Pit);
}

/// CPUID 0x4000_0010 (VMware-style timing leaf, offered by QEMU/KVM when the TSC frequency
/// is known and invariant): EAX = TSC kHz, EBX = APIC bus kHz.
fn hypervisor_timing_leaf() -> Option<(u64, u64)> {
    const HYPERVISOR_PRESENT: u32 = 1 << 31;
    if cpuid(1, 0).ecx & HYPERVISOR_PRESENT == 0 || cpuid(0x4000_0000, 0).eax < 0x4000_0010 {
        return None;
    }
    let leaf = cpuid(0x4000_0010, 0);
    (leaf.eax != 0 && leaf.ebx != 0).then_some((u64::from(leaf.eax), u64::from(leaf.ebx)))
}

/// One bracketed reading: PIT ticks so far (accumulated across wraps), the TSC at the middle
/// of the PIT read and the read's width; the same for the LAPIC current count.
#[derive(Clone, Copy)]
struct Sample {
    pit_ticks: u64,
    pit_tsc: u64,
    pit_width: u64,
    lapic_count: u32,
    lapic_tsc: u64,
}

struct PitReader {
    last: u16,
    ticks: u64,
    control: Port<u8>,
    channel0: Port<u8>,
}

impl PitReader {
    fn raw(&mut self) -> u16 {
        // SAFETY: 0x43 is the PIT mode/command port; 0x00 latches channel 0's count.
        unsafe { self.control.write(0x00) };
        // SAFETY: 0x40 is channel 0's data port; low byte then high byte of the latch.
        let lo = unsafe { self.channel0.read() };
        // SAFETY: as above.
        let hi = unsafe { self.channel0.read() };
        u16::from_le_bytes([lo, hi])
    }

    fn sample(&mut self) -> Sample {
        let t0 = rdtsc();
        let count = self.raw();
        let t1 = rdtsc();
        // Mode 2 counts down modulo 65536; reads are far less than a wrap (55 ms) apart.
        self.ticks += u64::from(self.last.wrapping_sub(count));
        self.last = count;
        let l0 = rdtsc();
        let lapic_count = apic::read(apic::REG_TIMER_CURRENT);
        let l1 = rdtsc();
        Sample {
            pit_ticks: self.ticks,
            pit_tsc: t0 + (t1 - t0) / 2,
            pit_width: t1 - t0,
            lapic_count,
            lapic_tsc: l0 + (l1 - l0) / 2,
        }
    }

    fn tightest(&mut self) -> Sample {
        let mut best = self.sample();
        for _ in 1..SAMPLES_PER_END {
            let s = self.sample();
            if s.pit_width < best.pit_width {
                best = s;
            }
        }
        best
    }
}

fn calibrate_with_pit() -> (u64, u64) {
    let mut control: Port<u8> = Port::new(0x43);
    let mut channel0: Port<u8> = Port::new(0x40);
    // SAFETY: PIT channel 0, lobyte/hibyte access, mode 2 (rate generator), binary; reload 0
    // (= 65536). Its IRQ 0 is masked at the 8259 and the IOAPIC, so nothing fires.
    unsafe { control.write(0x34) };
    // SAFETY: reload value, low byte then high byte.
    unsafe { channel0.write(0) };
    // SAFETY: as above.
    unsafe { channel0.write(0) };
    // LAPIC timer free-running from 0xFFFF_FFFF at divide-by-1, masked.
    apic::write(apic::REG_LVT_TIMER, apic::LVT_MASKED);
    apic::write(apic::REG_TIMER_DIVIDE, 0b1011);
    apic::write(apic::REG_TIMER_INITIAL, u32::MAX);

    let mut pit = PitReader {
        last: 0,
        ticks: 0,
        control,
        channel0,
    };
    // Wait for the counter to move at all (it ticks every 0.84 µs): proves the PIT exists.
    // Bounded by TSC ticks — 2·10⁸ is at most 0.2 s for any TSC of 1 GHz or more.
    let first = pit.raw();
    let since = rdtsc();
    let mut moved = false;
    while rdtsc() - since < 200_000_000 {
        if pit.raw() != first {
            moved = true;
            break;
        }
    }
    assert!(
        moved,
        "no i8254 PIT to calibrate the TSC against (and no CPUID 0x40000010)"
    );
    pit.last = pit.raw();
    // Warm-up pass: the first execution of this code is slow under TCG (translation), which
    // would widen the start brackets (the end ones then run warm code).
    let _ = pit.tightest();
    let start = pit.tightest();
    while pit.sample().pit_ticks - start.pit_ticks < CALIBRATION_WINDOW_TICKS {}
    let end = pit.tightest();

    let tsc_hz = (u128::from(end.pit_tsc - start.pit_tsc) * u128::from(PIT_HZ)
        / u128::from(end.pit_ticks - start.pit_ticks)) as u64;
    let lapic_ticks = u128::from(start.lapic_count - end.lapic_count);
    let lapic_hz =
        (lapic_ticks * u128::from(tsc_hz) / u128::from(end.lapic_tsc - start.lapic_tsc)) as u64;

    // Leave channel 0 in mode 0 (one-shot), so it stops generating IRQ 0 edges.
    // SAFETY: channel 0, lobyte/hibyte, mode 0; count 1 expires at once and then stays quiet.
    unsafe { pit.control.write(0x30) };
    // SAFETY: count low byte, then high byte.
    unsafe { pit.channel0.write(1) };
    // SAFETY: as above.
    unsafe { pit.channel0.write(0) };
    apic::write(apic::REG_TIMER_INITIAL, 0);
    (tsc_hz, lapic_hz)
}
