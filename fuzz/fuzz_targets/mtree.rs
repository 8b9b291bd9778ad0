#![no_main]
//! `info mtree -f` text → layout → every strategy.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(layout) = iovatrack::layout::mtree::parse(&text, "memory") {
        iovatrack_fuzz::plan_all(&layout);
    }
    // The format sniffer must not panic either.
    let _ = iovatrack::layout::parse_any(&text, None);
});
