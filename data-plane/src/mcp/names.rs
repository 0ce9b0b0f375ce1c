//! How names and URIs of many targets share one namespace on the aggregated endpoint.
//!
//! Tool and prompt names are always `<target>_<name>`; target names are `[a-z0-9-]`, so the
//! first `_` splits them unambiguously (`a_b` + `c` cannot exist: `a_b` is not a target name).
//! Resource URIs (and templates) become `reflow+<target>+<uri>`: the result is still a URI
//! (a scheme may hold `+`), templates keep their `{variables}`, the mapping is reversible, and
//! two targets can never produce the same URI.

const URI_PREFIX: &str = "reflow+";

pub fn prefixed(target: &str, name: &str) -> String {
    format!("{target}_{name}")
}

/// `(target, name)` of a prefixed name.
pub fn split(prefixed: &str) -> Option<(&str, &str)> {
    prefixed.split_once('_').filter(|(target, name)| !target.is_empty() && !name.is_empty())
}

pub fn map_uri(target: &str, uri: &str) -> String {
    format!("{URI_PREFIX}{target}+{uri}")
}

/// `(target, original uri)` of a mapped URI.
pub fn unmap_uri(mapped: &str) -> Option<(&str, &str)> {
    mapped.strip_prefix(URI_PREFIX)?.split_once('+').filter(|(target, uri)| !target.is_empty() && !uri.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_at_the_first_underscore() {
        assert_eq!(split(&prefixed("github", "list_repos")), Some(("github", "list_repos")));
        assert_eq!(split(&prefixed("my-app", "a_b_c")), Some(("my-app", "a_b_c")));
        assert_eq!(split("noprefix"), None);
        assert_eq!(split("_tool"), None);
        assert_eq!(split("target_"), None);
    }

    #[test]
    fn uris_round_trip_and_never_collide() {
        for uri in ["file:///tmp/a+b", "test://static/resource/1", "https://x/{id}", "reflow+a+b://c"] {
            for target in ["a", "a-b", "everything"] {
                let mapped = map_uri(target, uri);
                assert_eq!(unmap_uri(&mapped), Some((target, uri)));
            }
        }
        assert_ne!(map_uri("a", "b+c://x"), map_uri("a-b", "c://x"));
        assert_eq!(unmap_uri("file:///x"), None);
        assert_eq!(unmap_uri("reflow+a"), None);
    }
}
