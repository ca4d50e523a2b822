//! The access log: one structured line per request, written when its response has been
//! sent (or abandoned), through `tracing` under the target `access`.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use http::{Method, StatusCode, Uri, Version};

/// What is known about one request so far; emitted once, when dropped.
#[derive(Debug)]
pub struct AccessRecord {
    pub client: IpAddr,
    pub method: Method,
    /// Cloning a `Uri` shares its bytes; no copy is made per request.
    pub uri: Uri,
    pub version: Version,
    pub started: Instant,
    pub status: StatusCode,
    pub upstream: Option<SocketAddr>,
    /// Time from the start of the request until the upstream's response header arrived.
    pub upstream_time: Option<Duration>,
    pub bytes: u64,
    /// Why Fulcrum answered itself or the response ended early.
    pub reason: Option<Cow<'static, str>>,
    /// Whether the response body was sent to its end.
    pub complete: bool,
}

impl AccessRecord {
    pub fn new<B>(req: &http::Request<B>, client: IpAddr, started: Instant) -> Self {
        AccessRecord {
            client,
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            started,
            status: StatusCode::OK,
            upstream: None,
            upstream_time: None,
            bytes: 0,
            reason: None,
            complete: false,
        }
    }
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        let reason = match (&self.reason, self.complete) {
            (Some(reason), _) => reason.as_ref(),
            (None, true) => "-",
            (None, false) => "response not completed: client or upstream closed early",
        };
        let upstream = self
            .upstream
            .map_or(Cow::Borrowed("-"), |a| Cow::Owned(a.to_string()));
        // Milliseconds to the microsecond, which print short in text and stay numbers in JSON.
        let millis = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let upstream_ms = self.upstream_time.map_or(-1.0, millis);
        tracing::info!(
            target: "access",
            client = %self.client,
            method = %self.method,
            path = %self.uri.path(),
            version = ?self.version,
            status = self.status.as_u16(),
            upstream = %upstream,
            bytes = self.bytes,
            duration_ms = millis(self.started.elapsed()),
            upstream_ms,
            reason,
        );
    }
}
