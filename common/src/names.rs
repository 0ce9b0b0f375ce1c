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
    validate_env_key_syntax(key)?;
    if is_forbidden_env_key(key) {
        return Err(format!("env key {key:?} is reserved: it would change how the server process loads code"));
    }
    Ok(())
}

/// The grammar alone: `[A-Za-z_][A-Za-z0-9_]*`, at most 128 characters.
pub fn validate_env_key_syntax(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 128 {
        return Err("env key must be 1 to 128 characters".into());
    }
    let mut bytes = key.bytes();
    let first = bytes.next().unwrap_or(b'0');
    if !(first.is_ascii_alphabetic() || first == b'_') || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("env key {key:?} must match [A-Za-z_][A-Za-z0-9_]*"));
    }
    Ok(())
}

/// Keys no scope of any target may hold (`PATH`, `LD_PRELOAD`, `NODE_OPTIONS`, …).
pub fn is_forbidden_env_key(key: &str) -> bool {
    let upper = key.to_ascii_uppercase();
    FORBIDDEN_ENV_KEYS.contains(&upper.as_str()) || FORBIDDEN_ENV_PREFIXES.iter().any(|p| upper.starts_with(p))
}

/// Env keys that choose where an HTTP or SSE target's requests go and how long they may take
/// (`BASE_URL` replaces the URL, `AUTH_HEADER` names the header the token travels in, `TIMEOUT`
/// bounds each request). Only admins set them, at any scope, and their values are validated.
pub const RESERVED_DESTINATION_KEYS: &[&str] = &["BASE_URL", "AUTH_HEADER", "TIMEOUT"];

/// Whether `key` is one of [`RESERVED_DESTINATION_KEYS`].
pub fn is_reserved_destination(key: &str) -> bool {
    RESERVED_DESTINATION_KEYS.contains(&key.to_ascii_uppercase().as_str())
}

/// Variables that change what a process runs or whom it talks to (beyond [`FORBIDDEN_ENV_KEYS`],
/// which no scope may hold at all): interpreter and loader
/// options, module and library search paths, package-runner registries and configuration,
/// shell start-up files, proxies and certificate authorities, name resolution. A user must never
/// set one for a process (a STDIO child or a pod), whatever the target declares: a process of a
/// `per_user` target also holds the default and role values, and the gateway's own files are a
/// working directory away.
const EXECUTION_KEYS: &[&str] = &[
    "CDPATH",
    "PS4",
    "PROMPT_COMMAND",
    "SHELLOPTS",
    "BASHOPTS",
    "GLOBIGNORE",
    "CLASSPATH",
    "GCONV_PATH",
    "LOCPATH",
    "NLSPATH",
    "HOSTALIASES",
    "RESOLV_HOST_CONF",
    "LOCALDOMAIN",
    "RES_OPTIONS",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "FTP_PROXY",
    "SOCKS_PROXY",
    "SOCKS5_PROXY",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "AWS_CA_BUNDLE",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    "SSLKEYLOGFILE",
    "TMPDIR",
    "TMP",
    "TEMP",
    "EDITOR",
    "VISUAL",
    "PAGER",
    "BROWSER",
    "SSH_ASKPASS",
    "SUDO_ASKPASS",
    "LESSOPEN",
    "LESSCLOSE",
    "MANPAGER",
    "PHPRC",
    "PHP_INI_SCAN_DIR",
    "TCLLIBPATH",
    "MAVEN_OPTS",
    "GRADLE_OPTS",
    "DOTNET_STARTUP_HOOKS",
    "CORECLR_PROFILER",
    "CORECLR_ENABLE_PROFILING",
    "NPX_PACKAGE",
    "NPM_EXECPATH",
    "UVX",
    "BUNX",
];
/// Prefixes of the same kind: `NODE_OPTIONS`, `PYTHONSTARTUP`, `NPM_CONFIG_REGISTRY`,
/// `PIP_INDEX_URL`, `GIT_SSH_COMMAND`, `LD_PRELOAD`, `SSL_CERT_FILE`, …
const EXECUTION_PREFIXES: &[&str] = &[
    "LD_",
    "DYLD_",
    "NODE_",
    "NPM_",
    "NPX_",
    "YARN_",
    "PNPM_",
    "BUN_",
    "DENO_",
    "COREPACK_",
    "ELECTRON_",
    "PYTHON",
    "PIP_",
    "UV_",
    "CONDA",
    "VIRTUAL_ENV",
    "PIPX_",
    "POETRY_",
    "PERL",
    "RUBY",
    "GEM_",
    "BUNDLE_",
    "JAVA",
    "_JAVA",
    "JDK_",
    "GIT_",
    "LUA_",
    "XDG_",
    "OPENSSL_",
    "SSL_",
    "MALLOC_",
    "GLIBC_",
    "GOFLAGS",
    "GOPROXY",
    "CARGO_",
    "RUSTC",
    "RUSTUP_",
    "DOCKER_",
];

/// Whether `key` changes what a process runs or whom it talks to (see [`EXECUTION_KEYS`]).
/// Compared without case: `http_proxy` is `HTTP_PROXY` to most programs.
pub fn changes_execution(key: &str) -> bool {
    let upper = key.to_ascii_uppercase();
    is_forbidden_env_key(key)
        || EXECUTION_KEYS.contains(&upper.as_str())
        || EXECUTION_PREFIXES.iter().any(|p| upper.starts_with(p))
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
    fn keys_that_change_execution_are_recognised_in_any_case() {
        for key in [
            "NODE_OPTIONS",
            "node_options",
            "NPM_CONFIG_REGISTRY",
            "npm_config_userconfig",
            "PYTHONSTARTUP",
            "PYTHONPATH",
            "PIP_INDEX_URL",
            "UV_INDEX_URL",
            "LD_PRELOAD",
            "HTTPS_PROXY",
            "https_proxy",
            "NO_PROXY",
            "SSL_CERT_FILE",
            "NODE_EXTRA_CA_CERTS",
            "REQUESTS_CA_BUNDLE",
            "GIT_SSH_COMMAND",
            "BASH_ENV",
            "JAVA_TOOL_OPTIONS",
            "PERL5OPT",
            "RUBYOPT",
            "XDG_CONFIG_HOME",
            "TMPDIR",
            "GLIBC_TUNABLES",
        ] {
            assert!(changes_execution(key), "{key}");
        }
        for key in ["GITHUB_PERSONAL_ACCESS_TOKEN", "API_KEY", "GREETING", "AUTH_TOKEN", "SLACK_TEAM_ID"] {
            assert!(!changes_execution(key), "{key}");
        }
        assert!(is_reserved_destination("BASE_URL") && is_reserved_destination("timeout"));
        assert!(!is_reserved_destination("AUTH_TOKEN"));
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
