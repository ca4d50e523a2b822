//! One try's connection: the server the upstream picks for it (passing over servers the
//! request has already failed on), a pooled connection when the worker has one idle, else a
//! new one. Only failures that are the server's fault mark it down.

use std::sync::Arc;
use std::time::Instant;

use crate::upstream::{Affinity, ConnectError, RawConn, Server, Upstream};

/// A connection for one try, to server `index`.
pub struct Connected<'u> {
    pub index: usize,
    pub server: &'u Arc<Server>,
    pub conn: RawConn,
    /// The server was out (down, ejected, unreachable) when picked: every server was.
    pub was_out: bool,
}

/// Why a try found no connection.
pub struct Unconnected {
    /// The server that could not be reached, which the request should not try again.
    pub index: Option<usize>,
    pub error: ConnectError,
    pub was_out: bool,
}

impl Unconnected {
    /// Another server may do better: the failure is not Fulcrum's own lack of resources.
    pub fn worth_another_try(&self) -> bool {
        self.index.is_some() && !matches!(self.error, ConnectError::Local(..))
    }
}

/// A connection to the server `upstream` picks for try `attempt` of a request that failed
/// on the servers in `failed`. `probe`: pooled connections are first checked for having
/// been closed by the server, for requests that could not be sent again. `fresh_only`: the
/// pool is passed by (a retry after a pooled connection turned out closed: the pool may
/// hold more like it). `now`: the try's start, by which a pooled connection's idle time is
/// judged.
pub async fn connect<'u>(
    upstream: &'u Upstream,
    affinity: &Affinity,
    attempt: usize,
    failed: &[usize],
    probe: bool,
    fresh_only: bool,
    now: Instant,
) -> Result<Connected<'u>, Unconnected> {
    let Some((index, server)) = upstream.pick(attempt, affinity, failed) else {
        return Err(Unconnected {
            index: None,
            error: if upstream.servers.is_empty() {
                ConnectError::NoneResolved(upstream.name.clone())
            } else {
                ConnectError::NoServer
            },
            was_out: false,
        });
    };
    let was_out = server.share() == 0;
    if !fresh_only && let Some(conn) = server.pool.take_raw(probe, now) {
        return Ok(Connected {
            index,
            server,
            conn,
            was_out,
        });
    }
    let error = match server.pool.connect_raw(upstream.tls.as_ref()).await {
        Ok(conn) => {
            upstream.reached(index);
            return Ok(Connected {
                index,
                server,
                conn,
                was_out,
            });
        }
        Err(e) => e,
    };
    match &error {
        e if e.is_servers_fault() => {
            tracing::warn!(upstream = %upstream.name, server = %server.address, error = %e, "upstream server unavailable");
            upstream.unreachable(index);
        }
        // At its connection limit: busy, not down; another server may have room.
        e @ ConnectError::Busy(..) => {
            tracing::warn!(upstream = %upstream.name, server = %server.address, error = %e, "upstream server at its connection limit");
        }
        // Out of descriptors, ports or buffers: Fulcrum's own trouble, which another server
        // would not cure, and no reason to mark this one down.
        e => {
            tracing::error!(upstream = %upstream.name, server = %server.address, error = %e, "cannot open an upstream connection");
        }
    }
    Err(Unconnected {
        index: Some(index),
        error,
        was_out,
    })
}
