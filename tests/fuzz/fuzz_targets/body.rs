//! Fuzz target: JSON body, query string and path segment parsing never panic.
#![no_main]

use cosmopoints::input::{decode_component, query, Fields};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut fields) = Fields::parse(data, &["programId", "value", "bonus"]) {
        let _ = fields.required_string("programId");
        let _ = fields.required_integer("value", 1, 1_000_000_000_000);
        let _ = fields.boolean("bonus");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = query(Some(text), &["startDate", "endDate", "programId"]);
        let _ = decode_component(text, false);
    }
});
