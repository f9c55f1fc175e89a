//! The control socket's JSON lines (from any local user): each gets a reply, never a panic,
//! with a live device behind the socket so that every command reaches it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_device_daq::control::handle;

fuzz_target!(|data: &[u8]| {
    let slot = vdaq_fuzz::device_slot();
    for line in String::from_utf8_lossy(data).lines().take(16) {
        let reply = handle(line, &slot);
        assert!(reply.get("ok").is_some_and(|ok| ok.is_boolean()), "{reply}");
    }
});
