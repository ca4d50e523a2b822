//! The access log: one structured line per request, written when its response has been
//! sent (or abandoned), through `tracing` under the target `access`. The same record counts
//! the request in the metrics, whether or not the line is written.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use http::{Method, StatusCode, Uri, Version};

use crate::runtime::Runtime;
use crate::upstream::Server;
use crate::upstream::stats::ClassCounts;

/// What is known about one request so far; counted and logged once, when dropped.
pub struct AccessRecord<'rt> {
    pub client: IpAddr,
    pub method: Method,
    /// Cloning a `Uri` shares its bytes; no copy is made per request.
    pub uri: Uri,
    pub version: Version,
    pub started: Instant,
    /// When the response was all written, if the clock was read for it already; else the
    /// record's drop reads it.
    pub ended: Option<Instant>,
    pub status: StatusCode,
    pub upstream: Option<SocketAddr>,
    /// Time from the start of the request until the upstream's response header arrived.
    pub upstream_time: Option<Duration>,
    pub bytes: u64,
    /// Why Fulcrum answered itself or the response ended early.
    pub reason: Option<Cow<'static, str>>,
    /// Whether the response body was sent to its end.
    pub complete: bool,
    /// The server that answered, whose statistics count the request; `None`: Fulcrum's
    /// own answer.
    pub server: Option<&'rt Server>,
    /// The counts of the route that took the request; `None`: refused before routing.
    pub route: Option<&'rt ClassCounts>,
    /// The slot of the listener the request came in on.
    listener: usize,
    rt: &'rt Runtime,
}

impl<'rt> AccessRecord<'rt> {
    pub fn new<B>(
        req: &http::Request<B>,
        client: IpAddr,
        started: Instant,
        rt: &'rt Runtime,
        listener: usize,
    ) -> Self {
        // Only the log line needs the URI: not kept (nor its bytes shared) without one.
        let logged = rt.config.access_log.enabled;
        AccessRecord {
            client,
            method: req.method().clone(),
            uri: if logged {
                req.uri().clone()
            } else {
                Uri::default()
            },
            version: req.version(),
            started,
            ended: None,
            status: StatusCode::OK,
            upstream: None,
            upstream_time: None,
            bytes: 0,
            reason: None,
            complete: false,
            server: None,
            route: None,
            listener,
            rt,
        }
    }

    /// The status the request ended with, as the metrics count it: `None` when it ended
    /// before any (the client left while the request was waiting for its server).
    fn final_status(&self) -> Option<u16> {
        let answered = self.complete || self.reason.is_some() || self.upstream_time.is_some();
        answered.then_some(self.status.as_u16())
    }
}

impl Drop for AccessRecord<'_> {
    fn drop(&mut self) {
        let elapsed = match self.ended {
            Some(ended) => ended.saturating_duration_since(self.started),
            None => self.started.elapsed(),
        };
        let status = self.final_status();
        let stats = self.server.map_or(&*self.rt.answers, |s| &s.stats);
        stats.record(self.listener, status, elapsed);
        if let Some(route) = self.route {
            route.record(status);
        }
        if !self.rt.config.access_log.enabled {
            return;
        }
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
            duration_ms = millis(elapsed),
            upstream_ms,
            reason,
        );
    }
}
