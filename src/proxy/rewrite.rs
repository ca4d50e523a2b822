//! The upstream side's heads: the request head Fulcrum writes for the server (whatever
//! protocol the client spoke), built straight from the parsed request with hop-by-hop
//! headers left out and forwarding headers added; and the server's response head, parsed
//! for the facts that decide what happens next. The client's response head is written by
//! the client's protocol from the same parse, without a header map in between.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{StatusCode, Version};

use crate::http::headers::{is_hop_by_hop, list, tokens};
use crate::http1::body::Framing;
use crate::http1::head::{HeadError, write_field};

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
    /// The client reached Fulcrum over TLS.
    pub https: bool,
    /// The header describing a client's certificate, which the client's own copy never
    /// passes through (on any listener: a server may sit behind plain and TLS listeners
    /// alike), and its value if a certificate was verified.
    pub client_cert: (&'a HeaderName, Option<&'a str>),
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
    let own = OwnFields::of(headers);
    let listed = &own.connection_listed;
    for (name, value) in headers {
        let replaced = name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::VIA
            || name == header::FORWARDED
            || name == X_FORWARDED_FOR
            || name == X_FORWARDED_PROTO
            || name == X_FORWARDED_HOST
            || (head.drop_expect && name == header::EXPECT)
            || is_spelling_of(name, head.client_cert.0);
        if replaced
            || is_hop_by_hop(name)
            || listed.iter().any(|t| name.as_str().eq_ignore_ascii_case(t))
        {
            continue;
        }
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }

    write_field(out, b"host", head.host.as_bytes());
    match head.framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => write_field(out, b"transfer-encoding", b"chunked"),
        Framing::Empty | Framing::UntilClose => {}
    }
    appended(
        out,
        b"x-forwarded-for",
        own.x_forwarded_for.then_some(headers),
        &X_FORWARDED_FOR,
        &[head.client_ip.as_bytes()],
    );
    let proto: &[u8] = if head.https { b"https" } else { b"http" };
    write_field(out, b"x-forwarded-proto", proto);
    if let Some(host) = head.client_host {
        write_field(out, b"x-forwarded-host", host.as_bytes());
        // The host was checked to hold only authority characters, so quoting is enough.
        appended(
            out,
            b"forwarded",
            own.forwarded.then_some(headers),
            &header::FORWARDED,
            &[
                head.forwarded_for.as_bytes(),
                b";host=\"",
                host.as_bytes(),
                b"\";proto=",
                proto,
            ],
        );
    } else {
        appended(
            out,
            b"forwarded",
            own.forwarded.then_some(headers),
            &header::FORWARDED,
            &[head.forwarded_for.as_bytes(), b";proto=", proto],
        );
    }
    appended(
        out,
        b"via",
        own.via.then_some(headers),
        &header::VIA,
        &[via(head.client_version).as_bytes()],
    );
    if let (header, Some(value)) = head.client_cert {
        write_field(out, header.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(protocol) = head.upgrade {
        write_field(out, b"connection", b"upgrade");
        write_field(out, b"upgrade", protocol.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// `name` is `header`, or `header` with `_` in place of `-`: servers that map both to one
/// variable (CGI, WSGI, PHP) would read the second as the first.
fn is_spelling_of(name: &HeaderName, header: &HeaderName) -> bool {
    let (name, header) = (name.as_str().as_bytes(), header.as_str().as_bytes());
    name.len() == header.len()
        && name
            .iter()
            .zip(header)
            .all(|(n, h)| n == h || (*n == b'_' && *h == b'-'))
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The facts of an upstream's response head that decide what happens next.
#[derive(Debug)]
pub struct ResponseFacts {
    pub status: StatusCode,
    pub head_len: usize,
    pub framing: Framing,
    /// The upstream allows its connection to carry another request.
    pub keep_alive: bool,
}

/// Few response heads have more fields than this; a larger head is parsed again with room.
const COMMON_FIELDS: usize = 32;
const MAX_FIELDS: usize = 256;

/// Reads an upstream's response head at the front of `buf` (`None` while incomplete) and
/// shows it, parsed, to `inspect` before returning its facts. The framing follows RFC 9112
/// §6.3; a head with both `Content-Length` and `Transfer-Encoding`, or conflicting lengths,
/// is refused.
pub(super) fn parse_response_head(
    buf: &[u8],
    head_request: bool,
    inspect: impl FnOnce(&httparse::Response<'_, '_>, &ResponseFacts),
) -> Result<Option<ResponseFacts>, HeadError> {
    with_response(buf, |resp, head_len| {
        let facts = facts(resp, head_len, head_request)?;
        inspect(resp, &facts);
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

/// What the upstream head needs to know of the client's own fields, found in one pass
/// over them rather than a lookup (a hash and a probe) each.
struct OwnFields<'h> {
    /// The header names the client's `Connection` headers list, to be left out.
    connection_listed: Vec<&'h str>,
    x_forwarded_for: bool,
    forwarded: bool,
    via: bool,
}

impl<'h> OwnFields<'h> {
    fn of(headers: &'h HeaderMap) -> Self {
        let mut own = OwnFields {
            connection_listed: Vec::new(),
            x_forwarded_for: false,
            forwarded: false,
            via: false,
        };
        for (name, value) in headers {
            if name == header::CONNECTION {
                own.connection_listed.extend(tokens(value));
            } else if name == X_FORWARDED_FOR {
                own.x_forwarded_for = true;
            } else if name == header::FORWARDED {
                own.forwarded = true;
            } else if name == header::VIA {
                own.via = true;
            }
        }
        own
    }
}

/// Writes `name: <earlier values>, <parts of the new one>`; the earlier values are those
/// of `key` in `headers`, if the client sent any (`None`: it sent none).
fn appended(
    out: &mut Vec<u8>,
    name: &[u8],
    headers: Option<&HeaderMap>,
    key: &HeaderName,
    new: &[&[u8]],
) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    for old in headers.into_iter().flat_map(|h| h.get_all(key)) {
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
        Version::HTTP_2 => "2 fulcrum",
        _ => "1.1 fulcrum",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client's own forwarding fields are extended, however many it sent, and the
    /// fields its `Connection` headers list stay behind, however many of those it sent.
    #[test]
    fn forwarding_fields_grow_and_connection_listed_fields_stay_behind() {
        let req = http::Request::get("/a?b=1")
            .header("connection", "x-one")
            .header("connection", "keep-alive, X-Two")
            .header("x-one", "1")
            .header("x-two", "2")
            .header("x-kept", "3")
            .header("x-forwarded-for", "203.0.113.1")
            .header("x-forwarded-for", "203.0.113.2")
            .header("forwarded", "for=203.0.113.1")
            .header("via", "1.0 edge")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let host = HeaderValue::from_static("front.example");
        let cert_header = HeaderName::from_static("x-client-cert");
        let head = UpstreamHead {
            client_ip: "192.0.2.7",
            forwarded_for: "for=192.0.2.7",
            client_host: Some(&host),
            host: &host,
            client_version: Version::HTTP_11,
            framing: Framing::Empty,
            upgrade: None,
            drop_expect: false,
            https: false,
            client_cert: (&cert_header, None),
        };
        let mut out = Vec::new();
        write_request(&mut out, &parts, &head);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(lines[0], "GET /a?b=1 HTTP/1.1");
        for line in [
            "x-kept: 3",
            "host: front.example",
            "x-forwarded-for: 203.0.113.1, 203.0.113.2, 192.0.2.7",
            "x-forwarded-proto: http",
            "x-forwarded-host: front.example",
            "forwarded: for=203.0.113.1, for=192.0.2.7;host=\"front.example\";proto=http",
            "via: 1.0 edge, 1.1 fulcrum",
        ] {
            assert!(lines.contains(&line), "{line:?} missing from {text:?}");
        }
        for gone in ["connection", "x-one", "x-two", "keep-alive"] {
            assert!(
                !lines.iter().any(|l| l.starts_with(&format!("{gone}:"))),
                "{gone} was forwarded: {text:?}"
            );
        }
        assert!(text.ends_with("\r\n\r\n"));
        // A client without forwarding fields gets only Fulcrum's.
        let (parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
        let mut out = Vec::new();
        write_request(&mut out, &parts, &head);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("\r\nx-forwarded-for: 192.0.2.7\r\n"),
            "{text:?}"
        );
        assert!(text.contains("\r\nvia: 1.1 fulcrum\r\n"), "{text:?}");
    }
}
