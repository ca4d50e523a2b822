//! Strict request checks done before anything is forwarded: framing that two parsers could
//! read differently, a missing or doubled Host, and the configured size limits.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, StatusCode, Version};

use crate::config::Limits;

/// Why a request is refused: the status and a short text safe to show the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    pub status: StatusCode,
    pub reason: &'static str,
}

const fn bad(reason: &'static str) -> Reject {
    Reject {
        status: StatusCode::BAD_REQUEST,
        reason,
    }
}

/// Headers that are meaningful on one HTTP/1 connection only and are malformed in HTTP/2
/// (RFC 9113 §8.2.2).
const H2_CONNECTION_HEADERS: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// Checks a request and returns the host it is for (from the URI authority or Host), as
/// a header value whose text holds only authority characters.
pub fn check<B>(req: &Request<B>, limits: &Limits) -> Result<Option<HeaderValue>, Reject> {
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len())
        + req.uri().authority().map_or(0, |a| a.as_str().len());
    if uri_len > limits.max_uri_bytes {
        return Err(Reject {
            status: StatusCode::URI_TOO_LONG,
            reason: "request target is too long",
        });
    }
    let headers = req.headers();
    if req.version() == Version::HTTP_2 {
        check_h2_headers(headers)?;
    }
    check_framing(headers, req.version())?;
    if let Some(len) = content_length(headers)?
        && len > limits.max_body_bytes
    {
        return Err(Reject {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            reason: "request body is larger than allowed",
        });
    }
    host(req)
}

fn check_h2_headers(headers: &HeaderMap) -> Result<(), Reject> {
    if H2_CONNECTION_HEADERS
        .iter()
        .any(|h| headers.contains_key(*h))
    {
        return Err(bad("connection-specific header in an HTTP/2 request"));
    }
    if let Some(te) = headers.get(header::TE)
        && te != "trailers"
    {
        return Err(bad("TE other than \"trailers\" in an HTTP/2 request"));
    }
    Ok(())
}

/// Only one way to find where a body ends is allowed: `Content-Length`, or
/// `Transfer-Encoding: chunked` alone.
fn check_framing(headers: &HeaderMap, version: Version) -> Result<(), Reject> {
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = te.next() {
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err(bad("both Content-Length and Transfer-Encoding"));
        }
        if version == Version::HTTP_10 {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        // Exactly `chunked`: anything else (`chunked\t`, `gzip, chunked`, a second header)
        // is a body some servers would frame differently.
        if te.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(bad("Transfer-Encoding other than a single \"chunked\""));
        }
    }
    Ok(())
}

/// The declared body length; values must be plain digits and all the same.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Reject> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
                return Err(bad("invalid Content-Length"));
            }
            let n: u64 = std::str::from_utf8(part)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(bad("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(length)
}

fn host<B>(req: &Request<B>) -> Result<Option<HeaderValue>, Reject> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let header_host = hosts.next();
    if hosts.next().is_some() {
        return Err(bad("more than one Host header"));
    }
    if req.version() == Version::HTTP_11 && header_host.is_none() {
        return Err(bad("HTTP/1.1 request without a Host header"));
    }
    if let Some(h) = header_host
        && !h.to_str().is_ok_and(is_authority)
    {
        return Err(bad("invalid Host header"));
    }
    let Some(uri_host) = req.uri().authority().map(|a| a.as_str()) else {
        // Cloning a parsed header value shares its bytes; nothing is copied.
        return Ok(header_host.cloned());
    };
    if header_host.is_some_and(|h| !h.as_bytes().eq_ignore_ascii_case(uri_host.as_bytes())) {
        return Err(bad("Host header does not match the request target"));
    }
    if !is_authority(uri_host) {
        return Err(bad("invalid authority in the request target"));
    }
    Ok(HeaderValue::from_str(uri_host).ok())
}

/// `host[:port]` with the characters a registered name, IPv4 or bracketed IPv6 may hold.
fn is_authority(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_header_bytes: 16384,
            max_headers: 100,
            max_uri_bytes: 100,
            max_body_bytes: 1000,
        }
    }

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/x");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let l = limits();
        let cases: &[&[(&str, &str)]] = &[
            &[
                ("host", "a"),
                ("content-length", "5"),
                ("transfer-encoding", "chunked"),
            ],
            &[("host", "a"), ("transfer-encoding", "chunked\t")],
            &[("host", "a"), ("transfer-encoding", "gzip, chunked")],
            &[
                ("host", "a"),
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            &[
                ("host", "a"),
                ("content-length", "5"),
                ("content-length", "6"),
            ],
            &[("host", "a"), ("content-length", "")],
            &[("host", "a"), ("content-length", "+5")],
            &[("host", "a"), ("host", "b")],
            &[],
            &[("host", "a\"b")],
        ];
        for headers in cases {
            assert_eq!(
                check(&req(headers), &l).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{headers:?}"
            );
        }
    }

    #[test]
    fn limits_answer_their_own_statuses() {
        let l = limits();
        assert_eq!(
            check(&req(&[("host", "a"), ("content-length", "1001")]), &l)
                .unwrap_err()
                .status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let long = Request::builder()
            .uri(format!("/{}", "a".repeat(100)))
            .header("host", "a")
            .body(())
            .unwrap();
        assert_eq!(
            check(&long, &l).unwrap_err().status,
            StatusCode::URI_TOO_LONG
        );
    }

    #[test]
    fn good_requests_pass_and_name_their_host() {
        let l = limits();
        assert_eq!(
            check(
                &req(&[("host", "Example.com:80"), ("content-length", "5, 5")]),
                &l
            )
            .unwrap()
            .unwrap(),
            "Example.com:80"
        );
        assert_eq!(
            check(&req(&[("host", "a"), ("transfer-encoding", "Chunked")]), &l)
                .unwrap()
                .unwrap(),
            "a"
        );
    }
}
