//! Every file source (`.vdaqrec` recordings, WAV, CSV, raw), from a user's file: an error or
//! samples, never a panic; a loaded source renders any frame in any format.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdaq_wire::SampleFormat;
use vhost_device_daq::model::source::FileSource;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let extension = ["vdaqrec", "wav", "csv", "raw"][usize::from(selector & 3)];
    let format =
        [SampleFormat::S16, SampleFormat::S32, SampleFormat::F32][usize::from((selector >> 2) % 3)];
    let channels = u16::from(selector >> 4) + 1;
    if let Ok(source) = FileSource::parse("fuzz", extension, bytes, format, channels) {
        assert!(source.frames() > 0, "a loaded source has a frame");
        let mut out = vec![0u8; 4 * 4 * usize::from(channels)];
        for first in [0, 1, source.frames() - 1, source.frames(), u64::MAX / 2] {
            source.render(format, first, &mut out);
        }
    }
});
