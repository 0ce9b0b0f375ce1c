//! Config loading: any text loads or fails with an error naming a key, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reflow_common::config::Config;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let env = [("VAR".to_string(), "value".to_string())].into_iter().collect();
    if let Err(error) = Config::from_yaml(&text, &env) {
        assert!(!error.key.is_empty());
    }
});
