//! The scenario TOML parser (a user's file): anything is an error or a scenario, never a
//! panic; a parsed scenario drives a card without panicking either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_device_daq::model::scenario::Scenario;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(scenario) = Scenario::parse(&text) {
        vdaq_fuzz::drive_scenario(scenario);
    }
});
