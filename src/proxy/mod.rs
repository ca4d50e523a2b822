//! The life of one request, in named phases: validate → route → balance and forward →
//! respond → log. The phases that do not depend on the client's protocol live here; [`h1`]
//! runs them for HTTP/1.1 clients on hand-written I/O, [`h2`] for HTTP/2 clients on hyper.
//! Everything a phase needs comes from the runtime snapshot the request started with.

pub mod h1;
pub mod h2;
mod log;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::Uri;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, StatusCode, Version};

pub use log::AccessRecord;

use crate::balance;
use crate::config::HashKey;
use crate::http::headers;
use crate::http::validate::{self, Reject};
use crate::runtime::Runtime;
use crate::upstream::Upstream;

/// The client connection a request arrived on.
#[derive(Debug)]
pub struct ClientConn {
    pub peer: SocketAddr,
    /// Index of the listener in the runtime's listener list.
    pub listener: usize,
}

/// Where a validated request goes.
pub struct Routed<'rt> {
    pub upstream: &'rt Arc<Upstream>,
    /// The host the request is for (URI authority or Host header), if it named one.
    pub host: Option<HeaderValue>,
}

/// Validate and route: the upstream for `req`, or the answer Fulcrum gives itself.
pub fn route<'rt, B>(
    req: &Request<B>,
    listener: usize,
    rt: &'rt Runtime,
) -> Result<Routed<'rt>, Reject> {
    let host = validate::check(req, &rt.config.limits)?;
    let host_str = host.as_ref().and_then(|h| h.to_str().ok());
    match rt.listeners[listener]
        .router
        .route(host_str, req.uri().path())
    {
        Some(upstream) => Ok(Routed { upstream, host }),
        None => Err(Reject {
            status: StatusCode::NOT_FOUND,
            reason: "no route for this host and path",
        }),
    }
}

/// The protocol a client asks to upgrade to, if it is one that may be tunnelled. `h2c` never
/// is: it would open an HTTP/2 connection to the backend past our routing.
pub fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11
        || !headers::has_token(req.headers(), header::CONNECTION, "upgrade")
    {
        return None;
    }
    let protocol = req.headers().get(header::UPGRADE)?;
    let h2c = headers::tokens(protocol).any(|p| p.len() >= 3 && p[..3].eq_ignore_ascii_case("h2c"));
    (!h2c).then(|| protocol.clone())
}

/// The hash of what `upstream` balances on (`hash_key`), when it balances on one. A missing
/// header or cookie gives `None`, and the balancer falls back to the client's address.
pub fn balance_key(
    upstream: &Upstream,
    client_ip: IpAddr,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<u64> {
    match upstream.hash_key.as_ref()? {
        HashKey::ClientIp => Some(balance::hash(&client_ip)),
        HashKey::Path => Some(balance::hash(&uri.path())),
        HashKey::Header(name) => headers.get(name).map(|v| balance::hash(&v.as_bytes())),
        HashKey::Cookie(name) => cookie(headers, name).map(|v| balance::hash(&v)),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value)
}

/// The body of a response Fulcrum writes itself.
pub fn local_body(status: StatusCode, reason: &str) -> String {
    format!(
        "{} {}: {reason}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}
