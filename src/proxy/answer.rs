//! Fulcrum's own answers: every way a request can fail before a response exists, mapped to
//! one status and one client-facing text in one place, with the detail kept for the log.

use std::borrow::Cow;

use http::StatusCode;

use super::downstream::{ClientBodyError, OwnAnswer, ResponseWriter};
use super::{AccessRecord, Finished};
use crate::http::validate::Reject;
use crate::upstream::{ConnectError, Observed, Refused, Unavailable};

/// A request that gets Fulcrum's own answer instead of a response.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    /// Safe to show the client.
    pub reason: &'static str,
    /// What the access log says, when it knows more than `reason`.
    pub detail: Option<Cow<'static, str>>,
    /// Not a byte of a response came back: a request that can be sent again may go to
    /// another server, or (a pooled connection the server had closed) on a new connection.
    pub nothing_received: bool,
    /// Tell the client when to try again (`Retry-After`): the refusal is about load.
    pub retry_after: bool,
    /// What the failure says about the server, for outlier detection; `None` when it was
    /// not the server's doing (the client's body, or Fulcrum's own refusal).
    pub observed: Option<Observed>,
}

impl Failure {
    pub fn new(status: StatusCode, reason: &'static str) -> Self {
        Failure {
            status,
            reason,
            detail: None,
            nothing_received: false,
            retry_after: false,
            observed: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<Cow<'static, str>>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    // === The upstream side ===

    /// The upstream closed or reset before its response head. `nothing_received`: not a
    /// byte came back, so a stale pooled connection is the likely cause.
    pub fn upstream_closed(detail: String, nothing_received: bool) -> Self {
        Failure {
            nothing_received,
            observed: Some(Observed::Broken),
            ..Failure::new(
                StatusCode::BAD_GATEWAY,
                "upstream server closed the connection without answering",
            )
            .detail(detail)
        }
    }

    pub fn upstream_invalid(detail: impl Into<Cow<'static, str>>) -> Self {
        Failure {
            observed: Some(Observed::Broken),
            ..Failure::new(
                StatusCode::BAD_GATEWAY,
                "upstream server sent an invalid response",
            )
            .detail(detail)
        }
    }

    pub fn upstream_timeout(detail: String) -> Self {
        Failure {
            observed: Some(Observed::Timeout),
            ..Failure::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream server did not answer in time",
            )
            .detail(detail)
        }
    }

    /// Writing the request upstream failed. On a reused connection before any response
    /// byte, the server most likely closed it while it was idle.
    pub fn upstream_write(e: std::io::Error) -> Self {
        Failure {
            nothing_received: true,
            observed: Some(Observed::Broken),
            ..Failure::new(
                StatusCode::BAD_GATEWAY,
                "upstream server stopped reading the request",
            )
            .detail(format!("writing the request upstream failed: {e}"))
        }
    }

    // === Fulcrum's own refusals ===

    /// The circuit breaker let the request wait no longer, or not at all.
    pub fn refused(refused: Refused, queue_timeout: Option<std::time::Duration>) -> Self {
        let (reason, detail) = match refused {
            Refused::QueueFull => (
                "upstream is at its limit of requests and its queue is full",
                Cow::Borrowed(
                    "circuit breaker: max_active_requests in flight and max_pending_requests waiting",
                ),
            ),
            Refused::QueueTimeout => (
                "upstream is at its limit of requests and none finished in time",
                Cow::Owned(format!(
                    "circuit breaker: no turn within queue_timeout ({:?})",
                    queue_timeout.unwrap_or_default()
                )),
            ),
        };
        Failure {
            retry_after: true,
            ..Failure::new(StatusCode::SERVICE_UNAVAILABLE, reason).detail(detail)
        }
    }

    /// No server of the upstream could take the request; `last` is how the last try failed.
    pub fn unavailable(why: Unavailable, last: &Failure) -> Self {
        let last = last.detail.as_deref().unwrap_or(last.reason);
        Failure {
            retry_after: true,
            ..Failure::new(StatusCode::SERVICE_UNAVAILABLE, why.reason())
                .detail(format!("{}; last try: {last}", why.reason()))
        }
    }

    /// A failed try that could have been retried, but the upstream's retry budget is
    /// spent; `last` is how the try failed.
    pub fn budget_spent(last: &Failure) -> Self {
        let last = last.detail.as_deref().unwrap_or(last.reason);
        Failure {
            retry_after: true,
            ..Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream is failing and its retry budget is spent",
            )
            .detail(format!(
                "not retried: the retry budget is spent; last try: {last}"
            ))
        }
    }

    // === The client side ===

    pub fn body_too_large(limit: u64) -> Self {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body is larger than allowed",
        )
        .detail(format!("request body over the limit of {limit} bytes"))
    }

    pub fn client_body(e: ClientBodyError) -> Self {
        match e {
            ClientBodyError::Malformed(why) => {
                Failure::new(StatusCode::BAD_REQUEST, "malformed request body")
                    .detail(format!("malformed request body: {why}"))
            }
            ClientBodyError::Gone => {
                Failure::new(StatusCode::BAD_REQUEST, "request body not received")
                    .detail("client closed or stalled before sending its whole body")
            }
        }
    }

    /// The HTTP/2 client reset its stream while the upstream was still to answer.
    pub fn abandoned() -> Self {
        Failure::new(StatusCode::BAD_REQUEST, "request abandoned by the client")
    }
}

impl From<Reject> for Failure {
    fn from(reject: Reject) -> Self {
        Failure::new(reject.status, reject.reason)
    }
}

impl From<ConnectError> for Failure {
    fn from(e: ConnectError) -> Self {
        let (status, reason) = match &e {
            ConnectError::TimedOut(..) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream server did not accept the connection in time",
            ),
            ConnectError::NoServer => (StatusCode::BAD_GATEWAY, "no upstream server is available"),
            ConnectError::NoneResolved(..) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no upstream server has been resolved yet",
            ),
            ConnectError::Local(..) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the proxy is out of resources for upstream connections",
            ),
            ConnectError::Busy(..) => {
                return Failure {
                    retry_after: true,
                    ..Failure::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream servers are at their connection limit",
                    )
                    .detail(e.to_string())
                };
            }
            ConnectError::Failed(..) => (
                StatusCode::BAD_GATEWAY,
                "upstream server could not be reached",
            ),
            ConnectError::Tls(..) => (
                StatusCode::BAD_GATEWAY,
                "TLS with the upstream server failed",
            ),
        };
        Failure::new(status, reason).detail(e.to_string())
    }
}

/// The body of an answer Fulcrum writes itself.
pub fn body_text(status: StatusCode, reason: &str) -> String {
    format!(
        "{} {}: {reason}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}

/// Writes `failure` as Fulcrum's own answer and records it in the access log.
pub async fn write<W: ResponseWriter>(
    writer: &mut W,
    failure: Failure,
    head_request: bool,
    unread: bool,
    log: &mut Option<AccessRecord<'_>>,
) -> Finished {
    let body = body_text(failure.status, failure.reason);
    let keep_alive = writer
        .answer(&OwnAnswer {
            status: failure.status,
            body: &body,
            head_request,
            unread,
            retry_after: failure.retry_after,
            location: None,
        })
        .await;
    if let Some(log) = log.as_mut() {
        log.status = failure.status;
        log.bytes = if head_request { 0 } else { body.len() as u64 };
        log.complete = true;
        log.reason = Some(failure.detail.unwrap_or(Cow::Borrowed(failure.reason)));
    }
    if keep_alive {
        Finished::KeepAlive
    } else {
        Finished::Close
    }
}

/// Sends the client to the same URL over HTTPS on `port` (`308 Permanent Redirect`, which
/// keeps the method and body, unlike `301`), once the request passes the same checks as
/// any other.
pub async fn redirect_to_https<B, W: ResponseWriter>(
    writer: &mut W,
    req: &http::Request<B>,
    port: u16,
    limits: &crate::config::Limits,
    head_request: bool,
    unread: bool,
    log: &mut Option<AccessRecord<'_>>,
) -> Finished {
    let host = match crate::http::validate::check(req, limits) {
        Ok(Some(host)) => host,
        Ok(None) => {
            let refusal = Failure::new(
                StatusCode::BAD_REQUEST,
                "a redirect to HTTPS needs the Host header",
            );
            return write(writer, refusal, head_request, true, log).await;
        }
        Err(reject) => return write(writer, reject.into(), head_request, true, log).await,
    };
    let host = host.to_str().unwrap_or_default();
    // The host without the port it was reached on: `[v6]:80`, `name:80`.
    let name = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    if name.is_empty() {
        let refusal = Failure::new(
            StatusCode::BAD_REQUEST,
            "a redirect to HTTPS needs a host name",
        );
        return write(writer, refusal, head_request, true, log).await;
    }
    // Only an origin-form target (`/path?query`) is carried over: `*` would run into the
    // host (`https://host*`).
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/");
    let location = if port == 443 {
        format!("https://{name}{path}")
    } else {
        format!("https://{name}:{port}{path}")
    };
    let status = StatusCode::PERMANENT_REDIRECT;
    let body = format!("308 Permanent Redirect: {location}\n");
    let keep_alive = writer
        .answer(&OwnAnswer {
            status,
            body: &body,
            head_request,
            unread,
            retry_after: false,
            location: Some(&location),
        })
        .await;
    if let Some(log) = log.as_mut() {
        log.status = status;
        log.bytes = if head_request { 0 } else { body.len() as u64 };
        log.complete = true;
    }
    if keep_alive {
        Finished::KeepAlive
    } else {
        Finished::Close
    }
}
