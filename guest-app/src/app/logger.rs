//! The driver's log on the serial console: warnings and errors (a violation the driver
//! detected, a recovery) go where the run's other messages go.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Console;

impl Log for Console {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= Level::Warn
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            crate::println!(
                "vdaq: {} {}: {}",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static CONSOLE: Console = Console;

/// Sends warnings and errors to the console (once; later calls change nothing).
pub fn init() {
    if log::set_logger(&CONSOLE).is_ok() {
        log::set_max_level(LevelFilter::Warn);
    }
}
