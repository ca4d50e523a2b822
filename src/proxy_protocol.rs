//! The PROXY protocol (v1 text, v2 binary): how a proxy in front of Fulcrum tells it the
//! real client's address, and how Fulcrum tells its servers. A header is read off the
//! socket to its last byte and no further, so that TLS or HTTP follows on the same stream
//! untouched; the wire format itself is the `ppp` crate's.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::socket::MsgFlags;
use tokio::io::Interest;
use tokio::net::TcpStream;

pub use crate::config::ProxyProtocolVersion;

/// The addresses a header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The connection does not begin with a PROXY header.
    #[error("the connection does not begin with a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("no whole PROXY protocol header in time")]
    TimedOut,
    #[error("connection closed before a whole PROXY protocol header")]
    Closed,
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] io::Error),
}

/// What the first bytes of a connection hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// The start of a header; it is `total` bytes long when that is known yet.
    Partial { total: Option<usize> },
    /// A whole header of `len` bytes; `addresses` as in [`read_header`].
    Header {
        len: usize,
        addresses: Option<Addresses>,
    },
}

const V1_PREFIX: &[u8] = b"PROXY ";
/// The spec's limit, CRLF included.
const V1_MAX_LEN: usize = 107;
const V2_SIGNATURE: &[u8] = ppp::v2::PROTOCOL_PREFIX;
/// Signature, version and command, family and protocol, payload length.
const V2_FIXED_LEN: usize = 16;
/// Addresses (216 bytes at most, for Unix sockets) and TLVs beyond them: what proxies send
/// (SSL details, a unique id, an authority) is far smaller, and more is refused rather
/// than held for.
const V2_MAX_PAYLOAD: usize = 4096;
/// Bytes peeked at first: a whole v1 header, or a v2 one with IPv6 addresses and a few
/// TLVs; a longer v2 header is peeked again at its own length.
const FIRST_PEEK: usize = 256;

/// Pure: what the start of a connection holds, from as few bytes as tell it. A v2 header
/// whose addresses and TLVs pass 4 KiB is refused; TLVs are skipped. A v2 LOCAL header or a
/// v1 UNKNOWN one, and a v2 header for an unspecified family or Unix sockets, carry no
/// addresses (`None`): the connection's own stand.
pub fn decode(bytes: &[u8]) -> Result<Decoded, HeaderError> {
    const PARTIAL: Result<Decoded, HeaderError> = Ok(Decoded::Partial { total: None });
    if bytes.is_empty() {
        return PARTIAL;
    }
    if V2_SIGNATURE.starts_with(&bytes[..bytes.len().min(V2_SIGNATURE.len())]) {
        let Some(length) = bytes.get(V2_FIXED_LEN - 2..V2_FIXED_LEN) else {
            return PARTIAL;
        };
        let payload = usize::from(u16::from_be_bytes([length[0], length[1]]));
        if payload > V2_MAX_PAYLOAD {
            return Err(HeaderError::Malformed(format!(
                "{payload} bytes of addresses and TLVs, over the {V2_MAX_PAYLOAD} taken"
            )));
        }
        let total = V2_FIXED_LEN + payload;
        let Some(header) = bytes.get(..total) else {
            return Ok(Decoded::Partial { total: Some(total) });
        };
        let header = ppp::v2::Header::try_from(header)
            .map_err(|error| HeaderError::Malformed(error.to_string()))?;
        let addresses = match (header.command, header.addresses) {
            (ppp::v2::Command::Local, _) => None,
            (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => Some(ipv4(a)),
            (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => Some(ipv6(a)),
            (
                ppp::v2::Command::Proxy,
                ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_),
            ) => None,
        };
        return Ok(Decoded::Header {
            len: total,
            addresses,
        });
    }
    if V1_PREFIX.starts_with(&bytes[..bytes.len().min(V1_PREFIX.len())]) {
        if bytes.len() < V1_PREFIX.len() {
            return PARTIAL;
        }
        // Nothing is parsed before the CRLF: the text of a header cut short can look wrong
        // (a port cut at its separator is an empty port) while it is only unfinished.
        let Some(cr) = memchr::memchr(b'\r', &bytes[..bytes.len().min(V1_MAX_LEN + 1)]) else {
            if bytes.len() > V1_MAX_LEN {
                return Err(HeaderError::Malformed(format!(
                    "a v1 header without CRLF in its first {V1_MAX_LEN} bytes"
                )));
            }
            return PARTIAL;
        };
        let Some(text) = bytes.get(..cr + 2) else {
            return PARTIAL;
        };
        let header = ppp::v1::Header::try_from(text)
            .map_err(|error| HeaderError::Malformed(error.to_string()))?;
        let addresses = match header.addresses {
            ppp::v1::Addresses::Tcp4(a) => Some(ipv4(a)),
            ppp::v1::Addresses::Tcp6(a) => Some(ipv6(a)),
            ppp::v1::Addresses::Unknown => None,
        };
        return Ok(Decoded::Header {
            len: header.header.len(),
            addresses,
        });
    }
    Err(HeaderError::Missing)
}

// ppp's v1 and v2 share these two types.
fn ipv4(a: ppp::v2::IPv4) -> Addresses {
    Addresses {
        source: SocketAddr::new(a.source_address.into(), a.source_port),
        destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
    }
}

fn ipv6(a: ppp::v2::IPv6) -> Addresses {
    Addresses {
        source: SocketAddr::new(a.source_address.into(), a.source_port),
        destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
    }
}

/// Reads and consumes exactly one PROXY header (v1 or v2) from the start of `stream`, for at
/// most `within`, leaving every byte after it unread in the socket (it peeks with MSG_PEEK,
/// then reads exactly the header's length), so that TLS or HTTP can follow on the same
/// stream untouched. Ok(None): a LOCAL command (v2) or UNKNOWN (v1) header — a health check
/// from the proxy itself — the connection's own addresses stand. A header that has begun
/// waits for the rest (asleep, not polling) until it comes, the peer closes (`Closed`) or
/// `within` passes (`TimedOut`); bytes that cannot begin one are `Missing` at once.
pub async fn read_header(
    stream: &TcpStream,
    within: Duration,
) -> Result<Option<Addresses>, HeaderError> {
    tokio::time::timeout(within, read_header_untimed(stream))
        .await
        .unwrap_or(Err(HeaderError::TimedOut))
}

async fn read_header_untimed(stream: &TcpStream) -> Result<Option<Addresses>, HeaderError> {
    let mut first = [0u8; FIRST_PEEK];
    // Only for a v2 header longer than `first`.
    let mut longer = Vec::new();
    let mut peeked = 0;
    let (len, addresses) = loop {
        let window: &mut [u8] = if longer.is_empty() {
            &mut first
        } else {
            &mut longer
        };
        let ready = stream.ready(Interest::READABLE).await?;
        // A peek leaves the socket readable, so waiting for readiness again would return at
        // once (tokio's own `peek` would spin here): when nothing new has come, the closure
        // says "would block", which makes tokio wait for the next arrival (unless one came
        // meanwhile, which it notices).
        let result = stream.try_io(Interest::READABLE, || {
            let n = nix::sys::socket::recv(stream.as_raw_fd(), window, MsgFlags::MSG_PEEK)?;
            if n > 0 && n == peeked && !ready.is_read_closed() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match result {
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error.into()),
        };
        // The peer has closed its side with the header still incomplete.
        if n == peeked {
            return Err(HeaderError::Closed);
        }
        peeked = n;
        match decode(&window[..n])? {
            Decoded::Header { len, addresses } => break (len, addresses),
            Decoded::Partial { total: Some(total) } if total > window.len() => {
                longer = vec![0; total];
            }
            Decoded::Partial { .. } => {}
        }
    };

    let header: &mut [u8] = if longer.is_empty() {
        &mut first[..len]
    } else {
        &mut longer[..len]
    };
    let mut consumed = 0;
    while consumed < len {
        stream.readable().await?;
        match stream.try_read(&mut header[consumed..]) {
            Ok(0) => return Err(HeaderError::Closed),
            Ok(n) => consumed += n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(addresses)
}

/// The header for a connection from `source` to `destination` (the address the client
/// connected to). Mixed families (an IPv4 client on an IPv6 listener, or v4-mapped
/// addresses) are written so a server can read them: map to one family.
pub fn encode(
    version: ProxyProtocolVersion,
    source: SocketAddr,
    destination: SocketAddr,
) -> Vec<u8> {
    let addresses = one_family(source, destination);
    match version {
        ProxyProtocolVersion::V1 => ppp::v1::Addresses::from(addresses).to_string().into_bytes(),
        ProxyProtocolVersion::V2 => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            addresses,
        )
        .build()
        .expect("a header with only addresses is far below the 64 KiB a v2 header can hold"),
    }
}

/// The header for a connection Fulcrum makes on its own behalf (a health check), which
/// carries no client: v2 `LOCAL`, or v1 `UNKNOWN`. A server reading it keeps the
/// connection's own addresses, as Fulcrum does for such a header from a proxy in front.
pub fn encode_local(version: ProxyProtocolVersion) -> &'static [u8] {
    const V2_LOCAL: [u8; V2_FIXED_LEN] = {
        let mut header = [0u8; V2_FIXED_LEN];
        let mut i = 0;
        while i < V2_SIGNATURE.len() {
            header[i] = V2_SIGNATURE[i];
            i += 1;
        }
        // Version 2, command LOCAL; family and protocol unspecified; no payload.
        header[12] = 0x20;
        header
    };
    match version {
        ProxyProtocolVersion::V1 => b"PROXY UNKNOWN\r\n",
        ProxyProtocolVersion::V2 => &V2_LOCAL,
    }
}

/// Both addresses as IPv4 when both are (v4-mapped ones included), otherwise both as IPv6,
/// an IPv4 one mapped: a header names one family for both.
fn one_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (source_ip, destination_ip) = (source.ip().to_canonical(), destination.ip().to_canonical());
    if source_ip.is_ipv4() && destination_ip.is_ipv4() {
        return (
            SocketAddr::new(source_ip, source.port()),
            SocketAddr::new(destination_ip, destination.port()),
        );
    }
    let as_v6 = |ip: IpAddr| -> IpAddr {
        IpAddr::V6(match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        })
    };
    (
        SocketAddr::new(as_v6(source_ip), source.port()),
        SocketAddr::new(as_v6(destination_ip), destination.port()),
    )
}

/// What a connection's first bytes say about a PROXY header at its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStart {
    /// They begin with a whole signature (v1 `PROXY ` or the v2 12-byte one).
    Header,
    /// They cannot begin one.
    NotHeader,
    /// They are a strict prefix of a signature (`PROX`, or `\r\n\r\n` of v2): only more
    /// bytes tell; at most 11 more are needed.
    Undecided,
}

/// Whether `first` (a connection's first bytes, however few) begins like a PROXY header —
/// for refusing one from an untrusted client, who may send it split across segments so
/// that no single read shows the whole signature. Cheap: no allocation.
pub fn header_start(first: &[u8]) -> HeaderStart {
    let mut undecided = false;
    for signature in [V1_PREFIX, V2_SIGNATURE] {
        if first.starts_with(signature) {
            return HeaderStart::Header;
        }
        undecided |= !first.is_empty() && signature.starts_with(first);
    }
    if undecided {
        HeaderStart::Undecided
    } else {
        HeaderStart::NotHeader
    }
}

/// Whether `ip` is in any of `trusted` (v4-mapped IPv6 addresses count as their IPv4 address).
pub fn is_trusted(ip: IpAddr, trusted: &[ipnet::IpNet]) -> bool {
    let canonical = ip.to_canonical();
    trusted
        .iter()
        .any(|net| net.contains(&canonical) || net.contains(&ip))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::l4::client_hello;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn header(len: usize, source: &str, destination: &str) -> Decoded {
        Decoded::Header {
            len,
            addresses: Some(Addresses {
                source: addr(source),
                destination: addr(destination),
            }),
        }
    }

    fn malformed(result: Result<Decoded, HeaderError>) -> String {
        match result {
            Err(HeaderError::Malformed(what)) => what,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    /// A v2 header by hand, as the spec lays it out: `command` and `family` bytes, payload.
    fn v2(version_command: u8, family_protocol: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.extend_from_slice(&[version_command, family_protocol]);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn v1_headers_are_the_spec_text() {
        use ProxyProtocolVersion::V1;
        let cases = [
            (
                "192.0.2.1:56324",
                "198.51.100.7:443",
                "PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n",
            ),
            (
                "[2001:db8::1]:5000",
                "[2001:db8::2]:443",
                "PROXY TCP6 2001:db8::1 2001:db8::2 5000 443\r\n",
            ),
            // An IPv4 client of an IPv6 listener: one family, IPv6.
            (
                "192.0.2.1:5000",
                "[2001:db8::2]:443",
                "PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 5000 443\r\n",
            ),
            // v4-mapped addresses on both sides (a dual-stack socket): IPv4.
            (
                "[::ffff:192.0.2.1]:5000",
                "[::ffff:10.0.0.1]:80",
                "PROXY TCP4 192.0.2.1 10.0.0.1 5000 80\r\n",
            ),
        ];
        for (source, destination, text) in cases {
            assert_eq!(
                String::from_utf8(encode(V1, addr(source), addr(destination))).unwrap(),
                text
            );
        }
    }

    #[test]
    fn v2_headers_are_the_spec_bytes() {
        use ProxyProtocolVersion::V2;
        let ipv4 = encode(V2, addr("192.0.2.1:56324"), addr("198.51.100.7:443"));
        let mut payload = vec![192, 0, 2, 1, 198, 51, 100, 7];
        payload.extend_from_slice(&56324u16.to_be_bytes());
        payload.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(ipv4, v2(0x21, 0x11, &payload));

        let ipv6 = encode(V2, addr("192.0.2.1:5000"), addr("[2001:db8::2]:443"));
        let mut payload = "::ffff:192.0.2.1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
            .to_vec();
        payload.extend_from_slice(
            &"2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        payload.extend_from_slice(&5000u16.to_be_bytes());
        payload.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(ipv6, v2(0x21, 0x21, &payload));
    }

    #[test]
    fn headers_without_addresses_leave_the_connections_own() {
        let local = v2(0x20, 0x00, &[]);
        assert_eq!(
            decode(&local).unwrap(),
            Decoded::Header {
                len: 16,
                addresses: None
            }
        );
        // LOCAL with addresses (a health check may send them): still none taken.
        let local_with = v2(0x20, 0x11, &[127, 0, 0, 1, 127, 0, 0, 1, 0, 1, 0, 2]);
        assert_eq!(
            decode(&local_with).unwrap(),
            Decoded::Header {
                len: 28,
                addresses: None
            }
        );
        let unix = v2(0x21, 0x31, &[0; 216]);
        assert_eq!(
            decode(&unix).unwrap(),
            Decoded::Header {
                len: 232,
                addresses: None
            }
        );
        let unknown = b"PROXY UNKNOWN\r\nGET /";
        assert_eq!(
            decode(unknown).unwrap(),
            Decoded::Header {
                len: 15,
                addresses: None
            }
        );
        let unknown_long = "PROXY UNKNOWN ffff:f::1 ffff:f::2 65535 65535\r\n";
        assert_eq!(
            decode(unknown_long.as_bytes()).unwrap(),
            Decoded::Header {
                len: unknown_long.len(),
                addresses: None
            }
        );
    }

    #[test]
    fn v2_tlvs_are_skipped_and_a_huge_block_refused() {
        let with_tlvs = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (addr("10.1.2.3:4000"), addr("10.0.0.1:443")),
        )
        .write_tlv(ppp::v2::Type::Authority, b"api.example.com")
        .unwrap()
        .write_tlv(ppp::v2::Type::UniqueId, &[9; 64])
        .unwrap()
        .build()
        .unwrap();
        assert_eq!(
            decode(&with_tlvs).unwrap(),
            header(with_tlvs.len(), "10.1.2.3:4000", "10.0.0.1:443")
        );
        let mut at_limit = v2(0x21, 0x11, &[0; V2_MAX_PAYLOAD]);
        assert!(matches!(decode(&at_limit), Ok(Decoded::Header { .. })));
        at_limit.truncate(20);
        assert_eq!(
            decode(&at_limit).unwrap(),
            Decoded::Partial {
                total: Some(16 + V2_MAX_PAYLOAD)
            }
        );
        // Only the fixed part of a too-long header is needed to refuse it.
        let over = &v2(0x21, 0x11, &[0; V2_MAX_PAYLOAD + 1])[..16];
        assert!(malformed(decode(over)).contains("4097 bytes of addresses and TLVs"));
    }

    #[test]
    fn bad_headers_are_malformed_and_others_missing() {
        for bad in [
            v2(0x11, 0x11, &[0; 12]), // version 1 in binary
            v2(0x22, 0x11, &[0; 12]), // command 2
            v2(0x21, 0x41, &[0; 12]), // family 4
            v2(0x21, 0x11, &[0; 11]), // IPv4 with 11 address bytes
        ] {
            malformed(decode(&bad));
        }
        for bad in [
            &b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n"[..],
            b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            malformed(decode(bad));
        }
        // No CRLF within the 107 bytes the spec allows.
        let mut endless = b"PROXY UNKNOWN ".to_vec();
        endless.resize(200, b'f');
        malformed(decode(&endless));
        // The CRLF one byte too late.
        let mut late = b"PROXY UNKNOWN ".to_vec();
        late.resize(V1_MAX_LEN - 1, b'f');
        late.extend_from_slice(b"\r\n");
        malformed(decode(&late));
        late.remove(20);
        assert!(matches!(
            decode(&late),
            Ok(Decoded::Header { len: 107, .. })
        ));

        for other in [
            &b"GET / HTTP/1.1\r\n"[..],
            &[0x16, 0x03, 0x01, 0x02, 0x00],
            b"PRXY",
            b"proxy TCP4",
            b"\r\n\r\nX",
        ] {
            assert!(
                matches!(decode(other), Err(HeaderError::Missing)),
                "{other:?}"
            );
        }
        for begun in [
            &b""[..],
            b"P",
            b"PROXY",
            b"\r\n\r\n\0\r\nQ",
            b"PROXY TCP4 1.2",
            // Cut at the separator before the last port: an empty port, but unfinished.
            b"PROXY TCP4 0.0.0.0 0.0.0.0 0 ",
            b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r",
        ] {
            assert_eq!(
                decode(begun).unwrap(),
                Decoded::Partial { total: None },
                "{begun:?}"
            );
        }
    }

    #[test]
    fn local_headers_decode_without_addresses() {
        for version in [ProxyProtocolVersion::V1, ProxyProtocolVersion::V2] {
            let local = encode_local(version);
            assert_eq!(
                decode(local).unwrap(),
                Decoded::Header {
                    len: local.len(),
                    addresses: None
                },
                "{version:?}"
            );
        }
    }

    #[test]
    fn what_starts_like_a_header() {
        for header in [
            &b"PROXY "[..],
            b"PROXY TCP4 1.2.3.4",
            b"\r\n\r\n\0\r\nQUIT\n",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11",
            b"PROXY garbage",
        ] {
            assert_eq!(header_start(header), HeaderStart::Header, "{header:?}");
        }
        for undecided in [
            &b"P"[..],
            b"PROX",
            b"PROXY",
            b"\r",
            b"\r\n\r\n",
            b"\r\n\r\n\0\r\nQUIT",
        ] {
            assert_eq!(
                header_start(undecided),
                HeaderStart::Undecided,
                "{undecided:?}"
            );
        }
        for no in [
            &b""[..],
            b"PING\r\n",
            b"PROXYX",
            b"GET / HTTP/1.1\r\n",
            b"\r\n\r\n\0\r\nQUIT!",
            b"\r\n\r\n\0\r\nQUIT\r",
            &[0x16, 0x03, 0x01],
        ] {
            assert_eq!(header_start(no), HeaderStart::NotHeader, "{no:?}");
        }
    }

    #[test]
    fn trust_is_by_network_and_v4_mapped_counts_as_v4() {
        let trusted: Vec<ipnet::IpNet> =
            vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert!(is_trusted("10.2.3.4".parse().unwrap(), &trusted));
        assert!(is_trusted("::ffff:10.2.3.4".parse().unwrap(), &trusted));
        assert!(is_trusted("fd12::1".parse().unwrap(), &trusted));
        assert!(!is_trusted("11.0.0.1".parse().unwrap(), &trusted));
        assert!(!is_trusted("::ffff:11.0.0.1".parse().unwrap(), &trusted));
        assert!(!is_trusted("fe80::1".parse().unwrap(), &trusted));
        assert!(!is_trusted("10.0.0.1".parse().unwrap(), &[]));
    }

    fn socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<std::net::Ipv4Addr>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(ip.into(), port)),
            (any::<std::net::Ipv4Addr>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(ip.to_ipv6_mapped().into(), port)),
            (any::<std::net::Ipv6Addr>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(ip.into(), port)),
        ]
    }

    fn version() -> impl Strategy<Value = ProxyProtocolVersion> {
        prop_oneof![
            Just(ProxyProtocolVersion::V1),
            Just(ProxyProtocolVersion::V2)
        ]
    }

    proptest! {
        /// What is encoded decodes to the same addresses (in one family), from exactly the
        /// header's bytes, whatever follows; every strict prefix asks for more.
        #[test]
        fn encode_then_decode_round_trips(
            version in version(),
            source in socket_addr(),
            destination in socket_addr(),
            after in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let encoded = encode(version, source, destination);
            let Decoded::Header { len, addresses: Some(decoded) } = decode(&encoded).unwrap() else {
                panic!("no addresses decoded");
            };
            prop_assert_eq!(len, encoded.len());
            prop_assert_eq!(decoded.source.ip().to_canonical(), source.ip().to_canonical());
            prop_assert_eq!(decoded.destination.ip().to_canonical(), destination.ip().to_canonical());
            prop_assert_eq!(decoded.source.port(), source.port());
            prop_assert_eq!(decoded.destination.port(), destination.port());
            prop_assert_eq!(decoded.source.is_ipv4(), decoded.destination.is_ipv4());
            let both_v4 = source.ip().to_canonical().is_ipv4()
                && destination.ip().to_canonical().is_ipv4();
            prop_assert_eq!(decoded.source.is_ipv4(), both_v4);

            let mut followed = encoded.clone();
            followed.extend_from_slice(&after);
            prop_assert_eq!(decode(&followed).unwrap(), Decoded::Header { len, addresses: Some(decoded) });
            for end in 0..encoded.len() {
                let partial = decode(&encoded[..end]);
                prop_assert!(matches!(partial, Ok(Decoded::Partial { .. })), "{:?} at {}", partial, end);
            }
            prop_assert_eq!(header_start(&encoded), HeaderStart::Header);
            for end in 1..encoded.len().min(V2_SIGNATURE.len()) {
                prop_assert_ne!(header_start(&encoded[..end]), HeaderStart::NotHeader);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let result = decode(&bytes);
            // What could still become a header is never told to be none, and the reverse
            // (nothing at all is no header for the one, a header yet to come for the other).
            let start = header_start(&bytes);
            prop_assert_eq!(
                start == HeaderStart::NotHeader && !bytes.is_empty(),
                matches!(result, Err(HeaderError::Missing)),
                "{:?} {:?}", start, result
            );
        }

        #[test]
        fn arbitrary_bytes_after_a_signature_never_panic(
            v2_signature in any::<bool>(),
            rest in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut bytes = if v2_signature { V2_SIGNATURE.to_vec() } else { V1_PREFIX.to_vec() };
            bytes.extend_from_slice(&rest);
            if let Ok(Decoded::Header { len, .. }) = decode(&bytes) {
                prop_assert!(len <= bytes.len());
            }
        }
    }

    async fn connected_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.set_nodelay(true).unwrap();
        (client, server)
    }

    const GENEROUS: Duration = Duration::from_secs(10);
    const REQUEST: &[u8] = b"GET /path HTTP/1.1\r\nHost: example.com\r\n\r\n";

    /// Writes `bytes` in pieces of `piece` bytes, then closes its side.
    fn write_in_pieces(
        mut client: TcpStream,
        bytes: Vec<u8>,
        piece: usize,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            for chunk in bytes.chunks(piece) {
                client.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            client.shutdown().await.unwrap();
            // Held open until the reader is done, so that no reset cuts the bytes short.
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        })
    }

    async fn rest_of(mut server: TcpStream) -> Vec<u8> {
        let mut rest = Vec::new();
        tokio::time::timeout(GENEROUS, server.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        rest
    }

    #[tokio::test]
    async fn a_header_is_taken_and_what_follows_left_intact() {
        let source = addr("203.0.113.9:40000");
        let destination = addr("[2001:db8::10]:443");
        // Whole in one write, a byte at a time, and in 7-byte pieces.
        for piece in [usize::MAX, 1, 7] {
            for version in [ProxyProtocolVersion::V1, ProxyProtocolVersion::V2] {
                let (client, server) = connected_pair().await;
                let mut sent = encode(version, source, destination);
                sent.extend_from_slice(REQUEST);
                let writer = write_in_pieces(client, sent, piece);
                let addresses = read_header(&server, GENEROUS).await.unwrap().unwrap();
                assert_eq!(addresses.source.ip().to_canonical(), source.ip());
                assert_eq!(addresses.destination, destination);
                assert_eq!(
                    rest_of(server).await,
                    REQUEST,
                    "{version:?} in {piece}-byte pieces"
                );
                writer.await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn a_v2_header_longer_than_the_first_peek_is_taken_whole() {
        let sent_header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (addr("10.9.8.7:1234"), addr("10.0.0.1:80")),
        )
        .write_tlv(ppp::v2::Type::NoOp, &[0xee; 1500])
        .unwrap()
        .build()
        .unwrap();
        assert!(sent_header.len() > FIRST_PEEK);
        for piece in [usize::MAX, 100, 9] {
            let (client, server) = connected_pair().await;
            let mut sent = sent_header.clone();
            sent.extend_from_slice(REQUEST);
            let writer = write_in_pieces(client, sent, piece);
            let addresses = read_header(&server, GENEROUS).await.unwrap().unwrap();
            assert_eq!(addresses.source, addr("10.9.8.7:1234"));
            assert_eq!(rest_of(server).await, REQUEST, "in {piece}-byte pieces");
            writer.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_tls_hello_after_the_header_reads_as_one() {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("db.example.com").unwrap();
        let mut tls = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut hello = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut hello).unwrap();
        }

        let (client, server) = connected_pair().await;
        let mut sent = encode(
            ProxyProtocolVersion::V2,
            addr("192.0.2.5:999"),
            addr("192.0.2.1:443"),
        );
        sent.extend_from_slice(&hello);
        let writer = write_in_pieces(client, sent, 13);
        let addresses = read_header(&server, GENEROUS).await.unwrap().unwrap();
        assert_eq!(addresses.source, addr("192.0.2.5:999"));
        let mut buf = Vec::new();
        let parsed = client_hello::read(&server, &mut buf, GENEROUS)
            .await
            .unwrap();
        assert_eq!(parsed.server_name.as_deref(), Some("db.example.com"));
        assert_eq!(buf, hello);
        drop(server);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_local_header_is_taken_without_addresses() {
        let (client, server) = connected_pair().await;
        let mut sent = v2(0x20, 0x00, &[]);
        sent.extend_from_slice(REQUEST);
        let writer = write_in_pieces(client, sent, usize::MAX);
        assert_eq!(read_header(&server, GENEROUS).await.unwrap(), None);
        assert_eq!(rest_of(server).await, REQUEST);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn no_header_is_told_at_once_and_consumes_nothing() {
        let (mut client, server) = connected_pair().await;
        client.write_all(REQUEST).await.unwrap();
        let started = Instant::now();
        let result = read_header(&server, GENEROUS).await;
        assert!(matches!(result, Err(HeaderError::Missing)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        client.shutdown().await.unwrap();
        assert_eq!(rest_of(server).await, REQUEST);

        let (mut client, server) = connected_pair().await;
        client
            .write_all(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n")
            .await
            .unwrap();
        let result = read_header(&server, GENEROUS).await;
        assert!(
            matches!(result, Err(HeaderError::Malformed(_))),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_header_cut_short_times_out_or_is_closed() {
        let header = encode(
            ProxyProtocolVersion::V2,
            addr("192.0.2.5:999"),
            addr("192.0.2.1:443"),
        );

        let (mut client, server) = connected_pair().await;
        client.write_all(&header[..20]).await.unwrap();
        let started = Instant::now();
        let result = read_header(&server, Duration::from_millis(300)).await;
        assert!(matches!(result, Err(HeaderError::TimedOut)), "{result:?}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(5));

        // Closed part way, and before a byte: told at once, not at the deadline.
        for sent in [&header[..20], &b"PROXY TCP4 1.2"[..], &[]] {
            let (mut client, server) = connected_pair().await;
            client.write_all(sent).await.unwrap();
            client.shutdown().await.unwrap();
            let started = Instant::now();
            let result = read_header(&server, GENEROUS).await;
            assert!(
                matches!(result, Err(HeaderError::Closed)),
                "{result:?} after {sent:?}"
            );
            assert!(started.elapsed() < Duration::from_secs(5));
            drop(client);
        }
    }

    /// CPU time this thread has used (a `tokio::test` runs on the test's own thread).
    fn thread_cpu_time() -> Duration {
        let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
        Duration::from_nanos(text.split_whitespace().next().unwrap().parse().unwrap())
    }

    /// A peek leaves the socket readable; waiting must still sleep until more arrives.
    #[tokio::test]
    async fn waiting_for_the_rest_of_a_header_does_not_spin() {
        let (mut client, server) = connected_pair().await;
        client.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
        let cpu_before = thread_cpu_time();
        let result = read_header(&server, Duration::from_millis(600)).await;
        assert!(matches!(result, Err(HeaderError::TimedOut)), "{result:?}");
        let used = thread_cpu_time() - cpu_before;
        assert!(
            used < Duration::from_millis(150),
            "{used:?} of CPU in a 600 ms wait"
        );
        drop(client);
    }
}
