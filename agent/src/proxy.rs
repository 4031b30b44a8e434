//! The client behind a reverse proxy or load balancer.
//!
//! Behind nginx terminating TLS on the same host, or a load balancer, every request reaches the
//! API from the proxy's address: alerts would name the proxy, sessions without an identifier
//! would merge into one, and a block would cut off everyone (or, with the proxy allowlisted,
//! nobody). Requests from a *trusted* proxy therefore name their client in a header the proxy
//! sets; the client is the rightmost address there that is not itself a trusted proxy (the
//! entries to its left were written by the client and prove nothing). A block of that client
//! then drops its packets wherever the XDP program sees them directly: on the public interface
//! of a host whose proxy forwards to the API over loopback, attach both.
//!
//! Only peers in `trusted` are believed: anyone else could name any address and have it blocked.
//! A trusted proxy itself is never blocked (the engine treats it as allowlisted): when it names
//! no client, its own address stands in, and blocking it would cut off everyone behind it.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::http::SelectedHeaders;

/// `[proxy]` in the config. Off (every client is the packet's source) while `trusted` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Proxies (addresses or prefixes) whose requests name their client in `header`.
    pub trusted: Vec<IpNet>,
    /// Where they name it.
    pub header: ClientHeader,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            trusted: Vec::new(),
            header: ClientHeader::XForwardedFor,
        }
    }
}

/// The header a trusted proxy names the client in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (nginx `$proxy_add_x_forwarded_for`, most
    /// load balancers).
    XForwardedFor,
    /// `X-Real-IP: client` (nginx `$remote_addr`): one address, set by the proxy alone.
    XRealIp,
    /// `Forwarded: for=client;proto=https, for="[2001:db8::1]:4711"` (RFC 7239).
    Forwarded,
}

impl ClientHeader {
    /// Lowercase, as the HTTP parser keeps header names.
    pub fn name(self) -> &'static str {
        match self {
            ClientHeader::XForwardedFor => "x-forwarded-for",
            ClientHeader::XRealIp => "x-real-ip",
            ClientHeader::Forwarded => "forwarded",
        }
    }
}

/// Where a request's client address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientSource {
    /// The packet's source: not a trusted proxy (or no proxies configured).
    Peer,
    /// Named by a trusted proxy.
    Header,
    /// A trusted proxy's request without the header (a health check, a misconfigured proxy):
    /// the proxy's own address stands in.
    HeaderMissing,
    /// The header holds something that is not an address where the client should be; the
    /// proxy's address stands in rather than a guess.
    HeaderInvalid,
}

/// Counts of [`ClientSource`] outcomes for requests from trusted proxies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProxyCounters {
    pub client_from_header: u64,
    pub client_header_missing: u64,
    pub client_header_invalid: u64,
}

impl ProxyCounters {
    pub fn record(&mut self, source: ClientSource) {
        match source {
            ClientSource::Peer => {}
            ClientSource::Header => self.client_from_header += 1,
            ClientSource::HeaderMissing => self.client_header_missing += 1,
            ClientSource::HeaderInvalid => self.client_header_invalid += 1,
        }
    }
}

impl ProxyConfig {
    /// Whether `addr` is one of the trusted proxies.
    pub fn trusts(&self, addr: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(&addr))
    }

    /// The client of a request that arrived from `peer` with `headers`.
    pub fn client(&self, peer: IpAddr, headers: &SelectedHeaders<'_>) -> (IpAddr, ClientSource) {
        if !self.trusts(peer) {
            return (peer, ClientSource::Peer);
        }
        let name = self.header.name();
        // Repeated header lines form one list, in order (RFC 9110 §5.3).
        // Inline for the usual few hops: no allocation per request.
        let mut entries: SmallVec<[&str; 8]> = SmallVec::new();
        for value in headers.get_all(name) {
            match self.header {
                ClientHeader::XRealIp => {
                    entries.clear();
                    entries.push(value.trim());
                }
                ClientHeader::XForwardedFor => entries.extend(value.split(',').map(str::trim)),
                ClientHeader::Forwarded => entries.extend(value.split(',').map(forwarded_for)),
            }
        }
        entries.retain(|e| !e.is_empty());
        if entries.is_empty() {
            return (peer, ClientSource::HeaderMissing);
        }
        // Right to left: each trusted hop vouches for the one before it; the first address it
        // does not trust is the client.
        // Every hop trusted: the leftmost is as far as the chain goes.
        let mut client = peer;
        for entry in entries.iter().rev() {
            let Some(addr) = parse_node(entry) else {
                return (peer, ClientSource::HeaderInvalid);
            };
            client = addr;
            if !self.trusts(addr) {
                break;
            }
        }
        (client, ClientSource::Header)
    }
}

/// The `for=` value of one `Forwarded` element (`for=192.0.2.60;proto=http;by=203.0.113.43`),
/// unquoted; empty when it has none.
fn forwarded_for(element: &str) -> &str {
    element
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
        .map_or("", |(_, v)| v.trim().trim_matches('"'))
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:4711`. `unknown` and obfuscated identifiers (RFC 7239
/// §6.3) are not addresses.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return addr.parse::<IpAddr>().ok().map(|a| a.to_canonical());
    }
    if let Ok(a) = s.parse::<IpAddr>() {
        return Some(a.to_canonical());
    }
    // IPv4 with a port (an IPv6 address with a port is always bracketed).
    let (addr, port) = s.rsplit_once(':')?;
    if !is_port(port) {
        return None;
    }
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

fn is_port(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(header: ClientHeader) -> ProxyConfig {
        ProxyConfig {
            trusted: vec![
                "127.0.0.0/8".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
            ],
            header,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn client(c: &ProxyConfig, peer: &str, headers: &[(&str, &str)]) -> (IpAddr, ClientSource) {
        c.client(
            ip(peer),
            &SelectedHeaders::from_pairs(headers.iter().copied()),
        )
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let c = cfg(ClientHeader::XForwardedFor);
        assert_eq!(
            client(&c, "198.51.100.7", &[("x-forwarded-for", "203.0.113.9")]),
            (ip("198.51.100.7"), ClientSource::Peer)
        );
        // No proxies configured: nobody is believed.
        assert_eq!(
            ProxyConfig::default().client(
                ip("127.0.0.1"),
                &SelectedHeaders::from_pairs([("x-forwarded-for", "203.0.113.9")])
            ),
            (ip("127.0.0.1"), ClientSource::Peer)
        );
    }

    #[test]
    fn x_forwarded_for_yields_the_rightmost_untrusted_address() {
        let c = cfg(ClientHeader::XForwardedFor);
        assert_eq!(
            client(&c, "127.0.0.1", &[("x-forwarded-for", "203.0.113.9")]),
            (ip("203.0.113.9"), ClientSource::Header)
        );
        // A client-written entry on the left is not believed; trusted hops on the right are
        // skipped, across repeated header lines too.
        assert_eq!(
            client(
                &c,
                "127.0.0.1",
                &[
                    ("x-forwarded-for", "1.2.3.4, 203.0.113.9"),
                    ("x-forwarded-for", "10.1.1.1,10.2.2.2")
                ]
            ),
            (ip("203.0.113.9"), ClientSource::Header)
        );
        // Ports, brackets and v4-mapped forms as proxies write them.
        for (v, want) in [
            ("203.0.113.9:51234", "203.0.113.9"),
            ("[2001:db8::7]:443", "2001:db8::7"),
            ("2001:db8::7", "2001:db8::7"),
            ("::ffff:203.0.113.9", "203.0.113.9"),
        ] {
            assert_eq!(
                client(&c, "127.0.0.1", &[("x-forwarded-for", v)]),
                (ip(want), ClientSource::Header),
                "{v}"
            );
        }
        // Every hop trusted: the leftmost.
        assert_eq!(
            client(
                &c,
                "127.0.0.1",
                &[("x-forwarded-for", "10.9.9.9, 10.1.1.1")]
            ),
            (ip("10.9.9.9"), ClientSource::Header)
        );
    }

    #[test]
    fn a_missing_or_unreadable_header_leaves_the_proxy_as_the_client() {
        let c = cfg(ClientHeader::XForwardedFor);
        assert_eq!(
            client(&c, "127.0.0.1", &[("authorization", "Bearer x")]),
            (ip("127.0.0.1"), ClientSource::HeaderMissing)
        );
        assert_eq!(
            client(&c, "127.0.0.1", &[("x-forwarded-for", " , ")]),
            (ip("127.0.0.1"), ClientSource::HeaderMissing)
        );
        for v in [
            "unknown",
            "203.0.113.9, evil",
            "203.0.113.9:99999x",
            "[2001:db8::7",
            "2001:db8::7:443x",
        ] {
            assert_eq!(
                client(&c, "127.0.0.1", &[("x-forwarded-for", v)]),
                (ip("127.0.0.1"), ClientSource::HeaderInvalid),
                "{v}"
            );
        }
        // Garbage left of the client is never read.
        assert_eq!(
            client(&c, "127.0.0.1", &[("x-forwarded-for", "evil, 203.0.113.9")]),
            (ip("203.0.113.9"), ClientSource::Header)
        );
    }

    #[test]
    fn x_real_ip_and_forwarded() {
        let c = cfg(ClientHeader::XRealIp);
        assert_eq!(
            client(&c, "10.0.0.2", &[("x-real-ip", " 203.0.113.9 ")]),
            (ip("203.0.113.9"), ClientSource::Header)
        );
        assert_eq!(
            client(&c, "10.0.0.2", &[("x-forwarded-for", "203.0.113.9")]),
            (ip("10.0.0.2"), ClientSource::HeaderMissing),
            "only the configured header counts"
        );
        let c = cfg(ClientHeader::Forwarded);
        assert_eq!(
            client(
                &c,
                "127.0.0.1",
                &[(
                    "forwarded",
                    r#"for=1.2.3.4, For="[2001:db8:cafe::17]:4711";proto=https, for=10.0.0.5;by=10.0.0.1"#
                )]
            ),
            (ip("2001:db8:cafe::17"), ClientSource::Header)
        );
        assert_eq!(
            client(&c, "127.0.0.1", &[("forwarded", "for=_hidden;proto=https")]),
            (ip("127.0.0.1"), ClientSource::HeaderInvalid)
        );
        assert_eq!(
            client(&c, "127.0.0.1", &[("forwarded", "proto=https")]),
            (ip("127.0.0.1"), ClientSource::HeaderMissing)
        );
    }

    #[test]
    fn config_reads_from_toml() {
        let c: ProxyConfig =
            toml::from_str("trusted = [\"127.0.0.1/32\", \"::1/128\"]\nheader = \"x-real-ip\"")
                .unwrap();
        assert_eq!(c.header, ClientHeader::XRealIp);
        assert_eq!(c.trusted.len(), 2);
        assert!(toml::from_str::<ProxyConfig>("header = \"via\"").is_err());
        assert!(toml::from_str::<ProxyConfig>("trusted = [\"10.0.0.0/33\"]").is_err());
    }
}
