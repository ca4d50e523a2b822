//! One exchange's two directions at once: the request body goes up while the response comes
//! down, since an upstream may answer before it has read the whole body.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use http::StatusCode;
use http::Version;
use http::header::HeaderValue;
use tokio::sync::Notify;

use super::Client;
use super::request::{RequestFailure, send_request};
use super::response::{Relay, relay_response};
use crate::config::Timeouts;
use crate::http1::body::Framing;
use crate::proxy::AccessRecord;
use crate::upstream::RawConn;

/// What an exchange needs to know beside the two connections.
pub(super) struct Context<'a> {
    pub(super) timeouts: &'a Timeouts,
    pub(super) is_head: bool,
    /// The protocol the client asked to upgrade to, if it may be tunnelled.
    pub(super) upgrade: Option<HeaderValue>,
    pub(super) client_version: Version,
    /// Whether the client (and shutdown) allow another request on its connection.
    pub(super) keep_alive: bool,
    pub(super) max_body: u64,
    pub(super) started: Instant,
    /// A sticky-session cookie to set on the response, pinning the client to this server.
    pub(super) set_cookie: Option<HeaderValue>,
}

pub(super) enum Outcome {
    Responded(Responded),
    /// The client's request body failed before any response was sent.
    Request(RequestFailure),
    /// The upstream failed before any response was sent.
    Upstream(UpstreamFailure),
    /// Something failed after the response head went out: the connection can only close.
    Broken(Cow<'static, str>),
}

pub(super) struct Responded {
    /// From the start of the exchange to the upstream's response head.
    pub(super) response_time: std::time::Duration,
    pub(super) bytes: u64,
    pub(super) switched: bool,
    pub(super) upstream_reusable: bool,
    pub(super) client_keep_alive: bool,
}

pub(super) struct UpstreamFailure {
    pub(super) status: StatusCode,
    pub(super) reason: &'static str,
    pub(super) detail: String,
    /// The upstream closed without sending a byte: the request may not have been seen.
    pub(super) nothing_received: bool,
}

/// Sends the request (head in `client.ubuf`, body from the client) and brings the response
/// back, both at once: an upstream may answer before it has read the whole body.
pub(super) async fn forward(
    client: &mut Client,
    conn: &mut RawConn,
    framing: Framing,
    cx: &Context<'_>,
    log: &mut Option<AccessRecord>,
) -> Outcome {
    let Client {
        stream: client_stream,
        rbuf,
        wbuf,
        ubuf,
        ..
    } = client;
    let request_sent = Notify::new();
    let request_done = AtomicBool::new(false);
    let head_sent = AtomicBool::new(false);
    let request = send_request(
        client_stream,
        rbuf,
        &conn.stream,
        ubuf,
        framing,
        cx,
        &request_done,
        &request_sent,
    );
    let response = relay_response(
        client_stream,
        wbuf,
        &conn.stream,
        &mut conn.buf,
        cx,
        &request_done,
        &request_sent,
        &head_sent,
        log,
    );
    tokio::pin!(request, response);
    let mut request_finished = false;
    loop {
        tokio::select! {
            biased;
            sent = &mut request, if !request_finished => match sent {
                Ok(()) => request_finished = true,
                Err(failure) if !head_sent.load(Ordering::Relaxed) => return Outcome::Request(failure),
                Err(failure) => return Outcome::Broken(failure.detail().into()),
            },
            relayed = &mut response => {
                return match relayed {
                    Ok(mut responded) => {
                        // An upstream that answered early has not read the whole request:
                        // neither connection is in a known state for another exchange.
                        if !request_finished {
                            responded.upstream_reusable = false;
                            responded.client_keep_alive = false;
                        }
                        Outcome::Responded(responded)
                    }
                    Err(Relay::BeforeHead(failure)) => Outcome::Upstream(failure),
                    Err(Relay::AfterHead(why)) => Outcome::Broken(why.into()),
                };
            }
        }
    }
}
