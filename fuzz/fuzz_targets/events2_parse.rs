//! The events2 parser on arbitrary input: it never panics, and a line it accepts prints back to a line
//! that parses to the same value (the printer and the parser agree).
#![no_main]
use drbd_reactor::drbd::events2::{parse_line, strip_ansi};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for raw in text.split('\n') {
        let clean = strip_ansi(raw);
        if let Ok(line) = parse_line(&clean) {
            let printed = line.to_string();
            let again = parse_line(&printed)
                .unwrap_or_else(|e| panic!("printed line does not parse: {printed:?}: {e:?}"));
            assert_eq!(line, again, "round trip changed the line {printed:?}");
        }
    }
});
