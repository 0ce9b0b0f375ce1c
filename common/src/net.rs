//! Client addresses behind proxies: `server.trusted_proxies`, and the address a request really
//! comes from.

use std::net::IpAddr;
use std::str::FromStr;

/// An address block: `10.0.0.0/8`, `fd00::/8`, or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr =
            address.trim().parse().map_err(|_| format!("{text:?} is not an IP address or CIDR block"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(Cidr { network, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(address),
            v4 => v4,
        };
        match (self.network, address) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(network) & mask == u32::from(address) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(network) & mask == u128::from(address) & mask
            }
            _ => false,
        }
    }
}

/// Parses `server.trusted_proxies`.
pub fn parse_trusted(list: &[String]) -> Result<Vec<Cidr>, String> {
    list.iter().map(|entry| entry.parse()).collect()
}

/// Where a request comes from: `peer`, unless `peer` is a trusted proxy, in which case the
/// nearest address in `X-Forwarded-For` (read from the right) that is not a trusted proxy. A
/// client cannot choose its address by sending the header itself: only what trusted proxies
/// appended is read.
pub fn client_address(peer: IpAddr, headers: &axum::http::HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |address: IpAddr| trusted.iter().any(|cidr| cidr.contains(address));
    if !is_trusted(peer) {
        return peer;
    }
    let forwarded =
        headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",");
    let mut client = peer;
    for hop in forwarded.split(',').rev() {
        let Ok(address) = hop.trim().parse::<IpAddr>() else { break };
        client = address;
        if !is_trusted(address) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> axum::http::HeaderMap {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("x-forwarded-for", value.parse().unwrap());
        headers
    }

    #[test]
    fn blocks_and_forwarded_addresses() {
        let trusted = parse_trusted(&["10.0.0.0/8".into(), "127.0.0.1".into(), "fd00::/8".into()]).unwrap();
        assert!(trusted[0].contains("10.1.2.3".parse().unwrap()) && !trusted[0].contains("11.0.0.1".parse().unwrap()));
        assert!(trusted[0].contains("::ffff:10.9.9.9".parse().unwrap()));
        assert!(trusted[2].contains("fd12::1".parse().unwrap()));
        assert!(parse_trusted(&["10.0.0.0/33".into()]).is_err() && parse_trusted(&["proxy".into()]).is_err());
        let lb: IpAddr = "10.0.0.5".parse().unwrap();
        // Spoofed leftmost entries are never reached: the first untrusted hop from the right wins.
        assert_eq!(
            client_address(lb, &headers("6.6.6.6, 203.0.113.7, 10.0.0.9"), &trusted),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            client_address(stranger, &headers("203.0.113.7"), &trusted),
            stranger,
            "only trusted peers are believed"
        );
        assert_eq!(client_address(lb, &axum::http::HeaderMap::new(), &trusted), lb);
    }
}
