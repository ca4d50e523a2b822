//! The running state built once from a validated config: each listener's router, the
//! upstreams with their balancers and pools, and the HTTP settings. It is held in an
//! `ArcSwap` so a reload can replace it whole while requests in flight keep theirs.

use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

use crate::config::Config;
use crate::router::Router;
use crate::upstream::Upstream;

/// One immutable snapshot of everything a request needs.
pub struct Runtime {
    pub config: Config,
    /// In the order of `config.listeners`.
    pub listeners: Vec<ListenerRuntime>,
    pub upstreams: Vec<Arc<Upstream>>,
    /// Client-side HTTP/1.1 and HTTP/2 settings (limits, timeouts), shared by every listener.
    pub http: auto::Builder<TokioExecutor>,
}

pub struct ListenerRuntime {
    pub router: Router,
}

impl Runtime {
    pub fn build(config: Config) -> Self {
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| Arc::new(Upstream::build(u, config.timeouts.upstream_connect)))
            .collect();
        let listeners = config
            .listeners
            .iter()
            .map(|l| ListenerRuntime {
                router: Router::build(&l.routes, &upstreams),
            })
            .collect();
        let http = http_builder(&config);
        Runtime {
            config,
            listeners,
            upstreams,
            http,
        }
    }
}

fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let limits = &config.limits;
    builder
        .http1()
        .timer(TokioTimer::new())
        // Runs from when the connection is ready for a request until its whole header is in,
        // so a client that trickles its header byte by byte is cut off all the same.
        .header_read_timeout(config.timeouts.client_header)
        .max_headers(limits.max_headers)
        // The whole request head must fit in the read buffer, so its cap is the header limit.
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.http2.max_concurrent_streams)
        .max_header_list_size(config.http2.max_header_list_bytes)
        .max_pending_accept_reset_streams(config.http2.max_pending_resets)
        .max_local_error_reset_streams(Some(1024));
    builder
}

/// The current snapshot, swapped whole on reload.
pub struct Shared {
    current: ArcSwap<Runtime>,
}

impl Shared {
    pub fn new(runtime: Runtime) -> Self {
        Shared {
            current: ArcSwap::from_pointee(runtime),
        }
    }

    pub fn load(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    /// Makes `runtime` the one new requests see; requests already running keep the old one.
    pub fn replace(&self, runtime: Runtime) {
        self.current.store(Arc::new(runtime));
    }
}
