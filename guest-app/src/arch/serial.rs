//! COM1 console (0x3f8) through the `uart_16550` crate, plus what the crate leaves to us: a
//! lock that is safe from interrupt context (interrupts are off while it is held, and this is
//! a single-CPU guest, so a handler can never spin on a lock its own CPU holds), `\n` → `\r\n`,
//! the `print!`/`println!` macros, and a last-resort path for the panic handler.

use core::fmt::{self, Write};

use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::{BaudRate, Config, Uart16550};

const COM1: u16 = 0x3f8;

static PORT: Mutex<Option<Uart16550<PioBackend>>> = Mutex::new(None);

fn open() -> Option<Uart16550<PioBackend>> {
    // SAFETY: 0x3f8 is COM1 on every PC-compatible machine QEMU builds (q35, microvm with its
    // default isa-serial); only this module drives it.
    let mut uart = unsafe { Uart16550::new_port(COM1) }.ok()?;
    let config = Config {
        baud_rate: BaudRate::Baud115200,
        ..Config::DEFAULT
    };
    uart.init(config).ok()?;
    Some(uart)
}

/// Initialises COM1. Output before this (or without a UART) is dropped.
pub(super) fn init() {
    let uart = open();
    x86_64::instructions::interrupts::without_interrupts(|| *PORT.lock() = uart);
}

/// Sends `bytes`, turning each `\n` into `\r\n`.
fn send(uart: &mut Uart16550<PioBackend>, bytes: &[u8]) {
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            uart.send_bytes_exact(b"\r\n");
        }
        uart.send_bytes_exact(line);
    }
}

struct Writer<'a>(&'a mut Uart16550<PioBackend>);

impl Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        send(self.0, s.as_bytes());
        Ok(())
    }
}

/// Writes `s` to COM1. Safe to call from interrupt handlers.
pub fn write_str(s: &str) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        if let Some(uart) = PORT.lock().as_mut() {
            send(uart, s.as_bytes());
        }
    });
}

/// Backend of `print!`/`println!`. Safe to call from interrupt handlers.
#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        if let Some(uart) = PORT.lock().as_mut() {
            // Writer never fails; a Display impl that errors just truncates its own output.
            let _ = Writer(uart).write_fmt(args);
        }
    });
}

/// Prints for the panic/exception path: takes the lock even if the dying code held it
/// (interrupts are off and there is one CPU, so the holder never runs again).
pub(super) fn emergency_print(args: fmt::Arguments<'_>) {
    x86_64::instructions::interrupts::disable();
    if PORT.is_locked() {
        // SAFETY: see above — the holder was interrupted by the fault/panic and will never
        // resume, so nobody else uses the UART any more.
        unsafe { PORT.force_unlock() };
    }
    let mut port = PORT.lock();
    if port.is_none() {
        *port = open();
    }
    if let Some(uart) = port.as_mut() {
        let _ = Writer(uart).write_fmt(args);
    }
}

/// Prints to COM1 (usable from interrupt handlers).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::arch::serial::_print(::core::format_args!($($arg)*))
    };
}

/// Prints a line to COM1 (usable from interrupt handlers). Lines end in `\r\n` on the wire.
#[macro_export]
macro_rules! println {
    () => {
        $crate::arch::serial::write_str("\n")
    };
    ($($arg:tt)*) => {
        $crate::arch::serial::_print(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}
