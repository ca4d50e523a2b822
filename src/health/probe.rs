//! One active check of one server: a TCP connection, or an HTTP request over it (TLS when
//! the upstream's connections are) whose response must have an expected status and body.
//! Everything is bounded: the whole check by its timeout, the response by a few KiB.

use std::fmt;
use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{CheckKind, HealthCheck};
use crate::http1::body::{Decoded, Decoder, Framing};
use crate::http1::io;
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
}

impl fmt::Display for Passed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Passed::Connected => f.write_str("connected"),
            Passed::Status(code) => write!(f, "status {code}"),
        }
    }
}

/// Checks the server at `address` once, within `check.timeout`.
pub async fn probe(
    address: SocketAddr,
    check: &HealthCheck,
    request: &[u8],
    tls: Option<&Connector>,
) -> Result<Passed, Failed> {
    let deadline = Instant::now() + check.timeout;
    tokio::time::timeout_at(deadline, attempt(address, check, request, tls, deadline))
        .await
        .unwrap_or(Err(Failed::TimedOut))
}

async fn attempt(
    address: SocketAddr,
    check: &HealthCheck,
    request: &[u8],
    tls: Option<&Connector>,
    deadline: Instant,
) -> Result<Passed, Failed> {
    let tcp = TcpStream::connect(address)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Failed::Refused,
            _ => Failed::Connect(e.to_string()),
        })?;
    if check.kind == CheckKind::Tcp {
        return Ok(Passed::Connected);
    }
    let _ = tcp.set_nodelay(true);
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

/// The request a check sends: `Connection: close`, as a check's connection is not kept.
pub fn request(check: &HealthCheck, address: SocketAddr) -> Vec<u8> {
    let host = check.host.clone().unwrap_or_else(|| address.to_string());
    format!(
        "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: fulcrum-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        check.method, check.path
    )
    .into_bytes()
}
