//! UDP listeners: each client (source address and port) is a flow with its own connected
//! socket to the server the upstream's balancer picked for it, so that replies go back to
//! the right client; a flow quiet both ways for `idle_timeout` is forgotten, and at most
//! `max_flows` live at once on a listener.
//!
//! A listener has one socket per worker (`SO_REUSEPORT`: the kernel hashes a client's
//! addresses, so its datagrams keep landing on the same socket), each with a receive loop
//! that owns that socket's flow table. A flow's replies are relayed by a small task of its
//! own on the same worker. Datagrams are relayed as they are, never reassembled or parsed;
//! relaying one allocates nothing (one receive buffer per worker thread serves every loop
//! and flow on it).
//!
//! With `responses = N`, a flow ends as soon as its server has sent N datagrams for each
//! one its client sent, so that resolvers that send every query from a new port do not
//! hold a flow each for `idle_timeout`.
//!
//! A listener bound to a wildcard address learns, with each datagram, the local address
//! its client sent it to (`IP_PKTINFO` / `IPV6_RECVPKTINFO`) and replies from that
//! address: a client (a DNS resolver, say) drops replies from any other.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::config::ListenerMode;
use crate::config::model::HashKey;
use crate::runtime::{RuntimeCache, Shared};
use crate::server::stopping;
use crate::upstream::{Affinity, InFlight, Upstream};

/// Room for the largest UDP payload (65,507 bytes over IPv4, 65,527 over IPv6).
const DATAGRAM_MAX: usize = 64 * 1024;
/// Datagrams taken from one socket per wakeup before other tasks on the worker get a turn.
const BATCH: usize = 64;
/// Once a listener stops (removed by a reload, or shutdown), a flow quiet for this long
/// (or its `idle_timeout`, if shorter) has finished its exchange and is ended…
const DRAIN_QUIET: Duration = Duration::from_millis(500);
/// …and every flow is ended this long after the stop at the latest.
const DRAIN_MAX: Duration = Duration::from_secs(5);

thread_local! {
    /// Where every receive on this worker lands: a datagram is relayed before the next
    /// receive, never across an await, so one buffer serves every loop and flow here.
    static BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; DATAGRAM_MAX].into_boxed_slice());
}

/// The UDP listeners running, by listener slot, with their counts (for the admin API and
/// the metrics).
pub type UdpTable = Arc<Mutex<HashMap<usize, Arc<UdpStats>>>>;

/// What one UDP listener counts, over all its sockets and workers. Each worker counts in a
/// shard of its own, so that relaying a datagram writes no cache line another worker does.
#[derive(Debug)]
pub struct UdpStats {
    pub name: String,
    /// Where it is bound.
    pub addr: SocketAddr,
    shards: Box<[Shard]>,
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard {
    /// Started minus ended on this worker (a flow starts and ends on the same one).
    flows_open: AtomicI64,
    flows_started: AtomicU64,
    datagrams_from_clients: AtomicU64,
    bytes_from_clients: AtomicU64,
    datagrams_from_servers: AtomicU64,
    bytes_from_servers: AtomicU64,
    dropped_at_cap: AtomicU64,
    dropped: AtomicU64,
    servers_unreachable: AtomicU64,
}

/// A UDP listener's counts at one moment, summed over its workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct UdpCounts {
    /// Flows open now.
    pub flows_open: u64,
    /// Flows started since the listener was bound.
    pub flows_started: u64,
    /// Datagrams (and their payload bytes) relayed from clients to servers.
    pub datagrams_from_clients: u64,
    pub bytes_from_clients: u64,
    /// Datagrams (and their payload bytes) relayed from servers back to clients.
    pub datagrams_from_servers: u64,
    pub bytes_from_servers: u64,
    /// Datagrams dropped because they would have started a flow past `max_flows`.
    pub dropped_at_cap: u64,
    /// Datagrams dropped for any other reason: no server to send to, a socket buffer full,
    /// the listener paused for an HA switchover, a send that failed.
    pub dropped: u64,
    /// Flows ended because their server answered with ICMP port unreachable.
    pub servers_unreachable: u64,
}

impl UdpStats {
    pub fn new(name: String, addr: SocketAddr, workers: usize) -> Self {
        UdpStats {
            name,
            addr,
            shards: (0..workers.max(1)).map(|_| Shard::default()).collect(),
        }
    }

    fn shard(&self) -> &Shard {
        &self.shards[crate::server::worker() % self.shards.len()]
    }

    /// The counts now.
    pub fn counts(&self) -> UdpCounts {
        let sum = |field: fn(&Shard) -> &AtomicU64| -> u64 {
            self.shards
                .iter()
                .map(|s| field(s).load(Ordering::Relaxed))
                .fold(0, u64::wrapping_add)
        };
        let open: i64 = self
            .shards
            .iter()
            .map(|s| s.flows_open.load(Ordering::Relaxed))
            .sum();
        UdpCounts {
            flows_open: open.max(0) as u64,
            flows_started: sum(|s| &s.flows_started),
            datagrams_from_clients: sum(|s| &s.datagrams_from_clients),
            bytes_from_clients: sum(|s| &s.bytes_from_clients),
            datagrams_from_servers: sum(|s| &s.datagrams_from_servers),
            bytes_from_servers: sum(|s| &s.bytes_from_servers),
            dropped_at_cap: sum(|s| &s.dropped_at_cap),
            dropped: sum(|s| &s.dropped),
            servers_unreachable: sum(|s| &s.servers_unreachable),
        }
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// One of a UDP listener's sockets and what its receive loop shares with the listener's
/// other loops.
pub struct UdpListener {
    pub socket: UdpSocket,
    /// The listener's slot (`crate::runtime::ListenerRuntime::slot`).
    pub slot: usize,
    /// One permit per open flow, over every socket of the listener: `max_flows` in all.
    pub flows: Arc<Semaphore>,
    pub stats: Arc<UdpStats>,
    /// True while the listener takes no new flow (an HA switchover's pause): a datagram
    /// that would start one is dropped, and the client's retry finds the new active node.
    pub paused: watch::Receiver<bool>,
    /// Where the loop leaves a weak reference to its socket: once the listener is removed,
    /// a reload that adds one on the same address takes the socket over while it is still
    /// open (see [`Adoptable`]).
    pub adoptable: Adoptable,
}

/// A UDP listener's sockets, as long as something (its draining loops, its flows' reply
/// tasks) keeps them open: a removed listener's port stays bound until then, so a listener
/// added on the same address takes them over rather than failing to bind.
pub type Adoptable = Arc<Mutex<Vec<std::sync::Weak<UdpSocket>>>>;

/// Duplicates of the sockets in `adoptable` still open.
pub fn adopt(adoptable: &Adoptable) -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    adoptable
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .filter_map(|socket| socket.as_fd().try_clone_to_owned().ok())
        .collect()
}

/// What a flow's receive loop and its reply task share.
struct FlowSocket {
    /// Connected to the flow's server.
    socket: UdpSocket,
    /// On a wildcard listener, the local address the client sent its first datagram to,
    /// which replies are sent from.
    local: Option<IpAddr>,
    /// The flow's server, as the current snapshot has it: a reload that rebuilds the
    /// upstream re-points it (see [`repoint`]), so that what the reply task reports reaches
    /// the server objects health checks and balancers see. Locked only off the datagram
    /// path (a refusal, a first answer, a reload); the receive loop keeps its own copy.
    target: Mutex<Target>,
    /// Set by every datagram either way, cleared by each sweep.
    active: AtomicBool,
    /// The server refused the flow (ICMP port unreachable), or its socket failed, or it
    /// sent all the responses expected.
    ended: AtomicBool,
    /// The listener's `responses` when the flow started; 0 if unset.
    responses: u32,
    /// Datagrams sent to the server, and received from it: counted only with `responses`.
    requests: AtomicU64,
    replies: AtomicU64,
}

impl FlowSocket {
    /// Ends the flow because its server's port is closed; the server counts as unreachable
    /// once, whichever side saw the error first.
    fn refused(&self, stats: &UdpStats) {
        if !self.ended.swap(true, Ordering::Relaxed) {
            let target = self.target();
            let server = &target.upstream.servers[target.server];
            tracing::warn!(upstream = %target.upstream.name, server = %server.address, "udp server unreachable (port unreachable)");
            add(&stats.shard().servers_unreachable, 1);
            target.upstream.unreachable(target.server);
        }
    }

    fn target(&self) -> Target {
        self.target
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// A flow's server: its upstream and its index there.
#[derive(Clone)]
struct Target {
    upstream: Arc<Upstream>,
    server: usize,
}

/// A flow as its receive loop keeps it.
struct Flow {
    shared: Arc<FlowSocket>,
    /// The receive loop's copy of `shared.target`, read with every datagram.
    target: Target,
    replies: AbortHandle,
    /// How long the flow has been seen quiet by sweeps.
    quiet: Duration,
    /// The runtime snapshot in which its server was last found serving the listener (a
    /// weak reference keeps its address from being reused by a later one).
    checked: std::sync::Weak<crate::runtime::Runtime>,
    stats: Arc<UdpStats>,
    /// Counts the flow as in flight to its server, for load-aware balancers.
    in_flight: InFlight,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Flow {
    fn drop(&mut self) {
        // The task holds the other reference to the socket: the socket closes with it.
        self.replies.abort();
        self.stats
            .shard()
            .flows_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Flows by client, with their quiet time as sweeps count it: expiry costs one pass over
/// the table per sweep, nothing per datagram but a flag.
#[derive(Default)]
struct FlowTable {
    flows: HashMap<SocketAddr, Flow>,
}

impl FlowTable {
    /// Ends flows that were quiet for `idle` (each sweep adds the `elapsed` time since the
    /// previous one to a flow that saw no datagram in between) and flows that ended.
    fn sweep(&mut self, elapsed: Duration, idle: Duration) {
        self.flows.retain(|_, flow| sweep_one(flow, elapsed, idle));
        // A burst of flows leaves the table large; what it held is given back once they
        // are mostly gone.
        if self.flows.capacity() > 1024 && self.flows.len() < self.flows.capacity() / 8 {
            self.flows.shrink_to(self.flows.len() * 2);
        }
    }

    fn len(&self) -> usize {
        self.flows.len()
    }
}

/// Whether a flow stays after a sweep (see [`FlowTable::sweep`]).
fn sweep_one(flow: &mut Flow, elapsed: Duration, idle: Duration) -> bool {
    let (active, ended) = (&flow.shared.active, &flow.shared.ended);
    let (stays, quiet) = quiet_after_sweep(
        flow.quiet,
        active.swap(false, Ordering::Relaxed),
        ended.load(Ordering::Relaxed),
        elapsed,
        idle,
    );
    flow.quiet = quiet;
    stays
}

/// The pure part of a sweep: a flow quiet for `quiet` so far, `active` since the last
/// sweep or not, stays (with its new quiet time) unless it ended or has now been quiet for
/// `idle`.
fn quiet_after_sweep(
    quiet: Duration,
    active: bool,
    ended: bool,
    elapsed: Duration,
    idle: Duration,
) -> (bool, Duration) {
    if ended {
        return (false, quiet);
    }
    if active {
        return (true, Duration::ZERO);
    }
    let quiet = quiet.saturating_add(elapsed);
    (quiet < idle, quiet)
}

/// How often flows are swept for expiry: often enough that a flow goes at most a quarter
/// of `idle` past it, rarely enough that a large table costs little.
fn sweep_period(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
}

/// The receive loop of one of a UDP listener's sockets, until `stop` (shutdown, or a
/// reload removing the listener). Then it takes no more datagrams, lets its flows finish
/// the exchange under way (see [`DRAIN_QUIET`] and [`DRAIN_MAX`]) and ends them.
pub async fn receive_loop(
    listener: UdpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let wildcard = listener
        .socket
        .local_addr()
        .is_ok_and(|a| a.ip().is_unspecified())
        && match receive_local_addresses(&listener.socket) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "a wildcard udp listener cannot learn where datagrams were sent: it replies from the address the system picks");
                false
            }
        };
    let socket = Arc::new(listener.socket);
    listener
        .adoptable
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Arc::downgrade(&socket));
    let mut relay = Relay {
        finished: Arc::default(),
        finishing: Vec::new(),
        wildcard,
        socket,
        slot: listener.slot,
        flow_permits: listener.flows,
        stats: listener.stats,
        paused: listener.paused,
        cache: shared.cache(),
        table: FlowTable::default(),
    };
    let mut idle = relay.idle_timeout().unwrap_or(DRAIN_QUIET);
    let mut sweep = tokio::time::interval(sweep_period(idle));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut swept = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = stopping(&mut stop) => break,
            // Before new datagrams: the slots these free may be what they need.
            _ = relay.finished.notify.notified() => relay.end_finished(),
            _ = sweep.tick() => {
                let now = Instant::now();
                relay.table.sweep(now - swept, idle);
                swept = now;
                // A reload may have changed it.
                if let Some(new) = relay.idle_timeout()
                    && new != idle
                {
                    idle = new;
                    sweep = tokio::time::interval_at(now + sweep_period(idle), sweep_period(idle));
                    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
            }
            ready = relay.socket.readable() => {
                if let Err(e) = ready {
                    tracing::error!(error = %e, "a udp listener's socket failed; it stops receiving");
                    break;
                }
                if relay.receive_batch() == BATCH {
                    tokio::task::yield_now().await;
                }
            }
        }
    }
    relay.drain(idle).await;
}

/// The clients whose flows have sent all their responses, for their receive loop to end
/// at once (freeing the socket, its port and the `max_flows` slot). Pushed to and drained
/// on the same worker, so the lock is never contended; the list's room is reused.
#[derive(Default)]
struct Finished {
    clients: Mutex<Vec<SocketAddr>>,
    notify: tokio::sync::Notify,
}

impl Finished {
    fn push(&self, client: SocketAddr) {
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(client);
        self.notify.notify_one();
    }
}

/// A receive loop's state.
struct Relay {
    finished: Arc<Finished>,
    /// Where the finished clients are taken to, kept for its room.
    finishing: Vec<SocketAddr>,
    socket: Arc<UdpSocket>,
    /// Bound to a wildcard address, with packet info enabled.
    wildcard: bool,
    slot: usize,
    flow_permits: Arc<Semaphore>,
    stats: Arc<UdpStats>,
    paused: watch::Receiver<bool>,
    cache: RuntimeCache,
    table: FlowTable,
}

impl Relay {
    /// The listener's `idle_timeout` now (`None` once a reload removed it).
    fn idle_timeout(&mut self) -> Option<Duration> {
        let runtime = self.cache.load();
        match &runtime.listener_config(self.slot)?.mode {
            ListenerMode::Udp(udp) => Some(udp.idle_timeout),
            _ => None,
        }
    }

    /// Relays the datagrams waiting on the listener's socket, up to [`BATCH`]; returns how
    /// many it took.
    fn receive_batch(&mut self) -> usize {
        BUFFER.with_borrow_mut(|buf| {
            for taken in 0..BATCH {
                let received = if self.wildcard {
                    self.socket
                        .try_io(Interest::READABLE, || receive_with_local(&self.socket, buf))
                } else {
                    self.socket
                        .try_recv_from(buf)
                        .map(|(n, client)| (n, client, None))
                };
                match received {
                    Ok((n, client, local)) => self.relay_from_client(&buf[..n], client, local),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return taken,
                    // An error queued on the socket (an ICMP error for an earlier reply, on
                    // some systems): it concerns no datagram waiting.
                    Err(e) => {
                        tracing::debug!(error = %e, "udp listener receive");
                        return taken;
                    }
                }
            }
            BATCH
        })
    }

    /// Sends a client's datagram on its flow, starting the flow if it has none (or if its
    /// flow ended, or its server is out of rotation while another is in).
    fn relay_from_client(&mut self, datagram: &[u8], client: SocketAddr, local: Option<IpAddr>) {
        let shard = self.stats.shard();
        if let Some(flow) = self.table.flows.get_mut(&client) {
            let snapshot = self.cache.load();
            let mut kept = true;
            // Once per flow and snapshot: a reload (or an admin change) swapped one in.
            if !std::ptr::eq(flow.checked.as_ptr(), Arc::as_ptr(snapshot)) {
                kept = repoint(flow, snapshot, self.slot);
                flow.checked = Arc::downgrade(snapshot);
            }
            let moves = should_move(&flow.target, client);
            let flow = &flow.shared;
            if kept && !flow.ended.load(Ordering::Relaxed) && !moves {
                if flow.responses != 0 {
                    // Before the send: the reply may be relayed before this returns.
                    flow.requests.fetch_add(1, Ordering::Relaxed);
                }
                match send(&flow.socket, datagram) {
                    Ok(_) => {
                        flow.active.store(true, Ordering::Relaxed);
                        add(&shard.datagrams_from_clients, 1);
                        add(&shard.bytes_from_clients, datagram.len() as u64);
                        return;
                    }
                    // The server's port closed since the last datagram: a new flow, to
                    // another server, takes this one.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        flow.refused(&self.stats)
                    }
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            tracing::debug!(error = %e, %client, "udp send to a server failed");
                        }
                        add(&shard.dropped, 1);
                        return;
                    }
                }
            }
            self.table.flows.remove(&client);
        }
        self.start_flow(datagram, client, local);
    }

    /// Starts a flow for `client` with its first datagram, unless the listener is paused,
    /// removed or at `max_flows`, or no server can be given a socket.
    fn start_flow(&mut self, datagram: &[u8], client: SocketAddr, local: Option<IpAddr>) {
        let shard = self.stats.shard();
        if *self.paused.borrow() {
            add(&shard.dropped, 1);
            return;
        }
        let Ok(permit) = self.flow_permits.clone().try_acquire_owned() else {
            add(&shard.dropped_at_cap, 1);
            return;
        };
        let runtime = self.cache.load().clone();
        let (upstream, responses) = match runtime.listener_config(self.slot).map(|l| &l.mode) {
            Some(ListenerMode::Udp(udp)) => (
                runtime.upstreams[udp.upstream].clone(),
                udp.responses.unwrap_or(0),
            ),
            _ => {
                add(&shard.dropped, 1);
                return;
            }
        };
        let Some((index, socket)) = connect(&upstream, client) else {
            add(&shard.dropped, 1);
            return;
        };
        let sent = send(&socket, datagram);
        let target = Target {
            upstream: upstream.clone(),
            server: index,
        };
        let flow = Arc::new(FlowSocket {
            socket,
            local: local.filter(|ip| can_send_from(*ip)),
            target: Mutex::new(target.clone()),
            active: AtomicBool::new(true),
            ended: AtomicBool::new(false),
            responses,
            requests: AtomicU64::new(u64::from(responses != 0)),
            replies: AtomicU64::new(0),
        });
        let replies = tokio::spawn(relay_replies(
            flow.clone(),
            self.socket.clone(),
            client,
            self.stats.clone(),
            self.finished.clone(),
        ));
        add(&shard.flows_started, 1);
        shard.flows_open.fetch_add(1, Ordering::Relaxed);
        match sent {
            Ok(_) => {
                add(&shard.datagrams_from_clients, 1);
                add(&shard.bytes_from_clients, datagram.len() as u64);
            }
            Err(e) => {
                tracing::debug!(error = %e, %client, "udp send to a server failed");
                add(&shard.dropped, 1);
            }
        }
        self.table.flows.insert(
            client,
            Flow {
                shared: flow,
                target,
                replies: replies.abort_handle(),
                quiet: Duration::ZERO,
                checked: Arc::downgrade(&runtime),
                stats: self.stats.clone(),
                in_flight: upstream.track(index),
                _permit: permit,
            },
        );
    }

    /// Ends the flows whose servers have sent all their responses.
    fn end_finished(&mut self) {
        std::mem::swap(
            &mut self.finishing,
            &mut self
                .finished
                .clients
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for client in self.finishing.drain(..) {
            // Unless the client's next datagram has already replaced it.
            if self
                .table
                .flows
                .get(&client)
                .is_some_and(|f| f.shared.ended.load(Ordering::Relaxed))
            {
                self.table.flows.remove(&client);
            }
        }
    }

    /// After a stop: lets the flows finish their exchanges, then ends them all.
    async fn drain(mut self, idle: Duration) {
        let quiet = idle.min(DRAIN_QUIET);
        let period = sweep_period(quiet);
        let deadline = Instant::now() + idle.min(DRAIN_MAX);
        let mut swept = Instant::now();
        while self.table.len() > 0 && Instant::now() < deadline {
            tokio::time::sleep(period).await;
            let now = Instant::now();
            self.table.sweep(now - swept, quiet);
            swept = now;
        }
    }
}

/// Whether a flow stays on its server in `runtime`, which it then points to `runtime`'s
/// objects for that server: the listener's upstream is the flow's, and lists the server's
/// address, not disabled. (A reload that changes an upstream's settings builds new server
/// objects; health checks mark those down, so a flow left on the old ones would never see
/// it.) A reload that removes the server (or gives the listener another upstream) moves the
/// flow with its next datagram; one that drains the server does not: like a connection,
/// the flow finishes there. A listener that is gone is draining: its flows stay as they
/// are.
fn repoint(flow: &mut Flow, runtime: &crate::runtime::Runtime, slot: usize) -> bool {
    let Some(ListenerMode::Udp(udp)) = runtime.listener_config(slot).map(|l| &l.mode) else {
        return true;
    };
    let upstream = &runtime.upstreams[udp.upstream];
    let address = flow.target.upstream.servers[flow.target.server].address;
    let listed = runtime.config.upstreams[udp.upstream]
        .servers
        .iter()
        .any(|s| s.address == address && !s.disabled);
    let index = upstream.servers.iter().position(|s| s.address == address);
    let (true, Some(index)) = (upstream.name == flow.target.upstream.name && listed, index) else {
        return false;
    };
    if Arc::ptr_eq(upstream, &flow.target.upstream) && index == flow.target.server {
        return true;
    }
    let target = Target {
        upstream: upstream.clone(),
        server: index,
    };
    // Counted in flight on the new object before the old count goes.
    flow.in_flight = upstream.track(index);
    *flow
        .shared
        .target
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = target.clone();
    flow.target = target;
    true
}

/// Whether a flow should move to another server: its server is out of rotation (down for
/// its health checks, ejected, unreachable) and the upstream has another in. A flow keeps
/// its server while every other is out too. Costs one load per datagram while its server is
/// in.
fn should_move(target: &Target, client: SocketAddr) -> bool {
    let upstream = &target.upstream;
    if upstream.servers[target.server].share() != 0 {
        return false;
    }
    let affinity = affinity(upstream, client);
    upstream
        .pick(0, &affinity, &[target.server])
        .is_some_and(|(index, server)| index != target.server && server.share() != 0)
}

/// What ties a client to a server for `upstream`'s balancer: its address alone.
fn affinity(upstream: &Upstream, client: SocketAddr) -> Affinity {
    Affinity {
        client_ip: client.ip(),
        key: match upstream.hash_key {
            Some(HashKey::ClientIp) => Some(crate::balance::hash(&client.ip())),
            // The config allows no other key on an upstream a udp listener uses.
            _ => None,
        },
        pinned: None,
    }
}

/// A socket connected to the server `upstream` picks for `client`, trying others if one
/// cannot be given a socket; with the server's index.
fn connect(upstream: &Upstream, client: SocketAddr) -> Option<(usize, UdpSocket)> {
    let affinity = affinity(upstream, client);
    // Allocates only once a server has failed.
    let mut failed = Vec::new();
    for attempt in 0..upstream.tries(&affinity).max(1) {
        let (index, server) = upstream.pick(attempt, &affinity, &failed)?;
        match connected_socket(server.address) {
            Ok(socket) => return Some((index, socket)),
            Err(e) if is_local_shortage(&e) => {
                // Once a second at most: every datagram of every new client meets it.
                if first_this_second(&SHORTAGE_LOGGED) {
                    tracing::error!(upstream = %upstream.name, server = %server.address, error = %e, "cannot open a udp socket to a server; new flows are dropped");
                }
                return None;
            }
            Err(e) => {
                // Once a second at most, as above: a server that is unreachable meets
                // every new client.
                if first_this_second(&UNREACHABLE_LOGGED) {
                    tracing::warn!(upstream = %upstream.name, server = %server.address, error = %e, "udp server unreachable");
                }
                upstream.unreachable(index);
                failed.push(index);
            }
        }
    }
    None
}

/// Sends `datagram` on a connected socket now, or fails with `WouldBlock` if its buffer is
/// full. Straight to the kernel rather than through tokio's readiness: a socket tokio has
/// just registered counts as not writable until its first event arrives, which would drop
/// every flow's first datagram, and a datagram send is never awaited here anyway.
fn send(socket: &UdpSocket, datagram: &[u8]) -> io::Result<usize> {
    socket2::SockRef::from(socket).send(datagram)
}

/// As [`send`], to `to` from an unconnected socket; from the local address `from` if
/// given (a wildcard listener's).
fn send_to(
    socket: &UdpSocket,
    datagram: &[u8],
    to: SocketAddr,
    from: Option<IpAddr>,
) -> io::Result<usize> {
    match from {
        None => socket2::SockRef::from(socket).send_to(datagram, &to.into()),
        Some(from) => send_from(socket, datagram, to, from),
    }
}

/// Whether a reply can be sent from `ip`, a local address a client sent to: not from a
/// multicast or broadcast one (a datagram sent there is answered from the address the
/// system picks, as on a listener bound to a specific address).
fn can_send_from(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_multicast() && !v4.is_broadcast() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_multicast()
                && !v6.is_unspecified()
                && v6
                    .to_ipv4_mapped()
                    .is_none_or(|v4| can_send_from(IpAddr::V4(v4)))
        }
    }
}

/// Room for one packet-info control message (IPv6's is the larger), aligned as a
/// `cmsghdr` must be: on the stack, so that no datagram allocates.
#[repr(C, align(8))]
struct ControlBuffer([u8; 64]);

/// Has the kernel tell, with each datagram received on `socket`, the local address it was
/// sent to. On an IPv6 socket this covers IPv4 datagrams too (as mapped addresses).
fn receive_local_addresses(socket: &UdpSocket) -> io::Result<()> {
    let (level, name) = match socket.local_addr()? {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_PKTINFO),
        SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
    };
    let on: libc::c_int = 1;
    // SAFETY: a valid descriptor, and an option value of the size given.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Receives one datagram, with its sender and the local address it was sent to (if the
/// kernel said: see [`receive_local_addresses`]).
fn receive_with_local(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    let mut name = socket2::SockAddrStorage::zeroed();
    let mut control = ControlBuffer([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut name).cast();
    msg.msg_namelen = name.size_of();
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: every pointer in `msg` points to live buffers of the lengths given.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote a sockaddr of `msg_namelen` bytes into `name`.
    let client = unsafe { socket2::SockAddr::new(name, msg.msg_namelen) }
        .as_socket()
        .ok_or_else(|| io::Error::other("a datagram from a non-IP address"))?;
    let mut local = None;
    // SAFETY: the CMSG_ macros walk the control messages the kernel wrote within
    // `msg_controllen`; each payload is read unaligned, as the type it is labelled with.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info: libc::in_pktinfo = std::ptr::read_unaligned(data.cast());
                    local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        info.ipi_addr.s_addr,
                    ))));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info: libc::in6_pktinfo = std::ptr::read_unaligned(data.cast());
                    local = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok((n as usize, client, local))
}

/// Sends `datagram` to `to` with `from` as its source address, now or `WouldBlock`.
fn send_from(
    socket: &UdpSocket,
    datagram: &[u8],
    to: SocketAddr,
    from: IpAddr,
) -> io::Result<usize> {
    let to = socket2::SockAddr::from(to);
    let mut control = ControlBuffer([0; 64]);
    let mut iov = libc::iovec {
        iov_base: datagram.as_ptr().cast_mut().cast(),
        iov_len: datagram.len(),
    };
    let (level, kind, size) = match from {
        IpAddr::V4(_) => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            size_of::<libc::in_pktinfo>(),
        ),
        IpAddr::V6(_) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            size_of::<libc::in6_pktinfo>(),
        ),
    };
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = to.as_ptr().cast_mut().cast();
    msg.msg_namelen = to.len();
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE and CMSG_LEN are arithmetic; the one control message fits the
    // buffer (64 bytes against CMSG_SPACE(20) = 40), and its payload is written unaligned.
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(size as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size as u32) as _;
        let data = libc::CMSG_DATA(cmsg);
        match from {
            IpAddr::V4(ip) => std::ptr::write_unaligned(
                data.cast(),
                libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                },
            ),
            IpAddr::V6(ip) => std::ptr::write_unaligned(
                data.cast(),
                libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ipi6_ifindex: 0,
                },
            ),
        }
    }
    // SAFETY: every pointer in `msg` points to live buffers of the lengths given.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &raw const msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// When a shortage of sockets was last logged, in `now_ms` time.
static SHORTAGE_LOGGED: AtomicU64 = AtomicU64::new(0);
/// When a server a flow's socket could not be connected to was last logged.
static UNREACHABLE_LOGGED: AtomicU64 = AtomicU64::new(0);

/// Whether no call in the last second (by `last`, in `now_ms` time) returned true.
fn first_this_second(last: &AtomicU64) -> bool {
    let now = crate::upstream::now_ms().max(1);
    let before = last.load(Ordering::Relaxed);
    (before == 0 || now >= before + 1000)
        && last
            .compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Out of descriptors, memory or ports: no fault of the server's. (A UDP `connect` that
/// finds no free ephemeral port fails with `EAGAIN`, not `EADDRNOTAVAIL` as TCP's does.)
fn is_local_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EADDRNOTAVAIL
                | libc::EAGAIN
                | libc::EADDRINUSE
        )
    )
}

/// A UDP socket on an ephemeral port, connected to `server`: it receives only the server's
/// datagrams, and the server's ICMP port unreachable comes back as a refused receive.
fn connected_socket(server: SocketAddr) -> io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(server),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    // Binds an ephemeral port, as the route to the server says.
    socket.connect(&server.into())?;
    UdpSocket::from_std(socket.into())
}

/// Relays the server's replies on a flow to its client, through the listener's socket,
/// until the flow is ended (by its loop, which aborts this task) or refused, or its server
/// has sent all the responses expected (which it tells the loop through `finished`).
async fn relay_replies(
    flow: Arc<FlowSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    stats: Arc<UdpStats>,
    finished: Arc<Finished>,
) {
    let mut answered = false;
    let mut all_sent = false;
    loop {
        if let Err(e) = flow.socket.readable().await {
            tracing::debug!(error = %e, "udp flow socket failed");
            flow.ended.store(true, Ordering::Relaxed);
            return;
        }
        let mut relayed = 0;
        let outcome = BUFFER.with_borrow_mut(|buf| {
            let shard = stats.shard();
            for _ in 0..BATCH {
                match flow.socket.try_recv(buf) {
                    Ok(n) => {
                        relayed += 1;
                        flow.active.store(true, Ordering::Relaxed);
                        match send_to(&listener, &buf[..n], client, flow.local) {
                            Ok(_) => {
                                add(&shard.datagrams_from_servers, 1);
                                add(&shard.bytes_from_servers, n as u64);
                            }
                            // The listener's send buffer is full (or the client's route
                            // gone): as a congested network would, the reply is dropped.
                            Err(_) => add(&shard.dropped, 1),
                        }
                        if flow.responses != 0 {
                            let replies = flow.replies.fetch_add(1, Ordering::Relaxed) + 1;
                            let expected =
                                flow.requests.load(Ordering::Relaxed) * u64::from(flow.responses);
                            if replies >= expected {
                                all_sent = true;
                                return Ok(());
                            }
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        if !answered && relayed > 0 {
            answered = true;
            // A server marked unreachable that answers is reachable again.
            let target = flow.target();
            target.upstream.reached(target.server);
        }
        if all_sent {
            flow.ended.store(true, Ordering::Relaxed);
            finished.push(client);
            return;
        }
        match outcome {
            Ok(()) => tokio::task::yield_now().await,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                flow.refused(&stats);
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "udp flow receive failed");
                flow.ended.store(true, Ordering::Relaxed);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const IDLE: Duration = Duration::from_millis(400);

    #[test]
    fn a_flow_expires_once_quiet_for_idle_and_not_before() {
        let period = sweep_period(IDLE);
        assert_eq!(period, Duration::from_millis(100));
        let mut quiet = Duration::ZERO;
        // A datagram since the last sweep: the count starts over.
        let (stays, q) = quiet_after_sweep(Duration::from_millis(300), true, false, period, IDLE);
        assert!(stays);
        assert_eq!(q, Duration::ZERO);
        for sweep in 1..=4 {
            let (stays, q) = quiet_after_sweep(quiet, false, false, period, IDLE);
            quiet = q;
            assert_eq!(stays, sweep < 4, "after {sweep} quiet sweeps");
        }
    }

    #[test]
    fn an_ended_flow_goes_at_the_next_sweep_even_if_busy() {
        let (stays, _) = quiet_after_sweep(Duration::ZERO, true, true, Duration::ZERO, IDLE);
        assert!(!stays);
    }

    #[test]
    fn sweeps_come_often_enough_for_short_timeouts_and_rarely_for_long_ones() {
        assert_eq!(
            sweep_period(Duration::from_millis(10)),
            Duration::from_millis(5)
        );
        assert_eq!(
            sweep_period(Duration::from_secs(30)),
            Duration::from_secs(1)
        );
    }

    proptest! {
        /// Whatever the sweeps' spacing, a flow quiet for less than `idle` stays, and one
        /// quiet for `idle` or more by the sweeps' count goes.
        #[test]
        fn expiry_follows_the_quiet_time_summed_over_sweeps(
            gaps in proptest::collection::vec(1u64..500, 1..40),
            idle_ms in 10u64..2000,
        ) {
            let idle = Duration::from_millis(idle_ms);
            let mut quiet = Duration::ZERO;
            let mut total = Duration::ZERO;
            for gap in gaps {
                let gap = Duration::from_millis(gap);
                total += gap;
                let (stays, q) = quiet_after_sweep(quiet, false, false, gap, idle);
                prop_assert_eq!(stays, total < idle);
                if !stays {
                    break;
                }
                quiet = q;
            }
        }
    }

    fn stats() -> Arc<UdpStats> {
        Arc::new(UdpStats::new(
            "dns".into(),
            "127.0.0.1:53".parse().unwrap(),
            2,
        ))
    }

    #[test]
    fn running_out_of_local_ports_or_descriptors_is_no_fault_of_the_server() {
        for errno in [
            libc::EAGAIN,
            libc::EWOULDBLOCK,
            libc::EADDRINUSE,
            libc::EADDRNOTAVAIL,
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
        ] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(is_local_shortage(&e), "{e}");
        }
        for errno in [
            libc::ENETUNREACH,
            libc::EHOSTUNREACH,
            libc::ECONNREFUSED,
            libc::EACCES,
        ] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(!is_local_shortage(&e), "{e}");
        }
    }

    #[test]
    fn replies_go_from_the_address_sent_to_unless_it_was_broadcast_or_multicast() {
        for ok in [
            "127.0.0.2",
            "10.1.2.3",
            "::1",
            "2001:db8::1",
            "::ffff:127.0.0.2",
        ] {
            assert!(can_send_from(ok.parse().unwrap()), "{ok}");
        }
        for not in [
            "255.255.255.255",
            "224.0.0.251",
            "0.0.0.0",
            "ff02::fb",
            "::",
            "::ffff:224.0.0.251",
        ] {
            assert!(!can_send_from(not.parse().unwrap()), "{not}");
        }
    }

    #[test]
    fn counts_add_up_over_workers() {
        let stats = stats();
        crate::server::set_worker_for_tests(1);
        add(&stats.shard().datagrams_from_clients, 2);
        stats.shard().flows_open.fetch_add(1, Ordering::Relaxed);
        crate::server::set_worker_for_tests(0);
        add(&stats.shard().datagrams_from_clients, 3);
        let counts = stats.counts();
        assert_eq!(counts.datagrams_from_clients, 5);
        assert_eq!(counts.flows_open, 1);
    }
}
