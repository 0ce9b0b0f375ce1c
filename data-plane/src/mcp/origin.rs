//! DNS-rebinding and cross-origin protection for the MCP endpoint.
//!
//! A page on a foreign site can make a browser send requests to the gateway: by pointing its
//! own DNS name at the gateway's address (rebinding: the request's `Host` names the foreign
//! site) or by calling the gateway's address from its page (the `Origin` names the foreign
//! site). So both headers are judged against what this gateway serves, never against each
//! other (a rebound request's `Host` and `Origin` agree).
//!
//! `Host`: with `mcp.allowed_hosts` set, one of those names (`*`: any, an explicit opt-in).
//! Unset, the names the connection's local address actually serves: on loopback `localhost`,
//! `127.0.0.1` and `::1`; elsewhere an IP literal, the machine's host name or `localhost` (a
//! name an attacker cannot point at the gateway). Behind a proxy that keeps the public name,
//! set `mcp.allowed_hosts`.
//!
//! `Origin` (sent by browsers only): one of `cors.allowed_origins` (`*`: any), or, on a
//! loopback connection, a loopback origin (`http://localhost:5173`, say).

use std::net::IpAddr;

/// Whether a request whose `Host` header is `host` may be served on a connection accepted on
/// `local`.
pub fn host_allowed(allowed: &[String], host: Option<&str>, local: Option<IpAddr>) -> bool {
    if allowed.iter().any(|a| a == "*") {
        return true;
    }
    let Some(name) = host.map(strip_port).filter(|n| !n.is_empty()) else { return false };
    if !allowed.is_empty() {
        return allowed.iter().any(|a| a.eq_ignore_ascii_case(name));
    }
    if is_loopback_name(name) {
        return true;
    }
    if local.is_none_or(|ip| ip.to_canonical().is_loopback()) {
        return false;
    }
    name.parse::<IpAddr>().is_ok() || machine_hostname().is_some_and(|h| h.eq_ignore_ascii_case(name))
}

/// Whether a browser request from `origin` may be served on a connection accepted on `local`.
pub fn origin_allowed(allowed: &[String], origin: &str, local: Option<IpAddr>) -> bool {
    if allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin)) {
        return true;
    }
    // An IPv4 peer on a dual-stack listener arrives as ::ffff:127.0.0.1.
    let loopback_connection = local.is_none_or(|ip| ip.to_canonical().is_loopback());
    let Some((scheme, authority)) = origin.split_once("://") else { return false };
    loopback_connection
        && matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https")
        && !authority.contains(['/', '@'])
        && is_loopback_name(strip_port(authority))
}

fn is_loopback_name(name: &str) -> bool {
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `::1`.
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(host, |(h, _)| h);
    }
    match host.rsplit_once(':') {
        // A bare IPv6 address has more than one colon and no brackets.
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn machine_hostname() -> Option<String> {
    static NAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| nix::unistd::gethostname().ok().and_then(|n| n.into_string().ok())).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOPBACK: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    const PUBLIC: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3)));

    #[test]
    fn hosts_by_default_are_the_names_the_connection_serves() {
        for host in ["localhost", "LOCALHOST:3000", "127.0.0.1:8080", "[::1]:80", "::1"] {
            assert!(host_allowed(&[], Some(host), LOOPBACK), "{host}");
        }
        for host in ["evil.example.com", "evil.example.com:3000", "10.1.2.3", "", "localhost.evil.example"] {
            assert!(!host_allowed(&[], Some(host), LOOPBACK), "{host}");
        }
        assert!(!host_allowed(&[], None, LOOPBACK));
        assert!(host_allowed(&[], Some("10.1.2.3:3000"), PUBLIC));
        assert!(host_allowed(&[], Some("[fd00::1]:3000"), PUBLIC));
        assert!(!host_allowed(&[], Some("evil.example.com"), PUBLIC));
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:3000"), "::1");
        assert_eq!(strip_port("[::1]"), "::1");
        assert_eq!(strip_port("fd00::1"), "fd00::1");
    }

    #[test]
    fn configured_hosts_replace_the_defaults_and_star_opts_out() {
        let allowed = vec!["mcp.example.com".to_string()];
        assert!(host_allowed(&allowed, Some("MCP.example.com:443"), PUBLIC));
        assert!(!host_allowed(&allowed, Some("localhost"), LOOPBACK));
        assert!(host_allowed(&["*".into()], Some("anything.example"), LOOPBACK));
    }

    #[test]
    fn origins_are_never_judged_by_the_host() {
        assert!(origin_allowed(&[], "http://localhost:5173", LOOPBACK));
        assert!(origin_allowed(&[], "http://127.0.0.1:3000", LOOPBACK));
        assert!(origin_allowed(&[], "https://[::1]", LOOPBACK));
        assert!(!origin_allowed(&[], "http://evil.example.com", LOOPBACK));
        assert!(!origin_allowed(&[], "http://localhost@evil.example.com", LOOPBACK));
        assert!(!origin_allowed(&[], "null", LOOPBACK));
        assert!(!origin_allowed(&[], "http://localhost:5173", PUBLIC), "loopback origins only on loopback");
        let mapped: Option<IpAddr> = Some("::ffff:127.0.0.1".parse().unwrap());
        assert!(origin_allowed(&[], "http://localhost:5173", mapped), "a dual-stack listener's IPv4 loopback");
        assert!(!host_allowed(&[], Some("10.1.2.3"), mapped));
        let configured = vec!["https://app.example.com".to_string()];
        assert!(origin_allowed(&configured, "https://app.example.com", PUBLIC));
        assert!(!origin_allowed(&configured, "https://other.example.com", PUBLIC));
    }
}
