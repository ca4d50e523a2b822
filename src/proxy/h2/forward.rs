//! Forwarding for the HTTP/2 path: the request, made HTTP/1.1 in origin form, sent through
//! hyper's client on a pooled connection to the server the balancer picks, trying another
//! server when a connection cannot be had.

use std::sync::Arc;
use std::time::Duration;

use http::header;
use http::uri::Uri;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

use crate::upstream::{Affinity, ConnectError, InFlight, RequestBody, Server, Upstream};

/// Why no upstream response could be had.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("upstream `{0}` has no servers")]
    NoServer(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("upstream {0} sent no response header within {1:?}")]
    ResponseTimeout(std::net::SocketAddr, Duration),
    #[error("upstream {0} failed: {1}")]
    Upstream(std::net::SocketAddr, hyper::Error),
}

/// A response and the connection it came on.
pub struct Forwarded {
    pub response: Response<Incoming>,
    pub server: Arc<Server>,
    pub sender: SendRequest<RequestBody>,
    /// The request counts as in flight to `server` until this is dropped.
    pub in_flight: InFlight,
}

/// Makes the request HTTP/1.1 in origin form (`/path?query`), as an upstream expects it.
pub fn to_origin_form(req: &mut Request<RequestBody>) {
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
    }
    *req.version_mut() = Version::HTTP_11;
}

/// Sends `req` to a server of `upstream`. A request that never left (no connection could be
/// opened, or a pooled connection turned out closed before it was written) is tried on the
/// next server the balancer picks, up to one try per server plus one.
pub async fn send(
    mut req: Request<RequestBody>,
    upstream: &Arc<Upstream>,
    affinity: &Affinity,
    response_timeout: Duration,
) -> Result<Forwarded, ForwardError> {
    // One try per server, and one more for a pooled connection found closed.
    let tries = upstream.tries(affinity) + 1;
    let mut last_error = ForwardError::NoServer(upstream.name.clone());
    let mut failed = Vec::new();
    for attempt in 0..tries {
        let Some((index, server)) = upstream.pick(attempt, affinity, &failed) else {
            break;
        };
        let mut conn = match server.pool.get().await {
            Ok(conn) => {
                upstream.reached(index);
                conn
            }
            Err(e) => {
                tracing::warn!(upstream = %upstream.name, server = %server.address, error = %e, "upstream server unavailable");
                upstream.unreachable(index);
                last_error = e.into();
                failed.push(index);
                continue;
            }
        };
        let in_flight = upstream.track(index);
        if !upstream.preserve_host || !req.headers().contains_key(header::HOST) {
            req.headers_mut()
                .insert(header::HOST, server.host_header.clone());
        }
        let sent = tokio::time::timeout(response_timeout, conn.sender.try_send_request(req)).await;
        match sent {
            Ok(Ok(response)) => {
                return Ok(Forwarded {
                    response,
                    server: server.clone(),
                    sender: conn.sender,
                    in_flight,
                });
            }
            Ok(Err(mut e)) => match e.take_message() {
                Some(unsent) => {
                    tracing::debug!(server = %server.address, reused = conn.reused, error = %e.error(), "request not sent; trying again");
                    req = unsent;
                    last_error = ForwardError::Upstream(server.address, e.into_error());
                }
                None => return Err(ForwardError::Upstream(server.address, e.into_error())),
            },
            Err(_) => {
                return Err(ForwardError::ResponseTimeout(
                    server.address,
                    response_timeout,
                ));
            }
        }
    }
    Err(last_error)
}
