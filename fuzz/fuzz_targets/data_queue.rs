//! The data queue (and the others beside it) under a hostile driver: descriptor chains,
//! ring indices and guest memory as the fuzzer writes them, kicks and clock ticks in any order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdaq_fuzz::{memory, run_program, Input, Rig};

fuzz_target!(|data: &[u8]| {
    let mem = memory();
    let mut input = Input::new(data);
    let mut rig = Rig::new(&mem, &mut input);
    // Most operations go to dataq; a START first, so that frames flow into what is posted.
    rig.start();
    run_program(&mut rig, &mut input, usize::from(vdaq_wire::queue::DATA));
});
