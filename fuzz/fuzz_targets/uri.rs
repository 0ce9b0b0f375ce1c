//! Resource URI normalisation: any string normalises or is refused; the normal form is stable
//! and holds no dot segment in its path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reflow_common::uri::normalize;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(normal) = normalize(&text) {
        assert_eq!(normalize(&normal).as_deref(), Ok(normal.as_str()), "not idempotent: {text:?}");
    }
});
