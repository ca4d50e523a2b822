//! Request heads: finding where a head ends (refusing bare LF), and parsing it with
//! `httparse` into `http` types without copying header bytes. (Response heads are parsed
//! where they are rewritten, in `proxy::h1::rewrite`.)

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};

use super::body::Framing;
use crate::http::headers::has_token;

/// Headers parsed at most; `limits.max_headers` may ask for fewer, never more.
pub const MAX_HEADERS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// The head is larger than allowed: 431.
    TooLarge,
    /// More header fields than allowed: 431.
    TooManyHeaders,
    /// The request target is longer than allowed: 414.
    UriTooLong,
    /// The whole head did not arrive in time: 408.
    TimedOut,
    /// Malformed: 400 (or 502 for a response), with what was wrong.
    Invalid(&'static str),
}

impl HeadError {
    pub fn status(self) -> StatusCode {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            HeadError::UriTooLong => StatusCode::URI_TOO_LONG,
            HeadError::TimedOut => StatusCode::REQUEST_TIMEOUT,
            HeadError::Invalid(_) => StatusCode::BAD_REQUEST,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            HeadError::TooLarge => "request header is larger than allowed",
            HeadError::TooManyHeaders => "request has more header fields than allowed",
            HeadError::UriTooLong => "request target is too long",
            HeadError::TimedOut => "request header not received in time",
            HeadError::Invalid(why) => why,
        }
    }
}

/// Scans `buf` from `*scanned` for the empty line that ends a head. Returns the head's
/// length once complete. Every line must end in CRLF: a bare LF is refused, since some
/// servers take it as a line end and others do not.
pub fn find_head_end(buf: &[u8], scanned: &mut usize) -> Result<Option<usize>, HeadError> {
    let start = *scanned;
    for i in memchr::memchr_iter(b'\n', &buf[start..]).map(|i| i + start) {
        if i == 0 || buf[i - 1] != b'\r' {
            return Err(HeadError::Invalid("bare LF in the message head"));
        }
        // An empty line (CRLF right after the previous line's CRLF) ends the head.
        if i >= 3 && &buf[i - 3..i - 1] == b"\r\n" {
            return Ok(Some(i + 1));
        }
    }
    // Next time, resume after what was scanned: each LF is checked against the bytes before
    // it, so a CRLF CRLF split across reads is still found.
    *scanned = buf.len();
    Ok(None)
}

/// Drops the empty lines a client may send before a request line (RFC 9112 §2.2).
pub fn skip_leading_crlf(buf: &mut BytesMut) {
    let n = buf.chunks(2).take_while(|pair| *pair == b"\r\n").count() * 2;
    if n > 0 {
        let _ = buf.split_to(n);
    }
}

/// Whether a client allows its connection to carry another request after this one.
pub fn keep_alive<B>(req: &Request<B>) -> bool {
    match req.version() {
        Version::HTTP_11 => !has_token(req.headers(), header::CONNECTION, "close"),
        _ => has_token(req.headers(), header::CONNECTION, "keep-alive"),
    }
}

/// The request's body framing. The headers were validated (`http::validate`) before the
/// body is read, so a request with both `Transfer-Encoding` and `Content-Length` never gets
/// this far.
pub fn request_framing<B>(req: &Request<B>) -> Framing {
    if req.headers().contains_key(header::TRANSFER_ENCODING) {
        return Framing::Chunked;
    }
    match crate::http::validate::content_length(req.headers()) {
        Ok(Some(n)) => Framing::Length(n),
        _ => Framing::Empty,
    }
}

/// Writes one header field line.
#[inline]
pub fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Parses a complete request head; `head` holds exactly the head's bytes, which the
/// request's URI and header values go on sharing.
pub fn parse_request(
    head: Bytes,
    max_headers: usize,
    max_uri: usize,
) -> Result<Request<()>, HeadError> {
    // Left uninitialised: httparse writes each slot it uses, so no 8 KiB fill per request.
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let limit = max_headers.min(MAX_HEADERS);
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(&head, &mut slots[..limit]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Invalid("incomplete request head")),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(_) => return Err(HeadError::Invalid("malformed request head")),
    }
    let path = req.path.unwrap_or_default();
    if path.len() > max_uri {
        return Err(HeadError::UriTooLong);
    }
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| HeadError::Invalid("invalid method"))?;
    let uri = Uri::from_maybe_shared(head.slice_ref(path.as_bytes()))
        .map_err(|_| HeadError::Invalid("invalid request target"))?;
    let version = if req.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let headers = header_map(&head, &head, req.headers)?;
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(request)
}

/// Builds a header map whose values share `bytes`, which must hold the same bytes as
/// `parsed_from`, the buffer the parsed headers borrow from.
fn header_map(
    bytes: &Bytes,
    parsed_from: &[u8],
    parsed: &[httparse::Header<'_>],
) -> Result<HeaderMap, HeadError> {
    // Room for the forwarding headers the proxy adds, so adding them does not regrow the map.
    let mut headers = HeaderMap::with_capacity(parsed.len() + 8);
    for h in parsed {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| HeadError::Invalid("invalid header name"))?;
        let start = h.value.as_ptr() as usize - parsed_from.as_ptr() as usize;
        let value = bytes.slice(start..start + h.value.len());
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| HeadError::Invalid("invalid header value"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(text: &[u8]) -> Result<Option<usize>, HeadError> {
        find_head_end(text, &mut 0)
    }

    #[test]
    fn head_end_is_found_and_bare_lf_refused() {
        assert_eq!(end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY"), Ok(Some(27)));
        assert_eq!(end(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert!(end(b"GET / HTTP/1.1\nHost: a\r\n\r\n").is_err());
        assert!(end(b"GET / HTTP/1.1\r\nHost: a\n\n").is_err());
    }

    #[test]
    fn head_end_is_found_across_reads() {
        let full = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut scanned = 0;
        for cut in [5, 17, 26] {
            assert_eq!(find_head_end(&full[..cut], &mut scanned), Ok(None));
        }
        assert_eq!(find_head_end(full, &mut scanned), Ok(Some(full.len())));
    }

    proptest::proptest! {
        /// Scanning a stream as it arrives, in any pieces, finds what one scan of the whole
        /// finds: the same end, or the same refusal.
        #[test]
        fn incremental_scan_matches_a_whole_scan(
            bytes in proptest::collection::vec(proptest::sample::select(b"GET /\r\nHost: a\n".to_vec()), 0..80),
            cuts in proptest::collection::vec(0usize..80, 0..6),
        ) {
            let whole = find_head_end(&bytes, &mut 0);
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= bytes.len()).collect();
            cuts.sort_unstable();
            cuts.push(bytes.len());
            let mut scanned = 0;
            let mut result = Ok(None);
            for cut in cuts {
                result = find_head_end(&bytes[..cut], &mut scanned);
                if !matches!(result, Ok(None)) {
                    break;
                }
            }
            proptest::prop_assert_eq!(result, whole);
        }
    }

    #[test]
    fn request_head_parses_without_copying() {
        let head =
            Bytes::from_static(b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Two: 1\r\nX-Two: 2\r\n\r\n");
        let req = parse_request(head, 100, 100).unwrap();
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.headers().get_all("x-two").iter().count(), 2);
        assert!(keep_alive(&req));
    }

    #[test]
    fn limits_and_malformed_heads() {
        let many: String = (0..20).map(|i| format!("X-{i}: v\r\n")).collect();
        let head = Bytes::from(format!("GET / HTTP/1.1\r\n{many}\r\n"));
        assert_eq!(
            parse_request(head, 10, 100).err(),
            Some(HeadError::TooManyHeaders)
        );
        let long = Bytes::from(format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(200)));
        assert_eq!(
            parse_request(long, 10, 100).err(),
            Some(HeadError::UriTooLong)
        );
        for bad in [
            "GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\n: v\r\n\r\n",
            "GET / HTTP/1.1\r\nX Y: v\r\n\r\n",
        ] {
            assert!(
                matches!(
                    parse_request(Bytes::from(bad), 10, 100),
                    Err(HeadError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
    }
}
