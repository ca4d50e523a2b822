//! A running Fulcrum: listeners bound, accept loops started on one or more workers, and the
//! graceful shutdown that stops accepting, lets requests in flight finish, and waits at
//! most the grace period.
//!
//! A worker is a thread with its own single-threaded tokio runtime, as nginx and HAProxy
//! run one event loop per core: a connection, its upstream connections and their pool stay
//! on one thread, so nothing on the request path is shared across cores.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::Config;
use crate::listener::{self, Listener};
use crate::runtime::{Runtime, Shared};

pub struct Server {
    shared: Arc<Shared>,
    local_addrs: Vec<SocketAddr>,
    /// Per listener, with the number of permits it started with.
    connection_limits: Vec<(Arc<Semaphore>, u32)>,
    shutdown: watch::Sender<bool>,
    /// Where the admin listener listens, if there is one.
    admin_addr: Option<SocketAddr>,
    /// Where the admin API sends reload requests: see [`Server::send_reloads_to`].
    control: Arc<OnceLock<crate::control::Requests>>,
    /// This node of an active/standby group, with `[ha]`.
    ha: Option<crate::ha::HaHandle>,
}

/// A listener's sockets, one per worker, all bound to its address with `SO_REUSEPORT`: the
/// kernel hands each new connection to one worker, rather than waking every worker for it.
struct Bound {
    sockets: Vec<std::net::TcpListener>,
    connections: Arc<Semaphore>,
}

impl Server {
    /// Binds every listener and serves on the current tokio runtime, as a single worker
    /// (tests, embedding). Fails without serving anything if a listener cannot be bound.
    pub async fn start(config: Config) -> io::Result<Server> {
        let within = config.timeouts.upstream_connect;
        let (mut server, bound, admin) = Server::bind_all(config, 1)?;
        let first_answers = server.start_process_tasks(admin, &bound)?;
        first_answers.wait(within).await;
        tokio::spawn(sweep_idle_connections(
            server.shared.clone(),
            server.shutdown.subscribe(),
        ));
        for (index, mut b) in bound.into_iter().enumerate() {
            let listener = Listener {
                socket: TcpListener::from_std(b.sockets.remove(0))?,
                index,
                connections: b.connections,
            };
            tokio::spawn(listener::accept_loop(
                listener,
                server.shared.clone(),
                server.shutdown.subscribe(),
            ));
        }
        Ok(server)
    }

    /// Binds every listener and serves on `config.workers` worker threads.
    pub fn start_workers(config: Config) -> io::Result<Server> {
        let workers = config.workers;
        let within = config.timeouts.upstream_connect;
        let (mut server, mut bound, admin) = Server::bind_all(config, workers)?;
        let first_answers = server.start_process_tasks(admin, &bound)?;
        for worker in 0..workers {
            let mut listeners = Vec::new();
            for (index, b) in bound.iter_mut().enumerate() {
                listeners.push((
                    index,
                    b.sockets.pop().expect("a socket per worker"),
                    b.connections.clone(),
                ));
            }
            let (shared, shutdown) = (server.shared.clone(), server.shutdown.subscribe());
            let first_answers = first_answers.clone();
            std::thread::Builder::new()
                .name(format!("fulcrum-worker-{worker}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("cannot start a worker's runtime");
                    WORKER.set(worker);
                    runtime.block_on(async move {
                        tokio::spawn(sweep_idle_connections(shared.clone(), shutdown.clone()));
                        // Connections wait in the listen queue until servers given by name
                        // have addresses.
                        first_answers.wait(within).await;
                        for (index, socket, connections) in listeners {
                            let socket = TcpListener::from_std(socket)
                                .expect("a bound listener registers with the runtime");
                            tokio::spawn(listener::accept_loop(
                                Listener {
                                    socket,
                                    index,
                                    connections,
                                },
                                shared.clone(),
                                shutdown.clone(),
                            ));
                        }
                        // Connections finish on this runtime after accepting stops; the process
                        // ends the thread once shutdown is complete.
                        std::future::pending::<()>().await
                    });
                })?;
        }
        Ok(server)
    }

    /// Starts what runs once per process, on the caller's runtime, and shares its findings
    /// with every worker through the runtime it swaps in: the admin listener (on `admin`,
    /// bound by `bind_all`), the certificate watcher, the health checks, the resolver of
    /// servers given by name and, with `[ha]`, the node of the active/standby group.
    /// Returns what tells when the resolver's first answers are in.
    fn start_process_tasks(
        &mut self,
        admin: Option<std::net::TcpListener>,
        bound: &[Bound],
    ) -> io::Result<crate::discovery::dns::FirstAnswers> {
        if let Some(ha) = &self.shared.load().config.ha {
            self.ha = Some(crate::ha::start(
                ha,
                self.shared.clone(),
                self.shutdown.subscribe(),
            )?);
        }
        self.start_admin(admin, bound)?;
        tokio::spawn(crate::tls::watch::watch_certificates(
            self.shared.clone(),
            self.shutdown.subscribe(),
        ));
        tokio::spawn(crate::health::run_checks(
            self.shared.clone(),
            self.shutdown.subscribe(),
        ));
        let (resolving, first_answers) = crate::discovery::dns::resolve_server_names(
            self.shared.clone(),
            self.shutdown.subscribe(),
        );
        tokio::spawn(resolving);
        Ok(first_answers)
    }

    /// Serves the admin API on `socket` (bound by `bind_all`), on the caller's runtime.
    fn start_admin(
        &self,
        socket: Option<std::net::TcpListener>,
        bound: &[Bound],
    ) -> io::Result<()> {
        let Some(socket) = socket else { return Ok(()) };
        let listeners = self
            .local_addrs
            .iter()
            .zip(bound)
            .zip(&self.connection_limits)
            .map(|((&addr, b), (_, permits))| crate::admin::ListenerInfo {
                addr,
                connections: b.connections.clone(),
                permits: *permits,
                accept_loops: b.sockets.len(),
            })
            .collect();
        let mut cx =
            crate::admin::Context::new(self.shared.clone(), listeners, self.control.clone());
        cx.ha = self.ha.clone();
        crate::admin::spawn(socket, Arc::new(cx), self.shutdown.subscribe())
    }

    /// Binds `per_listener` sockets for each listener, and the admin listener's socket.
    #[allow(clippy::type_complexity)]
    fn bind_all(
        config: Config,
        per_listener: usize,
    ) -> io::Result<(Server, Vec<Bound>, Option<std::net::TcpListener>)> {
        let mut bound = Vec::new();
        let mut local_addrs = Vec::new();
        let mut connection_limits = Vec::new();
        for l in &config.listeners {
            let defer = l.defer_accept.then_some(config.timeouts.client_header);
            let sockets = bind_each(l.bind, defer, per_listener).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("listener `{}` cannot bind {}: {e}", l.name, l.bind),
                )
            })?;
            let addr = sockets[0].local_addr()?;
            tracing::info!(listener = %l.name, %addr, "listening");
            local_addrs.push(addr);
            let permits = u32::try_from(l.max_connections).unwrap_or(u32::MAX);
            let connections = Arc::new(Semaphore::new(permits as usize));
            connection_limits.push((connections.clone(), permits));
            bound.push(Bound {
                sockets,
                connections,
            });
        }
        let admin = crate::admin::bind(&config)?;
        let admin_addr = admin.as_ref().map(|s| s.local_addr()).transpose()?;
        let runtime = Runtime::build(config.clone(), None).map_err(io::Error::other)?;
        let shared = Arc::new(Shared::new(runtime, config));
        let (shutdown, _) = watch::channel(false);
        Ok((
            Server {
                shared,
                local_addrs,
                connection_limits,
                shutdown,
                admin_addr,
                control: Arc::default(),
                ha: None,
            },
            bound,
            admin,
        ))
    }

    /// Makes `config` the one new requests are served with: routes, upstreams, balancing,
    /// timeouts and limits. Servers that stay keep their pooled connections and state;
    /// servers that join (added, or no longer drained) ramp up over `slow_start`.
    /// Listeners, workers and logging are set up at start, so a config that changes them
    /// is refused, with what changed; the running config stays either way.
    pub fn reload(&self, config: Config) -> Result<(), String> {
        let current = self.shared.load();
        let changed = needs_restart(&current.config, &config);
        if !changed.is_empty() {
            return Err(format!(
                "{}: restart Fulcrum to apply {}",
                changed.join("; "),
                if changed.len() == 1 { "this" } else { "these" }
            ));
        }
        // Changes made through the admin API last until the file is loaded again.
        self.shared.update(|inputs| {
            inputs.file = config;
            inputs.overrides.clear();
            crate::discovery::dns::forget_unlisted(inputs);
        })
    }

    /// Has the admin API's `POST /api/reload` sent to `requests` (the run loop's), once.
    pub fn send_reloads_to(&self, requests: crate::control::Requests) {
        let _ = self.control.set(requests);
    }

    /// The snapshot new requests are served with now: upstreams, their servers and health.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.shared.load()
    }

    /// Where the admin listener listens, if the config has one (useful with port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// This node of the active/standby group, with `[ha]`.
    pub fn ha(&self) -> Option<crate::ha::HaHandle> {
        self.ha.clone()
    }

    /// The addresses actually bound, in config order (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Stops accepting, asks every connection to finish its requests in flight and close,
    /// and waits up to `grace`. Returns whether every connection closed in time. An active
    /// HA node first hands its role over and takes the virtual addresses off, so the peer
    /// serves new connections while these finish (see [`crate::ha::HaHandle::leave`]).
    pub async fn shutdown(self, grace: Duration) -> bool {
        if let Some(ha) = &self.ha {
            ha.leave(true).await;
        }
        let _ = self.shutdown.send(true);
        let drained = async {
            for (limit, permits) in &self.connection_limits {
                let _ = limit.acquire_many(*permits).await;
            }
        };
        tokio::time::timeout(grace, drained).await.is_ok()
    }
}

/// What differs between `old` and `new` that only a restart can apply.
fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    if old.workers != new.workers {
        changed.push(format!(
            "workers changed from {} to {}",
            old.workers, new.workers
        ));
    }
    let names = |c: &Config| {
        c.listeners
            .iter()
            .map(|l| l.name.clone())
            .collect::<Vec<_>>()
    };
    if names(old) != names(new) {
        changed.push(format!(
            "listeners changed from [{}] to [{}]",
            names(old).join(", "),
            names(new).join(", ")
        ));
    } else {
        for (o, n) in old.listeners.iter().zip(&new.listeners) {
            if o.bind != n.bind {
                changed.push(format!(
                    "listener `{}` bind changed from {} to {}",
                    o.name, o.bind, n.bind
                ));
            }
            if o.max_connections != n.max_connections {
                changed.push(format!("listener `{}` max_connections changed", o.name));
            }
            if o.defer_accept != n.defer_accept {
                changed.push(format!("listener `{}` defer_accept changed", o.name));
            }
        }
    }
    let admin_bind = |c: &Config| c.admin.as_ref().map(|a| a.bind);
    if admin_bind(old) != admin_bind(new) {
        let show = |bind: Option<SocketAddr>| bind.map_or("none".to_string(), |b| b.to_string());
        changed.push(format!(
            "admin bind changed from {} to {}",
            show(admin_bind(old)),
            show(admin_bind(new))
        ));
    }
    if old.control != new.control {
        let show = |c: &Config| {
            c.control
                .as_ref()
                .map_or("none".to_string(), |c| c.socket.display().to_string())
        };
        changed.push(format!(
            "control socket changed from {} to {}",
            show(old),
            show(new)
        ));
    }
    if old.ha != new.ha {
        changed.push("[ha] changed".to_string());
    }
    if old.access_log.enabled != new.access_log.enabled
        || old.access_log.format != new.access_log.format
    {
        changed.push("access_log changed".to_string());
    }
    changed
}

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker running the calling thread (0 outside worker threads), which
/// picks the worker's own slot in per-worker state such as connection pools.
pub fn worker() -> usize {
    WORKER.get()
}

/// Makes the calling thread count as worker `index`, for tests of per-worker state.
#[cfg(test)]
pub(crate) fn set_worker_for_tests(index: usize) {
    WORKER.set(index);
}

/// `count` listening sockets on `addr` (its port chosen once if it is 0), one per worker.
///
/// `SO_REUSEPORT` would also let another process bind the same address and silently take
/// a share of its connections, so the address is first bound without it, which fails if
/// anything listens there already, and let go just before the worker sockets take it.
fn bind_each(
    addr: SocketAddr,
    defer_accept: Option<Duration>,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let probe = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    probe.set_reuse_address(true)?;
    // Bound, never listening: no connection can land on it.
    probe.bind(&addr.into())?;
    let addr = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("a bound socket without an address"))?;
    drop(probe);
    (0..count.max(1))
        .map(|_| bind(addr, defer_accept))
        .collect()
}

/// A listening socket. With `defer_accept`, the kernel hands over a connection only once its
/// first bytes have arrived (or `defer_accept` has passed): a connecting client that sends
/// nothing costs no wakeup, and the first read finds the request there.
fn bind(addr: SocketAddr, defer_accept: Option<Duration>) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    // Lets a restarted Fulcrum bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    if let Some(wait) = defer_accept {
        set_defer_accept(&socket, wait)?;
    }
    socket.listen(4096)?;
    Ok(socket.into())
}

#[cfg(target_os = "linux")]
fn set_defer_accept(socket: &socket2::Socket, wait: Duration) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let seconds = libc::c_int::try_from(wait.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket descriptor, and a pointer to a c_int with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&seconds as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_defer_accept(_socket: &socket2::Socket, _wait: Duration) -> io::Result<()> {
    Ok(())
}

/// How often each worker looks over its idle upstream connections.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Closes, on the calling worker, pooled upstream connections that their server closed or
/// that are past their idle time, every `SWEEP_EVERY` until shutdown.
async fn sweep_idle_connections(shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    every(SWEEP_EVERY, shutdown, || {
        for upstream in &shared.load().upstreams {
            for server in upstream.servers.iter() {
                server.pool.sweep();
            }
        }
    })
    .await
}

/// Runs `job` every `period` (the first time at once) until shutdown; a late tick is
/// skipped, not caught up.
pub async fn every(period: Duration, mut shutdown: watch::Receiver<bool>, mut job: impl FnMut()) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            biased;
            _ = stopping(&mut shutdown) => return,
            _ = tick.tick() => job(),
        }
    }
}

/// Resolves once shutdown has been signalled (or the server is gone).
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&stop| stop).await;
}
