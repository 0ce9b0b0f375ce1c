//! The grammar of names that reach the wire or a child process.
//!
//! Each validator returns a message naming what is wrong, suitable for a 400 body.

/// Target names are `[a-z0-9-]`, 1–63 characters, starting and ending with a letter or
/// digit. They never contain `_`, so the first `_` of a prefixed tool name
/// (`<target>_<tool>`) always splits target from tool.
pub fn validate_target_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err("target name must be 1 to 63 characters".into());
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(format!("target name {name:?} may contain only lowercase letters, digits and '-'"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("target name {name:?} must start and end with a letter or digit"));
    }
    Ok(())
}

/// Role and group names: 1–64 characters of `[A-Za-z0-9_.-]`.
pub fn validate_principal_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("{kind} name must be 1 to 64 characters"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err(format!("{kind} name {name:?} may contain only letters, digits, '_', '.' and '-'"));
    }
    Ok(())
}

/// Environment keys that would let stored config change how a child process loads code or
/// finds programs. The gateway sets PATH and HOME itself.
const FORBIDDEN_ENV_KEYS: &[&str] = &[
    "PATH",
    "HOME",
    "SHELL",
    "IFS",
    "ENV",
    "BASH_ENV",
    "NODE_OPTIONS",
    "NODE_PATH",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PERL5LIB",
    "PERL5OPT",
    "RUBYLIB",
    "RUBYOPT",
    "JAVA_TOOL_OPTIONS",
];
const FORBIDDEN_ENV_PREFIXES: &[&str] = &["LD_", "DYLD_"];

/// Env keys: `[A-Za-z_][A-Za-z0-9_]*`, at most 128 characters, and not one that changes
/// how a process loads code (`PATH`, `LD_PRELOAD`, `NODE_OPTIONS`, …).
pub fn validate_env_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 128 {
        return Err("env key must be 1 to 128 characters".into());
    }
    let mut bytes = key.bytes();
    let first = bytes.next().unwrap_or(b'0');
    if !(first.is_ascii_alphabetic() || first == b'_') || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("env key {key:?} must match [A-Za-z_][A-Za-z0-9_]*"));
    }
    let upper = key.to_ascii_uppercase();
    if FORBIDDEN_ENV_KEYS.contains(&upper.as_str()) || FORBIDDEN_ENV_PREFIXES.iter().any(|p| upper.starts_with(p)) {
        return Err(format!("env key {key:?} is reserved: it would change how the server process loads code"));
    }
    Ok(())
}

/// HTTP header names for credential injection: an RFC 9110 token, at most 128 characters.
pub fn validate_header_name(name: &str) -> Result<(), String> {
    const TCHAR: &[u8] = b"!#$%&'*+-.^_`|~";
    if name.is_empty() || name.len() > 128 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || TCHAR.contains(&b)) {
        return Err(format!("{name:?} is not a valid HTTP header name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names() {
        for ok in ["github", "a", "jira-2", "0x"] {
            assert!(validate_target_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "GitHub", "git_hub", "-a", "a-", "a b", "ä", &"a".repeat(64)] {
            assert!(validate_target_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_keys() {
        for ok in ["GITHUB_TOKEN", "_X", "a1"] {
            assert!(validate_env_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1A",
            "A-B",
            "PATH",
            "path",
            "LD_PRELOAD",
            "ld_library_path",
            "DYLD_INSERT_LIBRARIES",
            "NODE_OPTIONS",
            "A B",
        ] {
            assert!(validate_env_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn principal_and_header_names() {
        assert!(validate_principal_name("role", "developer").is_ok());
        assert!(validate_principal_name("group", "team.platform-eu_1").is_ok());
        assert!(validate_principal_name("group", "a/b").is_err());
        assert!(validate_principal_name("group", "").is_err());
        assert!(validate_header_name("X-Api-Key").is_ok());
        assert!(validate_header_name("X Api").is_err());
        assert!(validate_header_name("X:Api").is_err());
    }
}
