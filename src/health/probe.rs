//! One active check of one server: a TCP connection, or an HTTP request over it (TLS when
//! the upstream's connections are) whose response must have an expected status and body,
//! or a DNS query over UDP that must be answered. Everything is bounded: the whole check by
//! its timeout, the response by a few KiB.

use std::fmt;
use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{CheckKind, HealthCheck, ProxyProtocolVersion};
use crate::http1::body::{Decoded, Decoder, Framing};
use crate::http1::io;
use crate::proxy_protocol;
use crate::tls::client::Connector;
use crate::tls::handshake::{self, HandshakeError};
use crate::transport::Stream;

/// How much of a response head is read at most.
const HEAD_LIMIT: usize = 16 * 1024;
/// How much of a response body `expect_body` is looked for in.
pub const BODY_LIMIT: usize = 16 * 1024;

/// Why a check failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failed {
    TimedOut,
    Refused,
    Connect(String),
    Tls(String),
    Io(String),
    /// Closed or malformed before a whole response head.
    Response(String),
    Status(u16),
    BodyMismatch,
}

/// The DNS header's QR bit (in its third byte): set in a response.
const DNS_QR: u8 = 0x80;
/// A DNS response over UDP is at most this long without EDNS, which the query does not
/// offer.
const DNS_REPLY_MAX: usize = 512;

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failed::TimedOut => f.write_str("timed out"),
            Failed::Refused => f.write_str("connection refused"),
            Failed::Connect(e) => write!(f, "cannot connect: {e}"),
            Failed::Tls(e) => write!(f, "TLS handshake failed: {e}"),
            Failed::Io(e) => write!(f, "connection failed: {e}"),
            Failed::Response(e) => write!(f, "bad response: {e}"),
            Failed::Status(code) => write!(f, "unexpected status {code}"),
            Failed::BodyMismatch => f.write_str("body does not contain expect_body"),
        }
    }
}

/// What a passing check saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Passed {
    Connected,
    Status(u16),
    /// A DNS answer, with its response code (0: no error, 3: no such name, …).
    Answered(u8),
}

impl fmt::Display for Passed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Passed::Connected => f.write_str("connected"),
            Passed::Status(code) => write!(f, "status {code}"),
            Passed::Answered(rcode) => write!(f, "answered (rcode {rcode})"),
        }
    }
}

/// Checks the server at `address` once, within `check.timeout`. `proxy_header`: the
/// upstream's PROXY protocol version, for a server that wants every connection to open with
/// a header; a check sends it one for itself (`LOCAL`), as HAProxy's `check-send-proxy`.
pub async fn probe(
    address: SocketAddr,
    check: &HealthCheck,
    request: &[u8],
    tls: Option<&Connector>,
    proxy_header: Option<ProxyProtocolVersion>,
) -> Result<Passed, Failed> {
    let deadline = Instant::now() + check.timeout;
    let attempt = attempt(address, check, request, tls, proxy_header, deadline);
    tokio::time::timeout_at(deadline, attempt)
        .await
        .unwrap_or(Err(Failed::TimedOut))
}

async fn attempt(
    address: SocketAddr,
    check: &HealthCheck,
    request: &[u8],
    tls: Option<&Connector>,
    proxy_header: Option<ProxyProtocolVersion>,
    deadline: Instant,
) -> Result<Passed, Failed> {
    if check.kind == CheckKind::Dns {
        return dns(address, request).await;
    }
    let mut tcp = TcpStream::connect(address)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Failed::Refused,
            _ => Failed::Connect(e.to_string()),
        })?;
    let _ = tcp.set_nodelay(true);
    if let Some(version) = proxy_header {
        // The outer timeout bounds this write.
        tcp.write_all(proxy_protocol::encode_local(version))
            .await
            .map_err(|e| Failed::Io(e.to_string()))?;
    }
    if check.kind == CheckKind::Tcp {
        return Ok(Passed::Connected);
    }
    let stream = match tls {
        None => Stream::Plain(tcp),
        Some(tls) => {
            let left = deadline.saturating_duration_since(Instant::now());
            match handshake::connect(tcp, tls.config.clone(), tls.name_for(address), left).await {
                Ok(session) => Stream::from(session),
                Err(HandshakeError::TimedOut(_)) => return Err(Failed::TimedOut),
                Err(e) => return Err(Failed::Tls(e.to_string())),
            }
        }
    };
    // The outer timeout bounds every wait; these only have to be longer.
    let idle = check.timeout;
    io::write_all(&stream, request, idle)
        .await
        .map_err(|e| Failed::Io(e.to_string()))?;
    let mut buf = BytesMut::with_capacity(4096);
    let (status, framing, head_len) = loop {
        if let Some(head) = parse_head(&buf, check)? {
            break head;
        }
        if buf.len() >= HEAD_LIMIT {
            return Err(Failed::Response(format!(
                "response head longer than {HEAD_LIMIT} bytes"
            )));
        }
        match io::read_some(&stream, &mut buf, idle).await {
            Ok(0) => {
                return Err(Failed::Response(
                    "connection closed before a whole response head".into(),
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(Failed::Io(e.to_string())),
        }
    };
    if !check
        .expect_status
        .iter()
        .any(|&(low, high)| (low..=high).contains(&status))
    {
        return Err(Failed::Status(status));
    }
    let Some(expected) = &check.expect_body else {
        return Ok(Passed::Status(status));
    };
    let _ = buf.split_to(head_len);
    let body = read_body(&stream, &mut buf, framing, idle).await?;
    if memchr::memmem::find(&body, expected.as_bytes()).is_some() {
        Ok(Passed::Status(status))
    } else {
        Err(Failed::BodyMismatch)
    }
}

/// The status, body framing and head length of the response at the start of `buf`, once
/// it holds the whole head. Interim (1xx) responses are not expected: the request asks
/// for none.
fn parse_head(buf: &[u8], check: &HealthCheck) -> Result<Option<(u16, Framing, usize)>, Failed> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Failed::Response(e.to_string())),
    };
    let status = response.code.unwrap_or(0);
    let mut framing = Framing::UntilClose;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            framing = Framing::Chunked;
        } else if h.name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            let length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| Failed::Response("invalid Content-Length".into()))?;
            framing = Framing::Length(length);
        }
    }
    if check.method == http::Method::HEAD || status == 204 || status == 304 {
        framing = Framing::Empty;
    }
    Ok(Some((status, framing, head_len)))
}

/// Up to `BODY_LIMIT` bytes of the body, decoded.
async fn read_body(
    stream: &Stream,
    buf: &mut BytesMut,
    framing: Framing,
    idle: std::time::Duration,
) -> Result<Vec<u8>, Failed> {
    let mut decoder = Decoder::new(framing);
    let mut body = Vec::new();
    while body.len() < BODY_LIMIT {
        match decoder.decode(buf) {
            Ok(Decoded::Data(n)) => {
                let take = n.min(BODY_LIMIT - body.len());
                body.extend_from_slice(&buf[..take]);
                let _ = buf.split_to(n);
            }
            Ok(Decoded::End) => break,
            Ok(Decoded::NeedMore) => match io::read_some(stream, buf, idle).await {
                Ok(0) if decoder.until_close() => break,
                Ok(0) => return Err(Failed::Response("connection closed mid-body".into())),
                Ok(_) => {}
                Err(e) => return Err(Failed::Io(e.to_string())),
            },
            Err(e) => return Err(Failed::Response(e.to_string())),
        }
    }
    Ok(body)
}

/// Sends `query` (see [`dns_query`]) with a fresh random id from a socket of its own and
/// waits for a response with that id (its response code aside: a server that says it has
/// no such name is up and answering). The caller bounds the wait.
async fn dns(address: SocketAddr, query: &[u8]) -> Result<Passed, Failed> {
    let bind: SocketAddr = if address.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| Failed::Connect(e.to_string()))?;
    socket
        .connect(address)
        .await
        .map_err(|e| Failed::Connect(e.to_string()))?;
    let mut message = [0u8; DNS_QUERY_MAX];
    let len = query.len().min(DNS_QUERY_MAX);
    let message = &mut message[..len];
    message.copy_from_slice(&query[..len]);
    let id = fastrand::u16(..);
    message[..2].copy_from_slice(&id.to_be_bytes());
    socket.send(message).await.map_err(dns_error)?;
    let mut reply = [0u8; DNS_REPLY_MAX];
    loop {
        // A truncated reply (longer than 512 bytes) still has its header.
        let n = socket.recv(&mut reply).await.map_err(dns_error)?;
        if let Some(rcode) = dns_answer(&reply[..n], id) {
            return Ok(Passed::Answered(rcode));
        }
        // Not an answer to this query (a late one to an earlier check, say): wait on.
    }
}

fn dns_error(e: std::io::Error) -> Failed {
    match e.kind() {
        // ICMP port unreachable: nothing listens there.
        std::io::ErrorKind::ConnectionRefused => Failed::Refused,
        _ => Failed::Io(e.to_string()),
    }
}

/// The longest query [`dns_query`] writes: a header, a name of at most 255 bytes, type and
/// class.
const DNS_QUERY_MAX: usize = 12 + 255 + 4;

/// A DNS query for `name` (type A, class IN, recursion desired), with id 0: each check
/// writes a random id over its first two bytes. `name` is a validated DNS name (`.` for
/// the root); a label that is too long would be cut, never written malformed.
pub fn dns_query(name: &str) -> Vec<u8> {
    let mut query = Vec::with_capacity(DNS_QUERY_MAX);
    // Id 0; flags: RD; one question, no other records.
    query.extend_from_slice(&[0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    let bare = name.strip_suffix('.').unwrap_or(name);
    for label in bare.split('.').filter(|l| !l.is_empty()) {
        let label = &label.as_bytes()[..label.len().min(63)];
        // The name, its final zero byte included, fits in 255 bytes.
        if query.len() - 12 + 1 + label.len() + 1 > 255 {
            break;
        }
        query.push(label.len() as u8);
        query.extend_from_slice(label);
    }
    query.push(0);
    // Type A, class IN.
    query.extend_from_slice(&[0, 1, 0, 1]);
    query
}

/// The response code of `reply` if it is a response (QR set) to the query with `id`.
fn dns_answer(reply: &[u8], id: u16) -> Option<u8> {
    if reply.len() < 12 || reply[..2] != id.to_be_bytes() || reply[2] & DNS_QR == 0 {
        return None;
    }
    Some(reply[3] & 0x0f)
}

/// What a check sends: for an HTTP check, the request, with `Connection: close`, as a
/// check's connection is not kept; for a DNS check, the query (see [`dns_query`]).
pub fn request(check: &HealthCheck, address: SocketAddr) -> Vec<u8> {
    if check.kind == CheckKind::Dns {
        return dns_query(&check.query);
    }
    let host = check.host.clone().unwrap_or_else(|| address.to_string());
    format!(
        "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: fulcrum-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        check.method, check.path
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};

    #[test]
    fn the_query_is_a_dns_message_asking_for_the_name() {
        for (name, expected) in [
            ("health.example.com", "health.example.com."),
            ("health.example.com.", "health.example.com."),
            (".", "."),
            ("_svc.x-y.test", "_svc.x-y.test."),
        ] {
            let bytes = dns_query(name);
            let message = Message::from_vec(&bytes).unwrap();
            assert_eq!(message.metadata.message_type, MessageType::Query);
            assert!(message.metadata.recursion_desired);
            assert_eq!(message.queries.len(), 1);
            let query = &message.queries[0];
            assert_eq!(query.name(), &Name::from_ascii(expected).unwrap());
            assert_eq!(query.query_type(), RecordType::A);
        }
    }

    #[test]
    fn a_name_too_long_is_cut_never_malformed() {
        let long = [
            "a".repeat(70),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63),
            "e".repeat(63),
        ]
        .join(".");
        let bytes = dns_query(&long);
        assert!(bytes.len() <= DNS_QUERY_MAX);
        Message::from_vec(&bytes).unwrap();
    }

    #[test]
    fn only_a_response_with_the_query_id_passes_whatever_its_code() {
        let mut response = Message::new(0x1234, MessageType::Response, OpCode::Query);
        response.metadata.response_code = ResponseCode::NXDomain;
        let bytes = response.to_vec().unwrap();
        assert_eq!(dns_answer(&bytes, 0x1234), Some(3));
        assert_eq!(dns_answer(&bytes, 0x1235), None);
        let query = Message::new(0x1234, MessageType::Query, OpCode::Query);
        assert_eq!(dns_answer(&query.to_vec().unwrap(), 0x1234), None);
        assert_eq!(dns_answer(&bytes[..11], 0x1234), None);
    }

    fn dns_check() -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Dns,
            interval: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_millis(500),
            jitter: std::time::Duration::ZERO,
            rise: 1,
            fall: 1,
            method: http::Method::GET,
            path: "/".into(),
            host: None,
            expect_status: vec![(200, 399)],
            expect_body: None,
            query: "health.test".into(),
        }
    }

    #[tokio::test]
    async fn a_dns_server_that_answers_passes_and_a_silent_or_closed_one_fails() {
        let check = dns_check();
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = server.local_addr().unwrap();
        let request = request(&check, address);
        let answering = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            // First a reply with another id, which must not count; then the answer.
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            let query = Message::from_vec(&buf[..n]).unwrap();
            let other = Message::new(
                query.metadata.id.wrapping_add(1),
                MessageType::Response,
                OpCode::Query,
            );
            server
                .send_to(&other.to_vec().unwrap(), from)
                .await
                .unwrap();
            let mut answer = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
            answer.metadata.response_code = ResponseCode::ServFail;
            answer.add_query(query.queries[0].clone());
            server
                .send_to(&answer.to_vec().unwrap(), from)
                .await
                .unwrap();
            server
        });
        let passed = probe(address, &check, &request, None, None).await;
        assert_eq!(passed, Ok(Passed::Answered(2)));
        let server = answering.await.unwrap();
        // Bound, never answering.
        assert_eq!(
            probe(address, &check, &request, None, None).await,
            Err(Failed::TimedOut)
        );
        drop(server);
        // Nothing bound: ICMP port unreachable.
        assert_eq!(
            probe(address, &check, &request, None, None).await,
            Err(Failed::Refused)
        );
    }
}
