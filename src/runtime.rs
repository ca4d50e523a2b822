//! The running state built once from a validated config: each listener's router, the
//! upstreams with their balancers and pools, and the HTTP settings. It is held in an
//! `ArcSwap` so a reload can replace it whole while requests in flight keep theirs.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::router::Router;
use crate::tls::client::Connector;
use crate::tls::server::TlsListener;
use crate::upstream::Upstream;

/// One immutable snapshot of everything a request needs.
pub struct Runtime {
    pub config: Config,
    /// In the order of `config.listeners`.
    pub listeners: Vec<ListenerRuntime>,
    pub upstreams: Vec<Arc<Upstream>>,
    /// HTTP/2 settings for client connections (stream, header and flow-control limits),
    /// shared by every listener. HTTP/1.1 reads its limits from `config` directly.
    pub http2: h2::server::Builder,
}

pub struct ListenerRuntime {
    pub router: Router,
    /// The TLS settings new connections are accepted with, on a TLS listener.
    pub tls: Option<TlsListener>,
}

impl Runtime {
    /// Builds the snapshot for `config`. Replacing `previous` (a reload), upstreams of the
    /// same name keep the state of servers at the same address: pooled connections, load,
    /// marked down or ramping up; TLS listeners of the same name keep their session cache
    /// and ticket keys.
    pub fn build(config: Config, previous: Option<&Runtime>) -> Result<Self, String> {
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| {
                let before = previous
                    .and_then(|p| p.upstreams.iter().find(|old| old.name == u.name))
                    .map(|old| &**old);
                let mut upstream =
                    Upstream::build(u, config.workers, config.timeouts.upstream_connect, before);
                upstream.tls = match &u.tls {
                    Some(tls) => Some(
                        Connector::build(tls).map_err(|e| format!("upstream `{}`: {e}", u.name))?,
                    ),
                    None => None,
                };
                Ok(Arc::new(upstream))
            })
            .collect::<Result<_, String>>()?;
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let before = previous.and_then(|p| {
                let i = p
                    .config
                    .listeners
                    .iter()
                    .position(|old| old.name == l.name)?;
                Some((
                    p.listeners[i].tls.as_ref()?,
                    p.config.listeners[i].tls.as_ref()?,
                ))
            });
            let tls = match &l.tls {
                Some(tls) => Some(
                    TlsListener::build(tls, before)
                        .map_err(|e| format!("listener `{}`: {e}", l.name))?,
                ),
                None => None,
            };
            listeners.push(ListenerRuntime {
                router: Router::build(&l.routes, &upstreams),
                tls,
            });
        }
        let http2 = http2_builder(&config);
        Ok(Runtime {
            config,
            listeners,
            upstreams,
            http2,
        })
    }
}

fn http2_builder(config: &Config) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(config.http2.max_concurrent_streams)
        .max_header_list_size(config.http2.max_header_list_bytes)
        .max_pending_accept_reset_streams(config.http2.max_pending_resets)
        .max_local_error_reset_streams(Some(1024))
        // Room for a stream to upload at speed before its server reads it; the connection's
        // window bounds what all streams of one client may have buffered here at once.
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(SEND_BUFFER);
    builder
}

const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Response bytes buffered per stream waiting for the client's window.
const SEND_BUFFER: usize = 400 * 1024;

/// The current snapshot, swapped whole on reload.
pub struct Shared {
    current: Arc<ArcSwap<Runtime>>,
}

/// A connection's view of the current snapshot: reading it costs no shared-counter update
/// unless a reload has replaced it.
pub type RuntimeCache = arc_swap::Cache<Arc<ArcSwap<Runtime>>, Arc<Runtime>>;

impl Shared {
    pub fn new(runtime: Runtime) -> Self {
        Shared {
            current: Arc::new(ArcSwap::from_pointee(runtime)),
        }
    }

    pub fn load(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    pub fn cache(&self) -> RuntimeCache {
        arc_swap::Cache::new(self.current.clone())
    }

    /// Makes `runtime` the one new requests see; requests already running keep the old one.
    pub fn replace(&self, runtime: Runtime) {
        self.current.store(Arc::new(runtime));
    }
}
