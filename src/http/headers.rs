//! The header policy between hops, for every client protocol: which headers are hop-by-hop
//! (never cross the proxy), which of a response's headers go on to the client, and how
//! `Via` grows. The request side is written by `proxy::rewrite`, which uses the same lists.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that belong to one connection and never cross the proxy (RFC 9110 §7.6.1), plus
/// the `Proxy-*` ones meant for this proxy alone. `is_hop_by_hop_name` lists the same.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether `name` is one of the [`HOP_BY_HOP`] headers.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// [`is_hop_by_hop`] for a raw name in any case, without building a `HeaderName`.
pub fn is_hop_by_hop_name(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ];
    NAMES
        .iter()
        .any(|h| h.len() == name.len() && name.eq_ignore_ascii_case(h))
}

/// The comma-separated tokens of a header value, trimmed; invalid UTF-8 yields none.
pub fn tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// True if any value of `name` holds `token`, compared without case.
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case(token)))
}

/// The trimmed, non-empty items of a comma-separated raw header value; invalid UTF-8
/// yields none.
pub fn list(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The fields of an upstream's response that go on to the client: all but the hop-by-hop
/// ones, those its `Connection` headers name (however many), `Upgrade` (passed on by the
/// writer of a `101` alone) and `Via` (which [`write_via`] extends).
pub fn forwarded_fields<'r, 'b>(
    resp: &'r httparse::Response<'_, 'b>,
) -> impl Iterator<Item = &'r httparse::Header<'b>> {
    let listed = Listed::of(resp.headers);
    resp.headers.iter().filter(move |h| {
        let name = h.name.as_bytes();
        let dropped =
            is_hop_by_hop_name(name) || name.eq_ignore_ascii_case(b"via") || listed.names(h.name);
        !dropped
    })
}

/// The names a response's `Connection` headers list, found once per response. Tokens that
/// name no field to drop (`close`, or hop-by-hop names dropped anyway, as in the usual
/// `Connection: keep-alive`) are left out, so the common response checks nothing per field.
const LISTED_HELD: usize = 8;

struct Listed<'r, 'b> {
    first: [&'b str; LISTED_HELD],
    held: usize,
    /// More names than `first` holds: every field is checked against the headers again.
    overflow: Option<&'r [httparse::Header<'b>]>,
}

impl<'r, 'b> Listed<'r, 'b> {
    fn of(headers: &'r [httparse::Header<'b>]) -> Self {
        let mut listed = Listed {
            first: [""; LISTED_HELD],
            held: 0,
            overflow: None,
        };
        for token in Self::tokens(headers) {
            if listed.held == LISTED_HELD {
                listed.overflow = Some(headers);
                break;
            }
            listed.first[listed.held] = token;
            listed.held += 1;
        }
        listed
    }

    fn tokens(headers: &'r [httparse::Header<'b>]) -> impl Iterator<Item = &'b str> + 'r {
        headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| list(h.value))
            // A framing field stays whatever `Connection` says: the response is framed by it,
            // and dropping it would leave the client's copy unframed.
            .filter(|t| {
                !t.eq_ignore_ascii_case("close")
                    && !t.eq_ignore_ascii_case("content-length")
                    && !is_hop_by_hop_name(t.as_bytes())
            })
    }

    #[inline]
    fn names(&self, name: &str) -> bool {
        if self.held == 0 {
            return false;
        }
        match self.overflow {
            Some(headers) => Self::tokens(headers).any(|t| t.eq_ignore_ascii_case(name)),
            None => self.first[..self.held]
                .iter()
                .any(|t| t.eq_ignore_ascii_case(name)),
        }
    }
}

/// Writes the value of the response's `Via`: the upstream's own hops, then this one (the
/// response reached Fulcrum over HTTP/1.1).
pub fn write_via(out: &mut Vec<u8>, resp: &httparse::Response<'_, '_>) {
    for old in resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("via"))
    {
        out.extend_from_slice(old.value);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(b"1.1 fulcrum");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_hop_by_hop_lists_agree() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop_name(
                name.as_str().to_ascii_uppercase().as_bytes()
            ));
        }
        assert!(!is_hop_by_hop_name(b"content-length"));
    }

    #[test]
    fn every_connection_listed_field_and_hop_by_hop_field_stays_behind() {
        // More names than any fixed-size list would hold, over two Connection headers.
        let listed: Vec<String> = (0..40).map(|i| format!("x-private-{i}")).collect();
        let first = format!("keep-alive, {}", listed[..20].join(", "));
        let second = listed[20..].join(",");
        let mut fields = vec![
            httparse::Header {
                name: "Connection",
                value: first.as_bytes(),
            },
            httparse::Header {
                name: "connection",
                value: second.as_bytes(),
            },
            httparse::Header {
                name: "Keep-Alive",
                value: b"timeout=5",
            },
            httparse::Header {
                name: "Transfer-Encoding",
                value: b"chunked",
            },
            httparse::Header {
                name: "Via",
                value: b"1.1 origin",
            },
            httparse::Header {
                name: "Content-Type",
                value: b"text/plain",
            },
        ];
        for name in &listed {
            fields.push(httparse::Header {
                name,
                value: b"secret",
            });
        }
        let resp = httparse::Response {
            version: Some(1),
            code: Some(200),
            reason: Some("OK"),
            headers: &mut fields,
        };
        let kept: Vec<&str> = forwarded_fields(&resp).map(|h| h.name).collect();
        assert_eq!(kept, ["Content-Type"]);
        let mut via = Vec::new();
        write_via(&mut via, &resp);
        assert_eq!(via, b"1.1 origin, 1.1 fulcrum");
    }
}
