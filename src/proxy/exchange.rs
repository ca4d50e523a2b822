//! One exchange's two directions at once: the request body goes up while the response comes
//! down, since an upstream may answer before it has read the whole body.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use http::header::HeaderValue;
use tokio::sync::Notify;

use super::downstream::{RequestBody, ResponseWriter};
use super::request::send_request;
use super::response::{Relay, relay_response};
use super::{AccessRecord, Failure};
use crate::config::Timeouts;
use crate::http1::body::Framing;
use crate::upstream::RawConn;

/// What an exchange needs to know beside the two sides.
pub(super) struct Context<'a> {
    pub(super) timeouts: &'a Timeouts,
    pub(super) is_head: bool,
    /// The client asked to upgrade to a protocol that may be tunnelled.
    pub(super) upgrade: bool,
    pub(super) max_body: u64,
    /// How long the response head may take once the request is sent: the try's timeout.
    pub(super) response_header: Duration,
    /// When the request started (for the access log's upstream time) and when this try
    /// did (for the server's response time, which earlier tries must not add to).
    pub(super) started: Instant,
    pub(super) try_started: Instant,
    /// A sticky-session cookie to set on the response, pinning the client to this server.
    pub(super) set_cookie: Option<&'a HeaderValue>,
}

pub(super) enum Outcome {
    Responded(Responded),
    /// Nothing was sent to the client yet: Fulcrum answers instead.
    Failed(Failure),
    /// Something failed after the response head went out: the connection can only close.
    /// `upstream`: the server's doing rather than the client's.
    Broken {
        why: Cow<'static, str>,
        upstream: bool,
    },
}

pub(super) struct Responded {
    pub(super) status: StatusCode,
    /// From the start of this try (its connect included) to the upstream's response head.
    pub(super) response_time: Duration,
    pub(super) bytes: u64,
    pub(super) switched: bool,
    pub(super) upstream_reusable: bool,
    pub(super) client_keep_alive: bool,
}

/// Sends the request (head in `upstream_out`, then the body) and brings the response back,
/// both at once.
pub(super) async fn forward<B: RequestBody, W: ResponseWriter>(
    body: &mut B,
    writer: &mut W,
    upstream_out: &mut Vec<u8>,
    conn: &mut RawConn,
    framing: Framing,
    cx: &Context<'_>,
    log: &mut Option<AccessRecord<'_>>,
) -> Outcome {
    let request_sent = Notify::new();
    let request_done = AtomicBool::new(false);
    let head_sent = AtomicBool::new(false);
    let request = send_request(
        body,
        &conn.stream,
        upstream_out,
        framing,
        cx,
        &request_done,
        &request_sent,
    );
    let response = relay_response(
        writer,
        &conn.stream,
        &mut conn.buf,
        &mut conn.timer,
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
                Err(failure) if !head_sent.load(Ordering::Relaxed) => return Outcome::Failed(failure),
                Err(failure) => {
                    return Outcome::Broken {
                        upstream: failure.observed.is_some(),
                        why: failure.detail.unwrap_or(Cow::Borrowed(failure.reason)),
                    };
                }
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
                    Err(Relay::BeforeHead(failure)) => Outcome::Failed(failure),
                    Err(Relay::AfterHead(why)) => Outcome::Broken { why: why.into(), upstream: true },
                    Err(Relay::ClientGone(why)) => Outcome::Broken { why: why.into(), upstream: false },
                };
            }
        }
    }
}
