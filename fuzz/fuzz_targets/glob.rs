//! Policy patterns: any pattern is accepted or refused, and matching any name terminates
//! without a panic; a pattern without wildcards matches exactly itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reflow_common::glob::Glob;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (pattern, name) = text.split_once('\n').unwrap_or((&text, ""));
    if let Ok(glob) = Glob::new(pattern) {
        let _ = glob.matches(name);
        if !pattern.contains(['*', '?', '\\']) {
            assert_eq!(glob.matches(name), pattern == name);
        }
    }
});
