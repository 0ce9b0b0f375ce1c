//! Resource URI normalisation: any string normalises or is refused; the normal form is stable
//! and holds no dot segment in its path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reflow_common::uri::normalize;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(normal) = normalize(&text) {
        assert_eq!(normalize(&normal).as_deref(), Ok(normal.as_str()), "not idempotent: {text:?}");
        let before_query = normal.split(['?', '#']).next().unwrap_or_default();
        // The path: after the scheme and the authority.
        let rest = match before_query.split_once(':') {
            Some((scheme, rest))
                if scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                    && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
            {
                rest
            }
            _ => before_query,
        };
        let path = rest.strip_prefix("//").map_or(rest, |r| r.find('/').map_or("", |at| &r[at..]));
        assert!(path.split('/').all(|segment| segment != "." && segment != ".."), "a dot segment in {normal:?}");
    }
});
