#![no_main]
//! Our JSON layout format → layout → every strategy, and back through `to_json`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(layout) = iovatrack::layout::json::parse(&text) {
        iovatrack_fuzz::plan_all(&layout);
        // What we print we must read back as the same layout.
        let again = iovatrack::layout::json::to_json(&layout).to_string();
        let back = iovatrack::layout::json::parse(&again).expect("to_json output re-parses");
        assert_eq!(back, layout, "JSON round trip changed the layout");
    }
});
