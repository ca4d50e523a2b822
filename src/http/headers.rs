//! Header hygiene between hops: hop-by-hop headers removed, forwarding headers
//! (`X-Forwarded-*`, RFC 7239 `Forwarded`, `Via`) added.

use std::fmt::Write as _;
use std::net::IpAddr;

use http::Version;
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

/// Removes hop-by-hop headers and every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        // Collected first: the map cannot be changed while its values are borrowed.
        let listed: Vec<HeaderValue> = headers
            .get_all(header::CONNECTION)
            .iter()
            .cloned()
            .collect();
        for value in &listed {
            for token in tokens(value) {
                headers.remove(token);
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
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

/// What the proxy knows about the hop a request arrived on.
pub struct ClientHop<'a> {
    pub client_ip: IpAddr,
    pub host: Option<&'a str>,
    pub version: Version,
}

/// Adds `X-Forwarded-For` (appended), `X-Forwarded-Proto`, `X-Forwarded-Host`, `Forwarded`
/// (appended) and `Via` (appended) to a request on its way upstream.
pub fn add_forwarding(headers: &mut HeaderMap, hop: &ClientHop<'_>) {
    let mut buf = String::with_capacity(64);

    let _ = write!(buf, "{}", hop.client_ip);
    append(headers, HeaderName::from_static("x-forwarded-for"), &buf);

    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    if let Some(host) = hop.host.and_then(|h| HeaderValue::from_str(h).ok()) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host);
    }

    buf.clear();
    match hop.client_ip {
        IpAddr::V4(ip) => {
            let _ = write!(buf, "for={ip}");
        }
        IpAddr::V6(ip) => {
            let _ = write!(buf, "for=\"[{ip}]\"");
        }
    }
    if let Some(host) = hop.host {
        // Host was checked to hold only authority characters, so quoting it is enough.
        let _ = write!(buf, ";host=\"{host}\"");
    }
    buf.push_str(";proto=http");
    append(headers, header::FORWARDED, &buf);

    add_via(headers, hop.version);
}

/// Appends this proxy to `Via`, naming the protocol version the message arrived with.
pub fn add_via(headers: &mut HeaderMap, version: Version) {
    let hop = match version {
        Version::HTTP_2 => "2 fulcrum",
        Version::HTTP_10 => "1.0 fulcrum",
        _ => "1.1 fulcrum",
    };
    if headers.contains_key(header::VIA) {
        append(headers, header::VIA, hop);
    } else {
        headers.insert(header::VIA, HeaderValue::from_static(hop));
    }
}

/// Sets `name` to `value`, or to `old, value` when the header is already there (all
/// existing lines folded into one, as RFC 9110 allows for list headers).
fn append(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    let mut joined = String::new();
    for old in headers.get_all(&name) {
        if let Ok(old) = old.to_str() {
            joined.push_str(old);
            joined.push_str(", ");
        }
    }
    let new = if joined.is_empty() {
        HeaderValue::from_str(value)
    } else {
        joined.push_str(value);
        HeaderValue::from_str(&joined)
    };
    if let Ok(new) = new {
        headers.insert(name, new);
    }
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
    fn connection_listed_and_standard_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarding_headers_append_to_earlier_hops() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("via", HeaderValue::from_static("1.1 edge"));
        let hop = ClientHop {
            client_ip: "::1".parse().unwrap(),
            host: Some("example.com:8080"),
            version: Version::HTTP_11,
        };
        add_forwarding(&mut h, &hop);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, ::1");
        assert_eq!(h["x-forwarded-host"], "example.com:8080");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(
            h["forwarded"],
            "for=\"[::1]\";host=\"example.com:8080\";proto=http"
        );
        assert_eq!(h["via"], "1.1 edge, 1.1 fulcrum");
    }
}
