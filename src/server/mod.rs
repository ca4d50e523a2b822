//! A running Fulcrum: listeners bound, accept loops started on one or more workers, and the
//! graceful shutdown that stops accepting, lets requests in flight finish, and waits at
//! most the grace period.
//!
//! A worker is a thread with its own single-threaded tokio runtime, as nginx and HAProxy
//! run one event loop per core: a connection, its upstream connections and their pool stay
//! on one thread, so nothing on the request path is shared across cores.

mod listeners;

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::watch;

use crate::config::Config;
use crate::runtime::{Runtime, Shared};
use crate::upgrade::Inherited;
use listeners::{ListenerSet, Opened};

pub use listeners::{HandedListener, Handover, SocketKind};

pub struct Server {
    shared: Arc<Shared>,
    /// The runtimes accept loops run on, one per worker: a listener added by a reload gets
    /// a loop on each.
    workers: Vec<Handle>,
    /// The listeners running, and those removed by a reload whose connections are still
    /// finishing. Shared with the HA node, which pauses them for a switchover.
    listeners: Arc<Mutex<ListenerSet>>,
    /// Stops what runs once per process (health checks, resolver, admin listener) and the
    /// workers' sweeps; each listener has a stop of its own.
    shutdown: watch::Sender<bool>,
    /// The admin listener's socket (a duplicate of the one it accepts on), for a handover.
    admin: Option<std::net::TcpListener>,
    /// Where the admin listener listens, if there is one.
    admin_addr: Option<SocketAddr>,
    /// What the admin API shows of the listeners, updated as they change.
    admin_listeners: crate::admin::ListenerTable,
    /// What the UDP listeners count, by slot, updated as they change.
    udp: crate::l4::udp::UdpTable,
    /// Drawn (or handed over) at start, so that cookies stay valid through an upgrade.
    sticky_key: [u8; 16],
    /// Where the admin API sends reload requests: see [`Server::send_reloads_to`].
    control: Arc<OnceLock<crate::control::Requests>>,
    /// This node of an active/standby group, with `[ha]`.
    ha: Option<crate::ha::HaHandle>,
}

impl Server {
    /// Binds every listener and serves on the current tokio runtime, as a single worker
    /// (tests, embedding). Fails without serving anything if a listener cannot be bound.
    pub async fn start(config: Config) -> io::Result<Server> {
        let within = config.timeouts.upstream_connect;
        let (mut server, opened, admin) = Server::bind_all(config, vec![Handle::current()], None)?;
        let first_answers = server.start_process_tasks(admin, false)?;
        first_answers.wait(within).await;
        tokio::spawn(sweep_idle_connections(
            server.shared.clone(),
            server.shutdown.subscribe(),
        ));
        server.serve(opened, None);
        Ok(server)
    }

    /// Binds every listener and serves on `config.workers` worker threads.
    pub fn start_workers(config: Config) -> io::Result<Server> {
        Server::start_workers_inheriting(config, None)
    }

    /// Like [`Server::start_workers`], taking over the listening sockets a running Fulcrum
    /// handed over (`crate::upgrade::hand_over`) where a listener's name and configured
    /// bind match, and binding the rest; handed sockets no listener takes are closed. Once
    /// accept loops run, tells the old process it may stop accepting.
    pub fn start_workers_inheriting(
        config: Config,
        mut inherited: Option<Inherited>,
    ) -> io::Result<Server> {
        let workers = config.workers.max(1);
        let within = config.timeouts.upstream_connect;
        if let Some(key) = inherited.as_ref().map(|i| i.sticky_key)
            && !crate::upstream::sticky::adopt_process_key(key)
        {
            tracing::warn!(
                "sticky cookies of the old process will not pin: a key was drawn already"
            );
        }
        let runtimes = (0..workers)
            .map(|_| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            })
            .collect::<io::Result<Vec<_>>>()?;
        let handles = runtimes.iter().map(|r| r.handle().clone()).collect();
        let (mut server, opened, admin) =
            match Server::bind_all(config, handles, inherited.as_mut()) {
                Ok(bound) => bound,
                Err(e) => {
                    // Dropped on the caller's runtime, a runtime must not wait for its tasks.
                    runtimes.into_iter().for_each(|r| r.shutdown_background());
                    return Err(e);
                }
            };
        for (worker, runtime) in runtimes.into_iter().enumerate() {
            std::thread::Builder::new()
                .name(format!("fulcrum-worker-{worker}"))
                .spawn(move || {
                    WORKER.set(worker);
                    // Connections finish on this runtime after accepting stops; the process
                    // ends the thread once shutdown is complete.
                    runtime.block_on(std::future::pending::<()>());
                })?;
        }
        let first_answers = server.start_process_tasks(admin, inherited.is_some())?;
        for handle in &server.workers {
            handle.spawn(sweep_idle_connections(
                server.shared.clone(),
                server.shutdown.subscribe(),
            ));
        }
        // Connections wait in the listen queue until servers given by name have addresses.
        let (ready_tx, ready) = watch::channel(false);
        tokio::spawn(async move {
            first_answers.wait(within).await;
            let _ = ready_tx.send(true);
        });
        server.serve(opened, Some(ready.clone()));
        if let Some(inherited) = inherited {
            tokio::spawn(async move {
                let mut ready = ready;
                let _ = ready.wait_for(|&r| r).await;
                if let Err(e) = inherited.ready() {
                    tracing::error!(error = %e, "cannot tell the old process this one serves");
                }
            });
        }
        Ok(server)
    }

    /// Starts the accept loops of `opened` listeners, spreading their sockets over the
    /// workers, each loop once `ready` (if given) is true.
    fn serve(&self, opened: Vec<Opened>, ready: Option<watch::Receiver<bool>>) {
        self.serve_in(&mut lock(&self.listeners), opened, ready);
    }

    fn serve_in(
        &self,
        set: &mut ListenerSet,
        opened: Vec<Opened>,
        ready: Option<watch::Receiver<bool>>,
    ) {
        for listener in opened {
            let running = listener.start(&self.workers, &self.shared, ready.clone());
            if set.paused {
                running.pause();
            }
            lock(&self.admin_listeners).insert(running.slot, running.info());
            if let Some(stats) = &running.udp {
                lock(&self.udp).insert(running.slot, stats.clone());
            }
            set.running.push(running);
        }
    }

    /// Starts what runs once per process, on the caller's runtime, and shares its findings
    /// with every worker through the runtime it swaps in: the admin listener (on `admin`,
    /// bound by `bind_all`), the certificate watcher, the health checks, the resolver of
    /// servers given by name and, with `[ha]`, the node of the active/standby group.
    /// Returns what tells when the resolver's first answers are in. `upgraded`: this
    /// process was started by a binary upgrade (the HA node takes the role over with the
    /// addresses it finds).
    fn start_process_tasks(
        &mut self,
        admin: Option<std::net::TcpListener>,
        upgraded: bool,
    ) -> io::Result<crate::discovery::dns::FirstAnswers> {
        if let Some(ha) = &self.shared.load().config.ha {
            self.ha = Some(crate::ha::start(
                ha,
                self.shared.clone(),
                self.shutdown.subscribe(),
                self.quiesce(),
                upgraded,
            )?);
        }
        if let Some(socket) = admin {
            let mut cx = crate::admin::Context::new(
                self.shared.clone(),
                self.admin_listeners.clone(),
                self.control.clone(),
            );
            cx.ha = self.ha.clone();
            cx.udp = self.udp.clone();
            crate::admin::spawn(socket, Arc::new(cx), self.shutdown.subscribe())?;
        }
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

    /// Binds (or takes from `inherited`) one socket per worker for each listener, and the
    /// admin listener's socket.
    #[allow(clippy::type_complexity)]
    fn bind_all(
        config: Config,
        workers: Vec<Handle>,
        mut inherited: Option<&mut Inherited>,
    ) -> io::Result<(Server, Vec<Opened>, Option<std::net::TcpListener>)> {
        let runtime = Runtime::build(config.clone(), None).map_err(io::Error::other)?;
        let mut opened = Vec::new();
        for (l, running) in config.listeners.iter().zip(&runtime.listeners) {
            let handed = inherited.as_deref_mut().and_then(|i| i.take_listener(l));
            let listener = listeners::open(
                l,
                running.slot,
                config.timeouts.client_header,
                workers.len(),
                handed,
            )?;
            opened.push(listener);
        }
        let handed_admin =
            inherited.and_then(|i| i.take_admin(config.admin.as_ref().map(|a| a.bind)));
        let admin = match handed_admin {
            Some(socket) => Some(socket),
            None => crate::admin::bind(&config)?,
        };
        let admin_addr = admin.as_ref().map(|s| s.local_addr()).transpose()?;
        let admin_copy = admin.as_ref().map(|s| s.try_clone()).transpose()?;
        let shared = Arc::new(Shared::new(runtime, config));
        let (shutdown, _) = watch::channel(false);
        Ok((
            Server {
                shared,
                workers,
                listeners: Arc::default(),
                shutdown,
                admin: admin_copy,
                admin_addr,
                admin_listeners: Default::default(),
                udp: Default::default(),
                sticky_key: crate::upstream::sticky::process_key(),
                control: Arc::default(),
                ha: None,
            },
            opened,
            admin,
        ))
    }

    /// Makes `config` the one new requests are served with: routes, upstreams, balancing,
    /// timeouts and limits. Servers that stay keep their pooled connections and state;
    /// servers that join (added, or no longer drained) ramp up over `slow_start`.
    ///
    /// Listeners added (or rebound: a new `bind`, or a switch to or from `mode = "udp"`)
    /// are bound and get an accept (or receive) loop on every worker; removed ones stop
    /// accepting, and their connections finish what is in flight and close (UDP flows: the
    /// exchange under way); `max_connections`, `max_flows` and `defer_accept` changes apply
    /// in place;
    /// listeners left alone keep their sockets. If a listener cannot be bound, nothing
    /// changes and the error names it. Workers and logging are set up at start, so a config
    /// that changes them is refused, with what changed; the running config stays either way.
    pub fn reload(&self, config: Config) -> Result<(), String> {
        // One reload at a time: the listener set is compared, bound and swapped as a whole.
        let mut set = lock(&self.listeners);
        let current = self.shared.load();
        let changed = needs_restart(&current.config, &config);
        if !changed.is_empty() {
            return Err(format!(
                "{}: restart Fulcrum to apply {}",
                changed.join("; "),
                if changed.len() == 1 { "this" } else { "these" }
            ));
        }
        let mut opened = Vec::new();
        for l in &config.listeners {
            let kept = current
                .config
                .listeners
                .iter()
                .any(|old| crate::runtime::same_sockets(old, l));
            if !kept {
                // A UDP listener removed a moment ago may still hold the address while its
                // flows drain: its sockets are taken over.
                let adopted = match l.mode {
                    crate::config::ListenerMode::Udp(_) => {
                        set.draining.iter_mut().find_map(|d| d.adopt_udp(l.bind))
                    }
                    _ => None,
                };
                // Its slot is not known until the snapshot is built: set just below.
                let listener = listeners::open(
                    l,
                    usize::MAX,
                    config.timeouts.client_header,
                    self.workers.len(),
                    adopted,
                )
                .map_err(|e| e.to_string())?;
                opened.push(listener);
            }
        }
        let settings: Vec<(String, usize, Option<Duration>)> = config
            .listeners
            .iter()
            .map(|l| {
                let defer = l.defer_accept.then_some(config.timeouts.client_header);
                let limit = match &l.mode {
                    crate::config::ListenerMode::Udp(udp) => udp.max_flows,
                    _ => l.max_connections,
                };
                (l.name.clone(), limit, defer)
            })
            .collect();
        // Changes made through the admin API last until the file is loaded again.
        self.shared.update(|inputs| {
            inputs.file = config;
            inputs.overrides.clear();
            crate::discovery::dns::forget_unlisted(inputs);
        })?;
        let rt = self.shared.load();
        let slots: Vec<usize> = rt.listeners.iter().map(|l| l.slot).collect();
        let removed = set.retire_all_but(&slots);
        for running in &removed {
            lock(&self.admin_listeners).remove(&running.slot);
            lock(&self.udp).remove(&running.slot);
            tracing::info!(listener = %running.name, addr = %running.addr, "listener removed: its connections finish and close");
        }
        set.draining.extend(removed.into_iter().map(|r| r.close()));
        set.draining.retain(|d| !d.is_done());
        for running in &mut set.running {
            let Some((_, max, defer)) = settings.iter().find(|(name, ..)| *name == running.name)
            else {
                continue;
            };
            running.set_max_connections(*max);
            lock(&self.admin_listeners).insert(running.slot, running.info());
            if let Err(e) = running.set_defer_accept(*defer) {
                tracing::warn!(listener = %running.name, error = %e, "defer_accept not changed");
            }
        }
        for listener in &mut opened {
            if let Some(i) = rt
                .config
                .listeners
                .iter()
                .position(|l| l.name == listener.name)
            {
                listener.slot = rt.listeners[i].slot;
            }
        }
        self.serve_in(&mut set, opened, None);
        Ok(())
    }

    /// Has the admin API's `POST /api/reload` sent to `requests` (the run loop's), once.
    pub fn send_reloads_to(&self, requests: crate::control::Requests) {
        let _ = self.control.set(requests);
    }

    /// The pause of a planned HA switchover over these listeners (see [`Quiesce`]).
    pub fn quiesce(&self) -> Quiesce {
        Quiesce {
            listeners: self.listeners.clone(),
        }
    }

    /// This node of the active/standby group, with `[ha]`.
    pub fn ha(&self) -> Option<crate::ha::HaHandle> {
        self.ha.clone()
    }

    /// The snapshot new requests are served with now: upstreams, their servers and health.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.shared.load()
    }

    /// What each UDP listener counts (flows, datagrams and bytes each way, drops), by
    /// listener slot, kept up to date as reloads add and remove UDP listeners: for the
    /// admin API and the metrics.
    pub fn udp_stats(&self) -> crate::l4::udp::UdpTable {
        self.udp.clone()
    }

    /// Where the admin listener listens, if the config has one (useful with port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The addresses actually bound, in config order (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        let set = lock(&self.listeners);
        self.shared
            .load()
            .listeners
            .iter()
            .filter_map(|l| set.running.iter().find(|r| r.slot == l.slot))
            .map(|r| r.addr)
            .collect()
    }

    /// Copies of every listening socket (all of each listener's), the admin listener's and
    /// the sticky-session key, for a new process to take over (`crate::upgrade`).
    pub fn handover(&self) -> io::Result<Handover> {
        let set = lock(&self.listeners);
        Ok(Handover {
            listeners: set
                .running
                .iter()
                .map(|r| r.hand_over())
                .collect::<io::Result<_>>()?,
            admin: match (&self.admin, &self.shared.load().config.admin) {
                (Some(socket), Some(admin)) => Some((admin.bind, socket.try_clone()?)),
                _ => None,
            },
            sticky_key: self.sticky_key,
        })
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
        let draining = {
            let mut set = lock(&self.listeners);
            let running = std::mem::take(&mut set.running);
            let mut draining = std::mem::take(&mut set.draining);
            draining.extend(running.into_iter().map(|r| r.close()));
            draining
        };
        let drained = async {
            for listener in &draining {
                listener.closed().await;
            }
        };
        tokio::time::timeout(grace, drained).await.is_ok()
    }
}

/// What an HA node needs of the server for a planned switchover: to take no new
/// connections without refusing any, while the open ones finish, and to undo that.
#[derive(Clone)]
pub struct Quiesce {
    listeners: Arc<Mutex<ListenerSet>>,
}

/// How often [`Quiesce::drained`] counts the open connections.
const DRAIN_POLL: Duration = Duration::from_millis(20);

impl Quiesce {
    /// Every listener (and any a reload starts until [`Quiesce::resume`]) stops taking new
    /// connections: the kernel drops their SYNs, so clients send them again about a second
    /// later rather than being refused. Open connections are asked to finish and close as
    /// on shutdown: idle ones now, busy HTTP/1 ones after their response (`Connection:
    /// close`), HTTP/2 with GOAWAY.
    pub fn pause(&self) {
        lock(&self.listeners).pause();
    }

    /// Connections still open on every listener, with those the kernel accepted that no
    /// accept loop took yet. Tunnels (WebSockets) are not counted: asking them to finish
    /// does not end them, and a drain waiting for them would keep new clients out.
    pub fn open_connections(&self) -> usize {
        lock(&self.listeners).open_connections()
    }

    /// Resolves once no connection is open (looked at first after a moment, so that
    /// handshakes under way at the pause are counted), or when `within` has passed, with
    /// the connections still open then.
    pub async fn drained(&self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + DRAIN_POLL)).await;
            let open = self.open_connections();
            if open == 0 || tokio::time::Instant::now() >= deadline {
                return open;
            }
        }
    }

    /// Undoes [`Quiesce::pause`]: new connections are taken and kept alive again.
    pub fn resume(&self) {
        lock(&self.listeners).resume();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
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
    let admin_bind = |c: &Config| c.admin.as_ref().map(|a| a.bind);
    if admin_bind(old) != admin_bind(new) {
        let show = |bind: Option<SocketAddr>| bind.map_or("none".to_string(), |b| b.to_string());
        changed.push(format!(
            "admin bind changed from {} to {}",
            show(admin_bind(old)),
            show(admin_bind(new))
        ));
    }
    if old.access_log.enabled != new.access_log.enabled
        || old.access_log.format != new.access_log.format
    {
        changed.push("access_log changed".to_string());
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
