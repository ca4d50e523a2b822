//! The heads Fulcrum writes on each side of an HTTP/1.1 exchange, built straight from the
//! parsed ones: hop-by-hop headers left out, forwarding headers added, framing set for the
//! next hop. No header map is rebuilt on the way, which keeps per-request work small.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{StatusCode, Version};

use crate::http::headers::{is_hop_by_hop, is_hop_by_hop_name, tokens};
use crate::http1::body::Framing;
use crate::http1::head::HeadError;

/// What the upstream request head carries beside the client's own headers.
pub(super) struct UpstreamHead<'a> {
    /// The client's address as text, and as RFC 7239 `for=` wants it (IPv6 quoted).
    pub client_ip: &'a str,
    pub forwarded_for: &'a str,
    /// The host the client asked for, if it named one.
    pub client_host: Option<&'a HeaderValue>,
    /// The `Host` to send: the client's, or the server's own address.
    pub host: &'a HeaderValue,
    pub client_version: Version,
    pub framing: Framing,
    /// The protocol to upgrade to, when the upgrade is tunnelled.
    pub upgrade: Option<&'a HeaderValue>,
    /// `Expect: 100-continue` was answered by Fulcrum and is not passed on.
    pub drop_expect: bool,
}

/// Writes the request line in origin form and the head for the upstream, ending with the
/// empty line.
pub(super) fn write_request(out: &mut Vec<u8>, parts: &Parts, head: &UpstreamHead<'_>) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");

    let headers = &parts.headers;
    let listed = connection_listed(headers);
    for (name, value) in headers {
        let replaced = name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::VIA
            || name == header::FORWARDED
            || name == X_FORWARDED_FOR
            || name == X_FORWARDED_PROTO
            || name == X_FORWARDED_HOST
            || (head.drop_expect && name == header::EXPECT);
        if replaced
            || is_hop_by_hop(name)
            || listed.iter().any(|t| name.as_str().eq_ignore_ascii_case(t))
        {
            continue;
        }
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }

    line(out, b"host", head.host.as_bytes());
    match head.framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => line(out, b"transfer-encoding", b"chunked"),
        Framing::Empty | Framing::UntilClose => {}
    }
    appended(
        out,
        b"x-forwarded-for",
        headers,
        &X_FORWARDED_FOR,
        &[head.client_ip.as_bytes()],
    );
    line(out, b"x-forwarded-proto", b"http");
    if let Some(host) = head.client_host {
        line(out, b"x-forwarded-host", host.as_bytes());
        // The host was checked to hold only authority characters, so quoting is enough.
        appended(
            out,
            b"forwarded",
            headers,
            &header::FORWARDED,
            &[
                head.forwarded_for.as_bytes(),
                b";host=\"",
                host.as_bytes(),
                b"\";proto=http",
            ],
        );
    } else {
        appended(
            out,
            b"forwarded",
            headers,
            &header::FORWARDED,
            &[head.forwarded_for.as_bytes(), b";proto=http"],
        );
    }
    appended(
        out,
        b"via",
        headers,
        &header::VIA,
        &[via(head.client_version).as_bytes()],
    );
    if let Some(protocol) = head.upgrade {
        line(out, b"connection", b"upgrade");
        line(out, b"upgrade", protocol.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The facts of an upstream's response head that decide what happens next.
#[derive(Debug)]
pub(super) struct ResponseFacts {
    pub status: StatusCode,
    pub head_len: usize,
    pub framing: Framing,
    /// The upstream allows its connection to carry another request.
    pub keep_alive: bool,
}

/// How the client's response head is to be written.
pub(super) struct ClientHead<'a> {
    /// Re-frame a body of unknown length as chunked.
    pub chunked: bool,
    /// The `Connection` header to add, if any (`close`, `keep-alive`, `upgrade`).
    pub connection: Option<&'static str>,
    /// Pass on the upstream's `Upgrade` header (on a `101`).
    pub upgrade: bool,
    /// A `Set-Cookie` of Fulcrum's own to add (sticky sessions).
    pub set_cookie: Option<&'a [u8]>,
}

/// Few response heads have more fields than this; a larger head is parsed again with room.
const COMMON_FIELDS: usize = 32;
const MAX_FIELDS: usize = 256;

/// Reads an upstream's response head at the front of `buf` (`None` while incomplete) and,
/// if `plan` asks for it, writes the client's head into `out` in the same pass. The framing
/// follows RFC 9112 §6.3; a head with both `Content-Length` and `Transfer-Encoding`, or
/// conflicting lengths, is refused.
pub(super) fn relay_response_head<'c>(
    buf: &[u8],
    head_request: bool,
    out: &mut Vec<u8>,
    plan: impl FnOnce(&ResponseFacts) -> Option<ClientHead<'c>>,
) -> Result<Option<ResponseFacts>, HeadError> {
    with_response(buf, |resp, head_len| {
        let facts = facts(resp, head_len, head_request)?;
        if let Some(client) = plan(&facts) {
            write_response(out, resp, &client);
        }
        Ok(facts)
    })
}

fn facts(
    resp: &httparse::Response<'_, '_>,
    head_len: usize,
    head_request: bool,
) -> Result<ResponseFacts, HeadError> {
    let status = StatusCode::from_u16(resp.code.unwrap_or(0))
        .map_err(|_| HeadError::Invalid("invalid response status"))?;
    let mut length: Option<u64> = None;
    let mut transfer_encoding: Option<&[u8]> = None;
    let mut close = resp.version != Some(1);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(h.value)
                .ok_or(HeadError::Invalid("invalid Content-Length in the response"))?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Invalid(
                    "conflicting Content-Length in the response",
                ));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= list(h.value).any(|t| t.eq_ignore_ascii_case("close"));
        }
    }
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = match (transfer_encoding, length) {
        _ if bodiless => Framing::Empty,
        (Some(_), Some(_)) => {
            return Err(HeadError::Invalid(
                "response has both Content-Length and Transfer-Encoding",
            ));
        }
        (Some(te), None) => {
            if list(te)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
            {
                Framing::Chunked
            } else {
                Framing::UntilClose
            }
        }
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::UntilClose,
    };
    Ok(ResponseFacts {
        status,
        head_len,
        framing,
        keep_alive: !close,
    })
}

/// Writes the client's response head, ending with the empty line.
fn write_response(out: &mut Vec<u8>, resp: &httparse::Response<'_, '_>, client: &ClientHead<'_>) {
    let status =
        StatusCode::from_u16(resp.code.unwrap_or(500)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    // The upstream's own reason phrase, if it gave one.
    let reason = resp
        .reason
        .filter(|r| !r.is_empty())
        .or(status.canonical_reason())
        .unwrap_or("");
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");

    // Names the upstream's `Connection` header lists are hop-by-hop too.
    let mut listed: [&str; 16] = [""; 16];
    let mut n_listed = 0;
    for h in resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
    {
        for t in list(h.value) {
            if n_listed < listed.len() {
                listed[n_listed] = t;
                n_listed += 1;
            }
        }
    }
    let mut via = None;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"via") {
            via.get_or_insert_with(Vec::new).push(h.value);
        } else if client.upgrade && name.eq_ignore_ascii_case(b"upgrade") {
            line(out, b"upgrade", h.value);
        } else if !is_hop_by_hop_name(name)
            && !listed[..n_listed]
                .iter()
                .any(|t| h.name.eq_ignore_ascii_case(t))
        {
            line(out, name, h.value);
        }
    }
    out.extend_from_slice(b"via: ");
    for old in via.into_iter().flatten() {
        out.extend_from_slice(old);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(b"1.1 fulcrum\r\n");
    if client.chunked {
        line(out, b"transfer-encoding", b"chunked");
    }
    if let Some(connection) = client.connection {
        line(out, b"connection", connection.as_bytes());
    }
    if let Some(cookie) = client.set_cookie {
        line(out, b"set-cookie", cookie);
    }
    out.extend_from_slice(b"\r\n");
}

/// The trimmed, non-empty items of a comma-separated header value.
fn list(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Parses a response head with room for a common number of fields, again with more room if
/// that was not enough, and hands the parsed head and its length to `f`.
fn with_response<R>(
    buf: &[u8],
    f: impl FnOnce(&httparse::Response<'_, '_>, usize) -> Result<R, HeadError>,
) -> Result<Option<R>, HeadError> {
    let mut small = [httparse::EMPTY_HEADER; COMMON_FIELDS];
    let mut resp = httparse::Response::new(&mut small);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => return f(&resp, len).map(Some),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {}
        Err(_) => return Err(HeadError::Invalid("malformed response head")),
    }
    let mut large = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut large);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => f(&resp, len).map(Some),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders),
        Err(_) => Err(HeadError::Invalid("malformed response head")),
    }
}

/// Digits only, or a list of equal digit strings (`5, 5`).
fn parse_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if length.is_some_and(|l| l != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

/// The header names the client's `Connection` header lists, to be left out.
fn connection_listed(headers: &HeaderMap) -> Vec<&str> {
    let mut listed = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        listed.extend(tokens(value));
    }
    listed
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes `name: <earlier values>, <parts of the new one>`.
fn appended(out: &mut Vec<u8>, name: &[u8], headers: &HeaderMap, key: &HeaderName, new: &[&[u8]]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    for old in headers.get_all(key) {
        out.extend_from_slice(old.as_bytes());
        out.extend_from_slice(b", ");
    }
    for part in new {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\r\n");
}

fn via(version: Version) -> &'static str {
    match version {
        Version::HTTP_10 => "1.0 fulcrum",
        _ => "1.1 fulcrum",
    }
}
