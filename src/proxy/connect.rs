//! Picking a server and getting a connection to it: a pooled one when the worker has one
//! idle, else a new one, trying the next server the balancer picks when one cannot be
//! reached. Only failures that are the server's fault mark it down.

use std::sync::Arc;

use crate::upstream::{Affinity, ConnectError, RawConn, Server, Upstream};

/// A connection to a server of `upstream`, with the server's index. `probe`: pooled
/// connections are first checked for having been closed by the server, for requests that
/// could not be sent again. `fresh_only`: the pool is passed by (a retry after a pooled
/// connection turned out closed: the pool may hold more like it).
pub async fn connect<'u>(
    upstream: &'u Upstream,
    affinity: &Affinity,
    probe: bool,
    fresh_only: bool,
) -> Result<(usize, &'u Arc<Server>, RawConn), ConnectError> {
    let mut last_error = None;
    let mut failed = Vec::new();
    for attempt in 0..upstream.tries(affinity) {
        let Some((index, server)) = upstream.pick(attempt, affinity, &failed) else {
            break;
        };
        if !fresh_only && let Some(conn) = server.pool.take_raw(probe) {
            return Ok((index, server, conn));
        }
        match server.pool.connect_raw(upstream.tls.as_ref()).await {
            Ok(conn) => {
                upstream.reached(index);
                return Ok((index, server, conn));
            }
            Err(e) if e.is_servers_fault() => {
                tracing::warn!(upstream = %upstream.name, server = %server.address, error = %e, "upstream server unavailable");
                upstream.unreachable(index);
                last_error = Some(e);
                failed.push(index);
            }
            // At its connection limit: busy, not down; another server may have room.
            Err(e @ ConnectError::Busy(..)) => {
                tracing::warn!(upstream = %upstream.name, server = %server.address, error = %e, "upstream server at its connection limit");
                last_error = Some(e);
                failed.push(index);
            }
            // Out of descriptors, ports or buffers: Fulcrum's own trouble, which another
            // server would not cure, and no reason to mark this one down.
            Err(e) => {
                tracing::error!(upstream = %upstream.name, server = %server.address, error = %e, "cannot open an upstream connection");
                return Err(e);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        if upstream.servers.is_empty() {
            ConnectError::NoneResolved(upstream.name.clone())
        } else {
            ConnectError::NoServer
        }
    }))
}
