//! What a TCP listener counts and logs: each connection's outcome and bytes each way, in
//! per-worker shards the metrics add up, and one access log line (target `access`) per
//! connection when it ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::server::worker;

/// How a TCP connection through a listener ended, as the metrics and the log name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides closed.
    Closed,
    /// The client reset it (the server was reset too).
    ClientReset,
    /// The server reset it (the client was reset too).
    ServerReset,
    /// Nothing moved either way for the listener's `idle_timeout`.
    IdleTimeout,
    /// The relay failed on another error.
    Failed,
    /// A client not in `proxy_protocol_from` opened with a PROXY header.
    RefusedProxyHeader,
    /// A client in `proxy_protocol_from` sent no valid PROXY header in time.
    BadProxyHeader,
    /// A TLS passthrough listener got no valid ClientHello in time.
    NotTls,
    /// No route takes the ClientHello's server name and protocols.
    NoRoute,
    /// No server of the upstream could be connected to.
    ConnectFailed,
    /// Still open when `shutdown_grace` ran out; both sides reset.
    Shutdown,
}

impl Outcome {
    pub const ALL: [Outcome; 11] = [
        Outcome::Closed,
        Outcome::ClientReset,
        Outcome::ServerReset,
        Outcome::IdleTimeout,
        Outcome::Failed,
        Outcome::RefusedProxyHeader,
        Outcome::BadProxyHeader,
        Outcome::NotTls,
        Outcome::NoRoute,
        Outcome::ConnectFailed,
        Outcome::Shutdown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::ClientReset => "client_reset",
            Outcome::ServerReset => "server_reset",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::Failed => "failed",
            Outcome::RefusedProxyHeader => "refused_proxy_header",
            Outcome::BadProxyHeader => "bad_proxy_header",
            Outcome::NotTls => "not_tls",
            Outcome::NoRoute => "no_route",
            Outcome::ConnectFailed => "connect_failed",
            Outcome::Shutdown => "shutdown",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A TCP listener's connections by outcome and bytes each way, kept across reloads for as
/// long as the listener keeps its sockets.
#[derive(Debug)]
pub struct TcpStats {
    /// The listener's name, which the log line and the metrics carry.
    pub listener: Box<str>,
    shards: Box<[Shard]>,
}

/// One worker's counts, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    from_client: AtomicU64,
    from_server: AtomicU64,
}

/// `TcpStats` added up over the workers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcpTotals {
    /// In the order of [`Outcome::ALL`].
    pub outcomes: [u64; Outcome::ALL.len()],
    pub from_client: u64,
    pub from_server: u64,
}

impl TcpTotals {
    pub fn connections(&self) -> u64 {
        self.outcomes.iter().sum()
    }
}

impl TcpStats {
    pub fn new(listener: &str, workers: usize) -> Self {
        TcpStats {
            listener: listener.into(),
            shards: (0..workers.max(1)).map(|_| Shard::default()).collect(),
        }
    }

    /// Counts one connection that ended.
    pub fn record(&self, outcome: Outcome, from_client: u64, from_server: u64) {
        let shard = &self.shards[worker().min(self.shards.len() - 1)];
        shard.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
        if from_client != 0 {
            shard.from_client.fetch_add(from_client, Ordering::Relaxed);
        }
        if from_server != 0 {
            shard.from_server.fetch_add(from_server, Ordering::Relaxed);
        }
    }

    pub fn totals(&self) -> TcpTotals {
        let mut totals = TcpTotals::default();
        for shard in &self.shards {
            for (total, count) in totals.outcomes.iter_mut().zip(&shard.outcomes) {
                *total += count.load(Ordering::Relaxed);
            }
            totals.from_client += shard.from_client.load(Ordering::Relaxed);
            totals.from_server += shard.from_server.load(Ordering::Relaxed);
        }
        totals
    }
}

/// One TCP connection's log line, as it ended.
pub struct ConnectionLog<'a> {
    pub listener: &'a str,
    /// The client: the PROXY header's source when one was read.
    pub client: SocketAddr,
    pub sni: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub server: Option<SocketAddr>,
    pub from_client: u64,
    pub from_server: u64,
    pub duration: Duration,
    pub outcome: Outcome,
    /// What went wrong, for outcomes that are failures.
    pub detail: Option<&'a str>,
}

impl ConnectionLog<'_> {
    pub fn write(&self) {
        let millis = (self.duration.as_secs_f64() * 1e6).round() / 1e3;
        tracing::info!(
            target: "access",
            mode = "tcp",
            client = %self.client,
            listener = self.listener,
            sni = self.sni.unwrap_or("-"),
            upstream = self.upstream.unwrap_or("-"),
            server = %OrDash(self.server),
            bytes_from_client = self.from_client,
            bytes_from_server = self.from_server,
            duration_ms = millis,
            end = self.outcome.name(),
            reason = self.detail.unwrap_or("-"),
        );
    }
}

/// A value, or `-` for none, written without making a string first.
struct OrDash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(value) => value.fmt(f),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_listed_in_index_order() {
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(outcome.index(), i, "{}", outcome.name());
        }
    }

    #[test]
    fn totals_add_up_every_record() {
        let stats = TcpStats::new("db", 3);
        stats.record(Outcome::Closed, 10, 20);
        stats.record(Outcome::Closed, 1, 2);
        stats.record(Outcome::NoRoute, 0, 0);
        let totals = stats.totals();
        assert_eq!(totals.connections(), 3);
        assert_eq!(totals.outcomes[Outcome::Closed.index()], 2);
        assert_eq!(totals.outcomes[Outcome::NoRoute.index()], 1);
        assert_eq!((totals.from_client, totals.from_server), (11, 22));
    }
}
