//! The control queue under a hostile driver: well-framed commands with any opcode, payload,
//! reserved field and reply area, beside raw chains and ring damage.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdaq_fuzz::{memory, run_program, Input, Rig};

fuzz_target!(|data: &[u8]| {
    let mem = memory();
    let mut input = Input::new(data);
    let mut rig = Rig::new(&mem, &mut input);
    // A run of commands first, then the generic program (mostly on controlq).
    let commands = input.u8() % 16;
    for _ in 0..commands {
        let opcode = u32::from(input.u8() % 10);
        let reserved = if input.u8() & 1 != 0 { input.u32() } else { 0 };
        let payload_len = usize::from(input.u8() % 48);
        let payload = input.take(payload_len).to_vec();
        let reply_len = u32::from(input.u8());
        rig.command(opcode, reserved, &payload, reply_len);
        rig.check();
    }
    run_program(&mut rig, &mut input, usize::from(vdaq_wire::queue::CONTROL));
});
