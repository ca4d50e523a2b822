//! HTTP/2 clients (prior knowledge), on the `h2` crate: the connection is driven here and
//! each stream becomes a request through the phases (`proxy::serve_request`), with
//! `stream`'s body reader and response writer, on a task of its own. A connection with no
//! open stream for `client_idle` is closed; a busy one is not, however slow its streams'
//! servers are.

mod stream;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::watch;

use super::prefixed::Prefixed;
use crate::proxy::ClientConn;
use crate::runtime::Shared;
use crate::server::stopping;
use crate::transport::Stream;

/// Serves an HTTP/2 connection whose first bytes (the preface, at least) are in `read`.
pub async fn serve(
    stream: Stream,
    read: BytesMut,
    client: ClientConn,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let peer = client.peer;
    let rt = shared.load();
    let client_idle = rt.config.timeouts.client_idle;
    let grace = rt.config.timeouts.shutdown_grace;
    let _ = stream.set_nodelay(true);
    let io = Prefixed::new(read.freeze(), stream);
    // Our SETTINGS go out and the client's preface is checked here (its bytes are already
    // read, within `client_header`); a client silent after it is idle, and goes after
    // `client_idle` with no stream open.
    let handshake = rt.http2.handshake(io);
    let mut conn = match tokio::time::timeout(rt.config.timeouts.client_header, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => return,
    };
    drop(rt);
    let client = Arc::new(client);
    let activity = Arc::new(Activity::new());
    let idle_check = tokio::time::sleep(client_idle);
    tokio::pin!(idle_check);
    let mut closing = false;
    // Once closing, the connection gets `client_idle` to finish: a client that stopped
    // reading would otherwise keep it open forever, its GOAWAY never written.
    let close_by = tokio::time::sleep(Duration::MAX);
    tokio::pin!(close_by);
    loop {
        if closing && close_by.is_elapsed() {
            break;
        }
        tokio::select! {
            biased;
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    let open = OpenStream::new(&activity);
                    let (client, rt) = (client.clone(), shared.load());
                    tokio::spawn(async move {
                        stream::serve(req, respond, &client, &rt).await;
                        drop(open);
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "HTTP/2 client connection ended with an error");
                    break;
                }
                None => break,
            },
            () = &mut idle_check, if !closing => match activity.idle_until(client_idle) {
                Some(until) => idle_check.as_mut().reset(until.into()),
                None => {
                    // Nothing open to finish: GOAWAY naming the last stream served, and close.
                    closing = true;
                    close_by.as_mut().reset((Instant::now() + client_idle).into());
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                }
            },
            () = stopping(&mut shutdown), if !closing => {
                // GOAWAY: no new streams; the open ones finish, then the connection ends.
                closing = true;
                close_by.as_mut().reset((Instant::now() + grace).into());
                conn.graceful_shutdown();
            }
            () = &mut close_by, if closing => {
                tracing::debug!(%peer, "HTTP/2 connection did not finish closing in time");
                break;
            }
        }
    }
}

/// How many streams are open on a connection, and when the last one ended.
struct Activity {
    started: Instant,
    open: AtomicUsize,
    /// Milliseconds from `started` to the end of the latest stream.
    last_end_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            started: Instant::now(),
            open: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
        }
    }

    /// When the connection will have idled for `limit`, or `None` if it already has: a
    /// connection is idle while no stream is open.
    fn idle_until(&self, limit: Duration) -> Option<Instant> {
        let now = Instant::now();
        if self.open.load(Ordering::Relaxed) > 0 {
            return Some(now + limit);
        }
        let last = self.started + Duration::from_millis(self.last_end_ms.load(Ordering::Relaxed));
        let until = last + limit;
        (until > now).then_some(until)
    }
}

/// Counts a stream as open until dropped.
struct OpenStream(Arc<Activity>);

impl OpenStream {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.open.fetch_add(1, Ordering::Relaxed);
        OpenStream(activity.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let ms = self.0.started.elapsed().as_millis() as u64;
        self.0.last_end_ms.fetch_max(ms, Ordering::Relaxed);
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}
