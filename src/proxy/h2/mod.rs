//! The phases for a request from an HTTP/2 client (served by hyper), forwarded to an
//! HTTP/1.1 upstream through hyper's client on pooled connections.

mod body;
mod forward;

use std::borrow::Cow;
use std::error::Error as _;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use super::AccessRecord;
use super::{ClientConn, Routed, balance_key, local_body, route};
use crate::http::headers::{self, ClientHop};
use crate::runtime::Runtime;
use crate::upstream::{Affinity, ConnectError, RequestBody, RequestBodyError};
pub use body::ResponseBody;
use forward::ForwardError;

/// Serves one request; never fails: every problem becomes a response with a status.
pub async fn handle(
    req: Request<Incoming>,
    conn: &ClientConn,
    rt: Arc<Runtime>,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let mut log = rt
        .config
        .access_log
        .enabled
        .then(|| AccessRecord::new(&req, conn.peer.ip(), started));

    let routed = match route(&req, conn.listener, &rt) {
        Ok(routed) => routed,
        Err(reject) => return local_response(reject.status, reject.reason, None, log),
    };
    let version = req.version();
    let (mut parts, body) = req.into_parts();
    let hop = ClientHop {
        client_ip: conn.peer.ip(),
        host: routed.host.as_ref().and_then(|h| h.to_str().ok()),
        version,
    };
    let affinity = Affinity {
        client_ip: conn.peer.ip(),
        key: balance_key(routed.upstream, conn.peer.ip(), &parts.uri, &parts.headers),
        pinned: routed.upstream.pinned(&parts.headers),
    };
    upstream_request_headers(&mut parts.headers, &hop, &routed);
    let mut upstream_req = Request::from_parts(
        parts,
        RequestBody::new(body, rt.config.limits.max_body_bytes),
    );
    forward::to_origin_form(&mut upstream_req);

    let forwarded = match forward::send(
        upstream_req,
        routed.upstream,
        &affinity,
        rt.config.timeouts.upstream_response_header,
    )
    .await
    {
        Ok(forwarded) => forwarded,
        Err(e) => {
            let (status, reason) = classify(&e);
            return local_response(status, reason, Some(Cow::Owned(e.to_string())), log);
        }
    };
    let forward::Forwarded {
        response,
        server,
        sender,
        in_flight,
    } = forwarded;
    let response_time = started.elapsed();
    server.observe(response_time);
    if let Some(log) = log.as_mut() {
        log.status = response.status();
        log.upstream = Some(server.address);
        log.upstream_time = Some(response_time);
    }
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return local_response(
            StatusCode::BAD_GATEWAY,
            "upstream switched protocols unasked",
            None,
            log,
        );
    }
    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::add_via(&mut parts.headers, Version::HTTP_11);
    if let Some(cookie) = routed.upstream.pin_cookie(&affinity, &server) {
        parts.headers.append(header::SET_COOKIE, cookie.clone());
    }
    Response::from_parts(
        parts,
        ResponseBody::upstream(body, Some((sender, server)), Some(in_flight), log),
    )
}

/// Header hygiene for a request on its way upstream: hop-by-hop headers out, forwarding
/// headers in, and `Host` set from the client's `:authority` (HTTP/1.1 needs it as a header)
/// unless the upstream wants its own address, which is set once a server is picked.
fn upstream_request_headers(headers: &mut HeaderMap, hop: &ClientHop<'_>, routed: &Routed<'_>) {
    headers::strip_hop_by_hop(headers);
    headers::add_forwarding(headers, hop);
    match (&routed.host, routed.upstream.preserve_host) {
        (Some(host), true) => {
            headers.insert(header::HOST, host.clone());
        }
        _ => {
            headers.remove(header::HOST);
        }
    }
}

/// The status and client-facing text for a failed forward.
fn classify(e: &ForwardError) -> (StatusCode, &'static str) {
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

fn local_response(
    status: StatusCode,
    reason: &'static str,
    detail: Option<Cow<'static, str>>,
    mut log: Option<AccessRecord>,
) -> Response<ResponseBody> {
    if let Some(log) = log.as_mut() {
        log.status = status;
        log.reason = Some(detail.unwrap_or(Cow::Borrowed(reason)));
    }
    let mut response = Response::new(ResponseBody::local(
        Bytes::from(local_body(status, reason)),
        log,
    ));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
