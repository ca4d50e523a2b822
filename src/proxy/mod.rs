//! The life of one request, in named phases: validate → route → balance and forward →
//! respond → log. Everything a phase needs comes from the runtime snapshot the request
//! started with.

mod body;
mod forward;
mod log;
mod tunnel;

use std::borrow::Cow;
use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;

pub use body::ResponseBody;
use forward::ForwardError;
use log::AccessRecord;

use crate::http::headers::{self, ClientHop};
use crate::http::validate;
use crate::runtime::Runtime;
use crate::upstream::{RequestBody, RequestBodyError};

/// The client connection a request arrived on.
#[derive(Debug)]
pub struct ClientConn {
    pub peer: SocketAddr,
    /// Index of the listener in the runtime's listener list.
    pub listener: usize,
}

/// Serves one request; never fails: every problem becomes a response with a status.
pub async fn handle(
    mut req: Request<Incoming>,
    conn: &ClientConn,
    rt: Arc<Runtime>,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let mut log = rt
        .config
        .access_log
        .enabled
        .then(|| AccessRecord::new(&req, conn.peer.ip(), started));
    let version = req.version();
    let body_was_empty = req.body().is_end_stream();
    let local = |status,
                 reason: &'static str,
                 detail: Option<Cow<'static, str>>,
                 mut log: Option<AccessRecord>| {
        if let Some(log) = log.as_mut() {
            log.status = status;
            log.reason = Some(detail.unwrap_or(Cow::Borrowed(reason)));
        }
        // A request whose body was not read to its end leaves the connection's framing in
        // doubt, so the connection is closed rather than read on.
        local_response(status, reason, version, !body_was_empty, log)
    };

    // Validate. A client that sent a malformed request is not trusted with another one on
    // the same connection.
    let host = match validate::check(&req, &rt.config.limits) {
        Ok(host) => host,
        Err(reject) => {
            let mut response = local(reject.status, reject.reason, None, log);
            if version != Version::HTTP_2 {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return response;
        }
    };

    // Route.
    let host_str = host.as_ref().and_then(|h| h.to_str().ok());
    let Some(upstream) = rt.listeners[conn.listener]
        .router
        .route(host_str, req.uri().path())
    else {
        return local(
            StatusCode::NOT_FOUND,
            "no route for this host and path",
            None,
            log,
        );
    };

    // Header hygiene; an upgrade is carried through only when it is one we can tunnel.
    let client_upgrade = upgrade_request(&mut req);
    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    if let Some((protocol, _)) = &client_upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
    }
    headers::add_forwarding(
        &mut parts.headers,
        &ClientHop {
            client_ip: conn.peer.ip(),
            host: host_str,
            version,
        },
    );
    let mut upstream_req = Request::from_parts(
        parts,
        RequestBody::new(body, rt.config.limits.max_body_bytes),
    );
    forward::to_upstream(&mut upstream_req, host.as_ref(), upstream);

    // Balance and forward.
    let forwarded = match forward::send(
        upstream_req,
        upstream,
        rt.config.timeouts.upstream_response_header,
    )
    .await
    {
        Ok(forwarded) => forwarded,
        Err(e) => {
            let (status, reason) = classify(&e);
            return local(status, reason, Some(Cow::Owned(e.to_string())), log);
        }
    };

    // Respond.
    let forward::Forwarded {
        mut response,
        server,
        sender,
    } = forwarded;
    if let Some(log) = log.as_mut() {
        log.status = response.status();
        log.upstream = Some(server.address);
        log.upstream_time = Some(started.elapsed());
    }
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let upgrade = match (switching, client_upgrade) {
        (true, Some((_, client_side))) => {
            tunnel::spawn(client_side, hyper::upgrade::on(&mut response));
            response.headers().get(header::UPGRADE).cloned()
        }
        (true, None) => {
            return local(
                StatusCode::BAD_GATEWAY,
                "upstream switched protocols unasked",
                None,
                log,
            );
        }
        (false, _) => None,
    };
    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol);
    }
    headers::add_via(&mut parts.headers, Version::HTTP_11);
    // An upgraded connection belongs to its tunnel now, never to the pool.
    let connection = (!switching).then_some((sender, server));
    Response::from_parts(parts, ResponseBody::upstream(body, connection, log))
}

/// If the client asks to upgrade to a protocol that may be tunnelled, returns that protocol
/// and the handle that yields the client's connection once the upgrade happens. `h2c` is
/// never passed on: it would open an HTTP/2 connection to the backend past our routing.
fn upgrade_request(
    req: &mut Request<Incoming>,
) -> Option<(HeaderValue, hyper::upgrade::OnUpgrade)> {
    if req.version() != Version::HTTP_11
        || !headers::has_token(req.headers(), header::CONNECTION, "upgrade")
    {
        return None;
    }
    let protocol = req.headers().get(header::UPGRADE)?.clone();
    if headers::tokens(&protocol)
        .any(|p| p.eq_ignore_ascii_case("h2c") || p.to_ascii_lowercase().starts_with("h2c/"))
    {
        return None;
    }
    Some((protocol, hyper::upgrade::on(req)))
}

/// The status and client-facing text for a failed forward.
fn classify(e: &ForwardError) -> (StatusCode, &'static str) {
    use crate::upstream::ConnectError;
    match e {
        ForwardError::NoServer(_) => (StatusCode::BAD_GATEWAY, "no upstream server is available"),
        ForwardError::Connect(ConnectError::TimedOut(..)) => (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream server did not accept the connection in time",
        ),
        ForwardError::Connect(_) => (
            StatusCode::BAD_GATEWAY,
            "upstream server could not be reached",
        ),
        ForwardError::ResponseTimeout(..) => (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream server did not answer in time",
        ),
        ForwardError::Upstream(_, err) => {
            let mut source = err.source();
            while let Some(s) = source {
                if let Some(body_error) = s.downcast_ref::<RequestBodyError>() {
                    return match body_error {
                        RequestBodyError::TooLarge(_) => (
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "request body is larger than allowed",
                        ),
                        RequestBodyError::Client(_) => {
                            (StatusCode::BAD_REQUEST, "request body could not be read")
                        }
                    };
                }
                if let Some(io) = s.downcast_ref::<std::io::Error>()
                    && io.kind() == std::io::ErrorKind::TimedOut
                {
                    return (
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream server stopped sending",
                    );
                }
                source = s.source();
            }
            (StatusCode::BAD_GATEWAY, "upstream server failed to answer")
        }
    }
}

/// A short plain-text response written by Fulcrum itself.
fn local_response(
    status: StatusCode,
    reason: &'static str,
    version: Version,
    close: bool,
    log: Option<AccessRecord>,
) -> Response<ResponseBody> {
    let text = format!(
        "{} {}: {reason}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut response = Response::new(ResponseBody::local(Bytes::from(text), log));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if close && version != Version::HTTP_2 {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
