//! The request direction: the head Fulcrum wrote, then the client's body, framed for
//! HTTP/1.1, to the upstream.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::transport::Stream;
use tokio::sync::Notify;

use super::Failure;
use super::downstream::{Piece, RequestBody};
use super::exchange::Context;
use crate::http1::body::{self, Framing};
use crate::http1::io::{pass_body, write_all};

/// Writes the request head (already in `out`) and streams the body from the client to the
/// upstream, chunked when its length is unknown.
pub(super) async fn send_request<B: RequestBody>(
    body: &mut B,
    upstream: &Stream,
    out: &mut Vec<u8>,
    framing: Framing,
    cx: &Context<'_>,
    done: &AtomicBool,
    sent: &Notify,
) -> Result<(), Failure> {
    let idle = cx.timeouts.upstream_idle;
    let chunked = framing == Framing::Chunked;
    let mut total = 0u64;
    if framing != Framing::Empty {
        loop {
            match body.next().map_err(Failure::client_body)? {
                Some(Piece::Data(data)) => {
                    let n = data.len();
                    total += n as u64;
                    if total > cx.max_body {
                        return Err(Failure::body_too_large(cx.max_body));
                    }
                    pass_body(upstream, out, data, chunked, idle)
                        .await
                        .map_err(Failure::upstream_write)?;
                    body.consume(n);
                }
                Some(Piece::End) => break,
                None => {
                    if !out.is_empty() {
                        write_all(upstream, out, idle)
                            .await
                            .map_err(Failure::upstream_write)?;
                        out.clear();
                    }
                    body.fill().await.map_err(Failure::client_body)?;
                }
            }
        }
    }
    if chunked {
        out.extend_from_slice(body::LAST_CHUNK);
    }
    write_all(upstream, out, idle)
        .await
        .map_err(Failure::upstream_write)?;
    out.clear();
    done.store(true, Ordering::Relaxed);
    sent.notify_one();
    Ok(())
}
