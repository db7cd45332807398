//! Fuzzes the CONNECT head parser: it must never panic, and what it accepts must be a
//! CONNECT with a valid target whose leftover is a suffix of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veilgate::connect::{Parsed, parse_head};
use veilgate::target::Target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Complete(req)) = parse_head(data) {
        assert!(data.ends_with(&req.leftover));
        assert!(req.target.port != 0);
        // The target's own rendering parses back to the same target.
        assert_eq!(Target::parse(&req.target.to_string()).as_ref(), Ok(&req.target));
    }
});
