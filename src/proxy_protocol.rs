//! (temporary, replaced by the "hello" helper's module at the merge) The PROXY protocol
//! (v1 text, v2 binary): reading a header at the start of a connection, writing one.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub use crate::config::ProxyProtocolVersion;
use ppp::PartialResult;

/// The addresses a header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the connection does not begin with a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("no whole PROXY protocol header in time")]
    TimedOut,
    #[error("the client closed before a whole PROXY protocol header")]
    Closed,
    #[error("{0}")]
    Io(std::io::Error),
}

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const MAX_PEEK: usize = 16 + 4096;

pub async fn read_header(
    stream: &tokio::net::TcpStream,
    within: Duration,
) -> Result<Option<Addresses>, HeaderError> {
    tokio::time::timeout(within, read_header_now(stream))
        .await
        .unwrap_or(Err(HeaderError::TimedOut))
}

async fn read_header_now(stream: &tokio::net::TcpStream) -> Result<Option<Addresses>, HeaderError> {
    let mut buf = vec![0u8; MAX_PEEK];
    let mut seen = 0;
    loop {
        stream.readable().await.map_err(HeaderError::Io)?;
        let n = match stream.peek(&mut buf).await {
            Ok(0) => return Err(HeaderError::Closed),
            Ok(n) => n,
            Err(e) => return Err(HeaderError::Io(e)),
        };
        if n == seen {
            // Nothing new yet: wait a little rather than spin on the same bytes.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        seen = n;
        let bytes = &buf[..n];
        if !starts_like_header(bytes) && n >= 5 {
            return Err(HeaderError::Missing);
        }
        let parsed = ppp::HeaderResult::parse(bytes);
        if parsed.is_incomplete() {
            if n == MAX_PEEK {
                return Err(HeaderError::Malformed("too long".into()));
            }
            continue;
        }
        let (len, addresses) = match parsed {
            ppp::HeaderResult::V1(Ok(h)) => (
                h.header.len(),
                match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => Some(Addresses {
                        source: (a.source_address, a.source_port).into(),
                        destination: (a.destination_address, a.destination_port).into(),
                    }),
                    ppp::v1::Addresses::Tcp6(a) => Some(Addresses {
                        source: (a.source_address, a.source_port).into(),
                        destination: (a.destination_address, a.destination_port).into(),
                    }),
                    ppp::v1::Addresses::Unknown => None,
                },
            ),
            ppp::HeaderResult::V2(Ok(h)) => (
                h.header.len(),
                match (h.command, h.addresses) {
                    (ppp::v2::Command::Local, _) => None,
                    (_, ppp::v2::Addresses::IPv4(a)) => Some(Addresses {
                        source: (a.source_address, a.source_port).into(),
                        destination: (a.destination_address, a.destination_port).into(),
                    }),
                    (_, ppp::v2::Addresses::IPv6(a)) => Some(Addresses {
                        source: (a.source_address, a.source_port).into(),
                        destination: (a.destination_address, a.destination_port).into(),
                    }),
                    _ => None,
                },
            ),
            ppp::HeaderResult::V1(Err(e)) => return Err(HeaderError::Malformed(e.to_string())),
            ppp::HeaderResult::V2(Err(e)) => return Err(HeaderError::Malformed(e.to_string())),
        };
        let mut consumed = vec![0u8; len];
        let mut got = 0;
        while got < len {
            stream.readable().await.map_err(HeaderError::Io)?;
            match stream.try_read(&mut consumed[got..]) {
                Ok(0) => return Err(HeaderError::Closed),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(HeaderError::Io(e)),
            }
        }
        return Ok(addresses);
    }
}

pub fn encode(
    version: ProxyProtocolVersion,
    source: SocketAddr,
    destination: SocketAddr,
) -> Vec<u8> {
    let (source, destination) = match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => {
            (source, destination)
        }
        _ => (to_v6(source), to_v6(destination)),
    };
    match version {
        ProxyProtocolVersion::V1 => ppp::v1::Addresses::from((source, destination))
            .to_string()
            .into_bytes(),
        ProxyProtocolVersion::V2 => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (source, destination),
        )
        .build()
        .expect("a header of two addresses fits"),
    }
}

fn to_v6(address: SocketAddr) -> SocketAddr {
    match address.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), address.port()),
        IpAddr::V6(_) => address,
    }
}

pub fn starts_like_header(first: &[u8]) -> bool {
    if first.len() < 5 {
        return false;
    }
    let v1 = b"PROXY ";
    let n = first.len().min(v1.len());
    let m = first.len().min(V2_SIGNATURE.len());
    first[..n] == v1[..n] || first[..m] == V2_SIGNATURE[..m]
}

pub fn is_trusted(ip: IpAddr, trusted: &[ipnet::IpNet]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    trusted.iter().any(|net| net.contains(&ip))
}
