//! The one form of a resource URI that policies decide on and that upstreams receive.
//!
//! A policy allowing `file:///home/bob/*` must not admit `file:///home/bob/../alice/key` or
//! `file:///home/bob/%2e%2e/alice/key`: string prefixes are not paths. So before a decision,
//! a resource URI is normalised as RFC 3986 §6.2.2 describes, and the normalised URI is what
//! is forwarded, so the upstream acts on exactly what was decided:
//!
//! - scheme and host are lowercased; `file:/p` and `file://localhost/p` become `file:///p`;
//! - percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded (so `%2e`
//!   is a dot) and every other escape gets uppercase hex digits;
//! - dot segments are removed from the path (§5.2.4), so no `.` or `..` segment remains;
//! - a path holding an encoded `/` or `\` (`%2F`, `%5C`), a raw `\`, or an encoded NUL is
//!   refused: servers disagree on whether such a path crosses a directory, so no decision
//!   made on it would be safe; so is any URI with a control character.
//!
//! Query and fragment are kept as they are (apart from the hex case of their escapes).
//! Strings without a scheme are normalised as a bare path.

/// Why a resource URI cannot be decided on; safe to return to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UriError(pub &'static str);

impl std::fmt::Display for UriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for UriError {}

/// Longest resource URI examined.
pub const MAX_URI_LEN: usize = 8 * 1024;

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes escapes of unreserved characters and uppercases the others. With `path`, the
/// escapes that would make a path ambiguous are refused.
fn normalize_escapes(part: &str, path: bool) -> Result<String, UriError> {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let decoded = bytes.get(i + 1).and_then(|h| hex(*h)).zip(bytes.get(i + 2).and_then(|l| hex(*l)));
            let Some((high, low)) = decoded else {
                return Err(UriError("the URI has a malformed percent-escape"));
            };
            let value = high << 4 | low;
            if path && matches!(value, b'/' | b'\\' | 0) {
                return Err(UriError("the URI's path holds an encoded '/', '\\' or NUL; refused as ambiguous"));
            }
            if is_unreserved(value) {
                out.push(value);
            } else {
                out.extend_from_slice(format!("%{value:02X}").as_bytes());
            }
            i += 3;
            continue;
        }
        if path && b == b'\\' {
            return Err(UriError("the URI's path holds a '\\'; refused as ambiguous"));
        }
        out.push(b);
        i += 1;
    }
    // Only ASCII was decoded or added; the rest of the input was valid UTF-8 and is unchanged.
    Ok(String::from_utf8(out).expect("escapes decode to ASCII only"))
}

/// RFC 3986 §5.2.4, on a path whose dots are already decoded.
pub fn remove_dot_segments(path: &str) -> String {
    let mut input = path;
    let mut output: Vec<&str> = Vec::new();
    let absolute = path.starts_with('/');
    // Work segment by segment: split keeps empty segments (`a//b`), which are kept.
    let mut segments: Vec<&str> = Vec::new();
    if absolute {
        input = &input[1..];
    }
    segments.extend(input.split('/'));
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => trailing_slash = i == last,
            ".." => {
                output.pop();
                trailing_slash = i == last;
            }
            other => {
                output.push(other);
                trailing_slash = false;
            }
        }
    }
    let mut result = String::with_capacity(path.len());
    if absolute {
        result.push('/');
    }
    result.push_str(&output.join("/"));
    if trailing_slash && !result.ends_with('/') {
        result.push('/');
    }
    result
}

fn split_scheme(uri: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = uri.split_once(':')?;
    let mut bytes = scheme.bytes();
    let first = bytes.next()?;
    let valid =
        first.is_ascii_alphabetic() && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    valid.then_some((scheme, rest))
}

/// The normal form of a resource URI (see the module documentation).
pub fn normalize(uri: &str) -> Result<String, UriError> {
    if uri.len() > MAX_URI_LEN {
        return Err(UriError("the URI is too long"));
    }
    if uri.chars().any(char::is_control) {
        return Err(UriError("the URI holds a control character"));
    }
    let (scheme, rest) = match split_scheme(uri) {
        Some((scheme, rest)) => (Some(scheme.to_ascii_lowercase()), rest),
        None => (None, uri),
    };
    let (before_fragment, fragment) = match rest.split_once('#') {
        Some((before, fragment)) => (before, Some(fragment)),
        None => (rest, None),
    };
    let (hierarchy, query) = match before_fragment.split_once('?') {
        Some((hierarchy, query)) => (hierarchy, Some(query)),
        None => (before_fragment, None),
    };
    let (authority, path) = match hierarchy.strip_prefix("//") {
        Some(after) => match after.find('/') {
            Some(at) => (Some(&after[..at]), &after[at..]),
            None => (Some(after), ""),
        },
        None => (None, hierarchy),
    };
    let mut authority = authority.map(|a| normalize_escapes(a, false)).transpose()?.map(|a| {
        // Lowercase the host, not the user info before it.
        match a.rsplit_once('@') {
            Some((user, host)) => format!("{user}@{}", host.to_ascii_lowercase()),
            None => a.to_ascii_lowercase(),
        }
    });
    let mut path = remove_dot_segments(&normalize_escapes(path, true)?);
    if scheme.as_deref() == Some("file") {
        // RFC 8089: `file:/p`, `file://localhost/p` and `file:///p` name the same file.
        if authority.as_deref().is_none_or(|a| a.is_empty() || a == "localhost") {
            authority = Some(String::new());
            if !path.starts_with('/') {
                path.insert(0, '/');
            }
        }
    } else if authority.is_some() && !path.is_empty() && !path.starts_with('/') {
        path.insert(0, '/');
    }
    if authority.is_none() && path.starts_with("//") {
        // Without its dot segments, `.//host/x` would read as an authority.
        return Err(UriError("the URI's path would start with '//' and read as a host"));
    }
    let mut out = String::with_capacity(uri.len());
    if let Some(scheme) = &scheme {
        out.push_str(scheme);
        out.push(':');
    }
    if let Some(authority) = &authority {
        out.push_str("//");
        out.push_str(authority);
    }
    out.push_str(&path);
    if let Some(query) = query {
        out.push('?');
        out.push_str(&normalize_escapes(query, false)?);
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(&normalize_escapes(fragment, false)?);
    }
    if scheme.is_none() && split_scheme(&out).is_some() {
        // Decoding gave a reference without a scheme one (`oo%5A:x` is `ooZ:x`): what it names
        // depends on who reads it.
        return Err(UriError("the URI's first segment is ambiguous (an encoded character makes it a scheme)"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        let cases = [
            ("file:///home/bob/notes.txt", "file:///home/bob/notes.txt"),
            ("file:///home/bob/../alice/key", "file:///home/alice/key"),
            ("file:///home/bob/%2e%2e/alice/key", "file:///home/alice/key"),
            ("file:///home/bob/%2E%2e/%2e/alice", "file:///home/alice"),
            ("file:///home/bob/.%2e/.%2E/etc/passwd", "file:///etc/passwd"),
            ("file:///../../etc/passwd", "file:///etc/passwd"),
            ("FILE:///Home/Bob", "file:///Home/Bob"),
            ("file:/home/bob/x", "file:///home/bob/x"),
            ("file://localhost/home/bob/x", "file:///home/bob/x"),
            ("file://LOCALHOST/home/bob/x", "file:///home/bob/x"),
            ("HTTPS://Example.COM/a/./b/../c?q=%7e#F", "https://example.com/a/c?q=~#F"),
            ("test://static/resource/1", "test://static/resource/1"),
            ("test://Static/%41%62c%3a", "test://static/Abc%3A"),
            ("repo://user@Host/a%2fb", "error"),
            ("file:///home/bob/..%2Fetc", "error"),
            ("file:///home/bob/..%5Cetc", "error"),
            ("file:///home/bob\\..\\etc", "error"),
            ("file:///home/bob/%00", "error"),
            ("file:///home/bob/%zz", "error"),
            ("file:///home/bob/\n", "error"),
            ("mailto:Bob@Example.com", "mailto:Bob@Example.com"),
            ("urn:isbn:0451450523", "urn:isbn:0451450523"),
            ("a/./b/../c", "a/c"),
            ("file:///home/bob/", "file:///home/bob/"),
            ("file:///home/bob/.", "file:///home/bob/"),
            ("file:///home/bob/..", "file:///home/"),
            ("ui://widget/{id}", "ui://widget/{id}"),
            // Found by the uri fuzz target: decoding must not make a scheme appear.
            ("oo%5A:#!", "error"),
            (".///M", "error"),
            ("urn:.//x", "urn:/x"),
        ];
        for (input, expected) in cases {
            let got = normalize(input).map_err(|e| e.0);
            if expected == "error" {
                assert!(got.is_err(), "{input} → {got:?}");
            } else {
                assert_eq!(got.as_deref(), Ok(expected), "{input}");
            }
        }
    }

    /// The reference: a plain stack over segments, written from RFC 3986's description
    /// rather than from the implementation above.
    fn reference(base: &str, segments: &[String]) -> String {
        let mut stack: Vec<String> = Vec::new();
        let mut trailing = false;
        for (i, segment) in segments.iter().enumerate() {
            let decoded = segment.replace("%2e", ".").replace("%2E", ".");
            let last = i + 1 == segments.len();
            if decoded == "." {
                trailing = last;
            } else if decoded == ".." {
                stack.pop();
                trailing = last;
            } else {
                stack.push(decoded);
                trailing = false;
            }
        }
        let mut out = format!("{base}/{}", stack.join("/"));
        if trailing && !out.ends_with('/') {
            out.push('/');
        }
        out
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(".".to_string()),
            Just("..".to_string()),
            Just("%2e".to_string()),
            Just("%2E%2e".to_string()),
            Just(".%2e".to_string()),
            Just("%2e.".to_string()),
            Just("...".to_string()),
            Just("".to_string()),
            "[a-z]{1,4}",
            "[a-z]{0,2}\\.[a-z]{0,2}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn matches_the_reference_and_leaves_no_dot_segment(segments in prop::collection::vec(segment(), 0..12)) {
            let uri = format!("file:///{}", segments.join("/"));
            let normal = normalize(&uri).unwrap();
            prop_assert_eq!(&normal, &reference("file://", &segments));
            let path = normal.strip_prefix("file://").unwrap();
            prop_assert!(path.split('/').all(|s| s != "." && s != ".."), "{}", normal);
            prop_assert_eq!(normalize(&normal).unwrap(), normal.clone(), "idempotent");
        }

        #[test]
        fn no_dot_segment_uri_passes_a_prefix_allow(segments in prop::collection::vec(segment(), 0..12)) {
            let allow = crate::glob::Glob::new("file:///home/bob/*").unwrap();
            let uri = format!("file:///home/bob/{}", segments.join("/"));
            let normal = normalize(&uri).unwrap();
            // Resolved by the reference from the root: inside bob's directory or not.
            // `bob/` followed by no segment at all is `bob/` and an empty last segment.
            let mut full = vec!["home".to_string(), "bob".to_string()];
            if segments.is_empty() {
                full.push(String::new());
            }
            full.extend(segments.iter().cloned());
            let resolved = reference("file://", &full);
            prop_assert_eq!(&normal, &resolved);
            if allow.matches(&normal) {
                prop_assert!(resolved.starts_with("file:///home/bob/"), "{} escaped to {}", uri, resolved);
            }
        }
    }
}
