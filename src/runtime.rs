//! The running state built once from a validated config: each listener's router, the
//! upstreams with their balancers and pools, and the HTTP settings. It is held in an
//! `ArcSwap` so a reload can replace it whole while requests in flight keep theirs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::config::{Config, ListenerMode};
use crate::l4::log::TcpStats;
use crate::router::Router;
use crate::tls::client::Connector;
use crate::tls::server::TlsListener;
use crate::upstream::Upstream;
use crate::upstream::stats::RequestStats;

/// One immutable snapshot of everything a request needs.
pub struct Runtime {
    pub config: Config,
    /// In the order of `config.listeners`.
    pub listeners: Vec<ListenerRuntime>,
    /// Per listener slot ever given out, the listener's index in `listeners`, or `NONE`
    /// once it is gone: a connection keeps its listener's slot, which no reload reuses.
    by_slot: Box<[u32]>,
    pub upstreams: Vec<Arc<Upstream>>,
    /// HTTP/2 settings for client connections (stream, header and flow-control limits),
    /// shared by every listener. HTTP/1.1 reads its limits from `config` directly.
    pub http2: h2::server::Builder,
    /// Requests Fulcrum answered itself without a server, for the metrics; carried over
    /// from the snapshot this one replaces.
    pub answers: Arc<RequestStats>,
}

pub struct ListenerRuntime {
    /// The listener's identity for as long as it keeps its sockets: the same through
    /// reloads that leave its `bind` alone, a new one (never given out
    /// before) for a listener added or rebound.
    pub slot: usize,
    pub router: Router,
    /// The TLS settings new connections are accepted with, on a TLS listener.
    pub tls: Option<TlsListener>,
    /// A `mode = "tcp"` listener's counts, kept through reloads that keep its slot.
    pub tcp: Option<Arc<TcpStats>>,
}

/// `Runtime::by_slot` for a slot whose listener is gone.
const NONE: u32 = u32::MAX;

/// Whether `new` keeps the sockets (and so the slot and the connections) of `old`: the
/// same name and bind, and UDP both or neither. Anything else about a listener changes in
/// place.
pub fn same_sockets(
    old: &crate::config::ListenerConfig,
    new: &crate::config::ListenerConfig,
) -> bool {
    use crate::server::SocketKind;
    old.name == new.name && old.bind == new.bind && SocketKind::of(old) == SocketKind::of(new)
}

impl Runtime {
    /// The index in `listeners` (and `config.listeners`) of the listener in `slot`, or
    /// `None` if a reload removed it: its connections finish and close.
    pub fn listener_index(&self, slot: usize) -> Option<usize> {
        match self.by_slot.get(slot) {
            Some(&i) if i != NONE => Some(i as usize),
            _ => None,
        }
    }

    /// The config of the listener in `slot`, unless a reload removed it.
    pub fn listener_config(&self, slot: usize) -> Option<&crate::config::ListenerConfig> {
        Some(&self.config.listeners[self.listener_index(slot)?])
    }

    /// Builds the snapshot for `config`. Replacing `previous` (a reload), upstreams of the
    /// same name keep the state of servers at the same address: pooled connections, load,
    /// marked down or ramping up; TLS listeners of the same name keep their session cache
    /// and ticket keys, and the routes they still have, their request counts.
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
        let mut next_slot = previous.map_or(0, |p| p.by_slot.len());
        for l in &config.listeners {
            let same = previous.and_then(|p| {
                let i = p
                    .config
                    .listeners
                    .iter()
                    .position(|old| old.name == l.name)?;
                Some((p, i))
            });
            let slot = match same {
                Some((p, i)) if same_sockets(&p.config.listeners[i], l) => p.listeners[i].slot,
                _ => {
                    next_slot += 1;
                    next_slot - 1
                }
            };
            let before = same.and_then(|(p, i)| {
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
            let tcp = match &l.mode {
                ListenerMode::Tcp(_) => Some(
                    previous
                        .and_then(|p| {
                            let i = p.listener_index(slot)?;
                            p.listeners[i].tcp.clone()
                        })
                        .unwrap_or_else(|| Arc::new(TcpStats::new(&l.name, config.workers))),
                ),
                _ => None,
            };
            listeners.push(ListenerRuntime {
                slot,
                tcp,
                router: Router::build(
                    &l.routes,
                    &upstreams,
                    config.workers,
                    same.map(|(p, i)| (&p.config.listeners[i].routes[..], &p.listeners[i].router)),
                ),
                tls,
            });
        }
        let mut by_slot = vec![NONE; next_slot].into_boxed_slice();
        for (i, l) in listeners.iter().enumerate() {
            by_slot[l.slot] = u32::try_from(i).expect("fewer than 2^32 listeners");
        }
        let http2 = http2_builder(&config);
        let answers = previous.map_or_else(
            || Arc::new(RequestStats::new(config.workers)),
            |p| p.answers.clone(),
        );
        Ok(Runtime {
            config,
            listeners,
            by_slot,
            upstreams,
            http2,
            answers,
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

/// The current snapshot, swapped whole on reload, and what it is built from.
pub struct Shared {
    current: Arc<ArcSwap<Runtime>>,
    /// Held while a new snapshot is built, so that a reload, a DNS answer and an admin
    /// change made at once each see the others.
    inputs: Mutex<Inputs>,
    /// Told of every snapshot swapped in, for the tasks that follow the config (the
    /// resolver of server names takes up a reload's new names at once).
    swapped: tokio::sync::Notify,
}

/// What the running snapshot is built from: the config file, what DNS last answered for
/// servers given by name, and what the admin API changed since the file was last loaded.
#[derive(Debug)]
pub struct Inputs {
    /// The config as loaded and validated.
    pub file: Config,
    /// The addresses of servers given by name, by upstream name and the name as written
    /// (`host:port`).
    pub resolved: HashMap<(String, String), Vec<SocketAddr>>,
    /// Changes to servers made through the admin API, by upstream name and server address;
    /// a reload drops them.
    pub overrides: HashMap<(String, SocketAddr), ServerOverride>,
}

/// A change to one server made at run time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerOverride {
    pub weight: Option<u32>,
    pub drain: Option<bool>,
    pub disabled: Option<bool>,
}

impl Inputs {
    /// The config a snapshot is built from: the file's, with a server for each address
    /// its named servers resolved to, and the admin API's changes.
    pub fn effective(&self) -> Config {
        let mut config = self.file.clone();
        crate::discovery::dns::expand(&mut config, &self.resolved);
        for upstream in &mut config.upstreams {
            for server in &mut upstream.servers {
                let key = (upstream.name.clone(), server.address);
                if let Some(o) = self.overrides.get(&key) {
                    server.weight = o.weight.unwrap_or(server.weight);
                    server.drain = o.drain.unwrap_or(server.drain);
                    server.disabled = o.disabled.unwrap_or(server.disabled);
                }
            }
        }
        config
    }
}

/// A connection's view of the current snapshot: reading it costs no shared-counter update
/// unless a reload has replaced it.
pub type RuntimeCache = arc_swap::Cache<Arc<ArcSwap<Runtime>>, Arc<Runtime>>;

impl Shared {
    /// Starts from `runtime`, which was built from `file` as it is.
    pub fn new(runtime: Runtime, file: Config) -> Self {
        Shared {
            current: Arc::new(ArcSwap::from_pointee(runtime)),
            inputs: Mutex::new(Inputs {
                file,
                resolved: HashMap::new(),
                overrides: HashMap::new(),
            }),
            swapped: tokio::sync::Notify::new(),
        }
    }

    pub fn load(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    pub fn cache(&self) -> RuntimeCache {
        arc_swap::Cache::new(self.current.clone())
    }

    /// Applies `change` to what the snapshot is built from and swaps in a snapshot built
    /// anew; servers that stay keep their pools and state. If the build fails, nothing
    /// changes, `change` included.
    pub fn update(&self, change: impl FnOnce(&mut Inputs)) -> Result<(), String> {
        let mut inputs = self.inputs.lock().unwrap_or_else(|e| e.into_inner());
        let before = (
            inputs.file.clone(),
            inputs.resolved.clone(),
            inputs.overrides.clone(),
        );
        change(&mut inputs);
        match Runtime::build(inputs.effective(), Some(&self.load())) {
            Ok(runtime) => {
                self.current.store(Arc::new(runtime));
                self.swapped.notify_waiters();
                Ok(())
            }
            Err(e) => {
                (inputs.file, inputs.resolved, inputs.overrides) = before;
                Err(e)
            }
        }
    }

    /// Changes what later snapshots are built from without building one now: for a change
    /// already made to the current snapshot in place (certificates the watcher swapped in),
    /// which a rebuild for another reason must not undo.
    pub fn remember(&self, change: impl FnOnce(&mut Inputs)) {
        change(&mut self.inputs.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Resolves once a snapshot is swapped in after this call.
    pub fn swapped(&self) -> tokio::sync::futures::Notified<'_> {
        self.swapped.notified()
    }

    /// Reads what the snapshot is built from.
    pub fn inputs<T>(&self, read: impl FnOnce(&Inputs) -> T) -> T {
        read(&self.inputs.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
