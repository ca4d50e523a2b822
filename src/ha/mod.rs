//! The balancer's own redundancy: nodes of an active/standby group exchange authenticated
//! heartbeats over UDP, elect the node that holds the virtual addresses, and move them on
//! failure, on preemption or on a planned switchover (no keepalived).
//!
//! - [`heartbeat`]: the datagram, its HMAC, and what a node accepts.
//! - [`election`]: who should be active, a pure state machine.
//! - [`reach`]: whether this node may hold the role (a gateway or upstreams answer).
//! - [`address`]: the addresses on the interface (the OS side).
//! - [`cli`]: `fulcrum ha status` and `fulcrum ha switchover`.
//!
//! The runner here ties them together on a thread of its own (its own runtime, so that
//! a reload's config parsing or a busy admin API on the main runtime never delays a
//! heartbeat into a takeover): one task sends heartbeats every interval and at once on a
//! change of role, receives the peers', and claims or releases the addresses as the
//! election decides.
//!
//! A planned switchover loses no connection: the active node first pauses its listeners
//! (new clients' SYNs are dropped, so they send them again about a second later, to the
//! node holding the address by then), lets its open connections finish, and only then
//! yields; it resumes its listeners once the address is off it (or if no peer took the
//! role). Heartbeats say "active" throughout the drain, so the peer does not take over.

pub mod address;
pub mod cli;
pub mod election;
pub mod heartbeat;
pub mod reach;

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::HaConfig;
use crate::runtime::Shared;
use crate::server::Quiesce;
use address::VirtualAddresses;
use election::{Election, Peer, Reason, Role, Settings, Transition};
use heartbeat::{Heartbeat, Inbox, Rejected, Sequence, WireRole};

/// How long to wait before trying again to open the interface, or to claim after a claim
/// failed. (Taking the addresses off is tried again at every heartbeat tick.)
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Heartbeats are a few dozen bytes; anything longer is not one.
const MAX_DATAGRAM: usize = 512;
/// How often a failing send is logged at most.
const SEND_WARNING_EVERY: Duration = Duration::from_secs(60);
/// "Yielding" heartbeats a leaving node sends, back to back, so one lost datagram does not
/// leave the peer waiting a dead time.
const FAREWELLS: usize = 3;
/// The longest a switchover waits for connections to finish (`shutdown_grace` if shorter):
/// those still open then (long downloads, say) break when the address moves. It is not
/// waited for WebSockets (they break at once), and new clients wait for it: their SYNs are
/// retried after 1, 3, 7 and 15 s.
const MAX_DRAIN: Duration = Duration::from_secs(10);

/// The running HA node: its state for the admin API, and the calls that change it.
#[derive(Clone)]
pub struct HaHandle {
    inner: Arc<Inner>,
}

struct Inner {
    commands: mpsc::Sender<Command>,
    view: Mutex<View>,
    dead_time: Duration,
}

enum Command {
    Switchover(oneshot::Sender<Result<String, String>>),
    Leave {
        release: bool,
        done: oneshot::Sender<()>,
    },
}

/// What the runner last published, for [`HaHandle::status`].
struct View {
    node: String,
    priority: u8,
    group: u8,
    virtual_addresses: Vec<String>,
    role: Role,
    wire_role: WireRole,
    /// Waiting for connections to finish before yielding (a switchover's first part).
    draining: bool,
    eligible: bool,
    /// Per configured peer address, what was last heard from it.
    peers: Vec<(SocketAddr, Option<Peer>)>,
    last_change: Option<(SystemTime, Instant, Transition)>,
    transitions: BTreeMap<(Role, Reason), u64>,
    dropped: BTreeMap<Rejected, u64>,
    /// The latest failure to open the interface or change its addresses, until one works;
    /// or a name conflict, for good.
    error: Option<String>,
    /// `error` is a name conflict, which nothing clears.
    error_is_for_good: bool,
    /// Whether the node has left the group (shutting down, or replaced by an upgrade).
    left: bool,
}

/// `/api/status`'s `"ha"`.
#[derive(Debug, Clone, Serialize)]
pub struct HaStatus {
    pub node: String,
    /// `active` or `backup`.
    pub role: &'static str,
    /// Active and handing the role over (a switchover in progress).
    pub yielding: bool,
    /// Active, taking no new connections and waiting for the open ones to finish before
    /// it yields (the first part of a switchover).
    pub draining: bool,
    /// Whether this node passes its reach checks.
    pub eligible: bool,
    pub priority: u8,
    pub group: u8,
    pub virtual_addresses: Vec<String>,
    pub peers: Vec<PeerStatus>,
    pub last_change: Option<ChangeStatus>,
    /// Changes of role since start.
    pub transitions: u64,
    pub transitions_by: Vec<TransitionCount>,
    /// Datagrams dropped, by reason: `malformed`, `unauthenticated`, `other_group`,
    /// `unknown_peer`, `replayed`, `own_name`.
    pub heartbeats_dropped: BTreeMap<&'static str, u64>,
    /// Why the addresses could not be changed, while that lasts (a failed claim's until a
    /// claim works: the node is not eligible meanwhile); or, for good, that a peer uses this
    /// node's name.
    pub error: Option<String>,
    /// The node left the group (shutting down or handed to an upgraded process).
    pub left: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// As configured in `peers`.
    pub address: SocketAddr,
    /// As its heartbeats say; `None` until heard.
    pub name: Option<String>,
    pub role: Option<WireRole>,
    pub priority: Option<u8>,
    pub eligible: Option<bool>,
    /// Heard within the dead time.
    pub alive: bool,
    pub last_heard_ms_ago: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChangeStatus {
    /// RFC 3339, UTC.
    pub at: String,
    pub ms_ago: u64,
    pub from: &'static str,
    pub to: &'static str,
    pub reason: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TransitionCount {
    pub to: &'static str,
    pub reason: &'static str,
    pub count: u64,
}

impl HaHandle {
    /// Planned hand-over from the active node: returns once a peer holds the role (its
    /// name), or why none does.
    pub async fn switchover(&self) -> Result<String, String> {
        let (reply, outcome) = oneshot::channel();
        self.inner
            .commands
            .send(Command::Switchover(reply))
            .await
            .map_err(|_| "this node has left the group".to_string())?;
        outcome
            .await
            .map_err(|_| "this node left the group during the switchover".to_string())?
    }

    /// Leaves the group: stops heartbeats and, with `release`, hands the role over (a last
    /// "yielding" heartbeat, so the peer takes over at once) and takes the addresses off.
    /// Without `release` (a binary upgrade), the addresses stay for the new process, which
    /// finds them and, started by the upgrade, starts active. Returns once done; later
    /// calls return at once.
    pub async fn leave(&self, release: bool) {
        let (done, finished) = oneshot::channel();
        if self
            .inner
            .commands
            .send(Command::Leave { release, done })
            .await
            .is_ok()
        {
            let _ = finished.await;
        }
    }

    pub fn status(&self) -> HaStatus {
        let view = lock(&self.inner.view);
        let now = Instant::now();
        let peers = view
            .peers
            .iter()
            .map(|(address, peer)| PeerStatus {
                address: *address,
                name: peer.as_ref().map(|p| p.name.clone()),
                role: peer.as_ref().map(|p| p.role),
                priority: peer.as_ref().map(|p| p.priority),
                eligible: peer.as_ref().map(|p| p.eligible),
                alive: peer.as_ref().is_some_and(|p| {
                    now.saturating_duration_since(p.last_heard) < self.inner.dead_time
                }),
                last_heard_ms_ago: peer
                    .as_ref()
                    .map(|p| now.saturating_duration_since(p.last_heard).as_millis() as u64),
            })
            .collect();
        HaStatus {
            node: view.node.clone(),
            role: view.role.name(),
            yielding: view.wire_role == WireRole::Yielding,
            draining: view.draining,
            eligible: view.eligible,
            priority: view.priority,
            group: view.group,
            virtual_addresses: view.virtual_addresses.clone(),
            peers,
            last_change: view.last_change.as_ref().map(|(at, when, t)| ChangeStatus {
                at: humantime::format_rfc3339_millis(*at).to_string(),
                ms_ago: now.saturating_duration_since(*when).as_millis() as u64,
                from: t.from.name(),
                to: t.to.name(),
                reason: t.reason.name(),
                detail: t.detail.clone(),
            }),
            transitions: view.transitions.values().sum(),
            transitions_by: view
                .transitions
                .iter()
                .map(|(&(to, reason), &count)| TransitionCount {
                    to: to.name(),
                    reason: reason.name(),
                    count,
                })
                .collect(),
            heartbeats_dropped: Rejected::ALL
                .iter()
                .map(|r| (r.name(), view.dropped.get(r).copied().unwrap_or(0)))
                .collect(),
            error: view.error.clone(),
            left: view.left,
        }
    }
}

/// Binds the heartbeat socket (a taken address stops the start) and starts the runner on a
/// thread of its own. `quiesce` pauses the server's listeners for a switchover. `upgraded`:
/// this process was started by a binary upgrade, so virtual addresses found on the
/// interface are the old process's, handed over with the role; on any other start they
/// were left by a process that died, and are taken off before the node listens.
pub fn start(
    config: &HaConfig,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    quiesce: Quiesce,
    upgraded: bool,
) -> io::Result<HaHandle> {
    let socket = bind(config.bind).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("[ha] cannot bind {} for heartbeats: {e}", config.bind),
        )
    })?;
    let (commands, received) = mpsc::channel(16);
    let inner = Arc::new(Inner {
        commands,
        dead_time: config.dead_time(),
        view: Mutex::new(View {
            node: config.node.clone(),
            priority: config.priority,
            group: config.group,
            virtual_addresses: config
                .virtual_addresses
                .iter()
                .map(ToString::to_string)
                .collect(),
            role: Role::Backup,
            wire_role: WireRole::Backup,
            draining: false,
            eligible: false,
            peers: config.peers.iter().map(|&a| (a, None)).collect(),
            last_change: None,
            transitions: BTreeMap::new(),
            dropped: BTreeMap::new(),
            error: None,
            error_is_for_good: false,
            left: false,
        }),
    });
    tracing::info!(
        node = %config.node,
        priority = config.priority,
        group = config.group,
        bind = %config.bind,
        peers = ?config.peers,
        interface = %config.interface,
        "HA: joining the group"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let config = config.clone();
    let view = inner.clone();
    std::thread::Builder::new()
        .name("fulcrum-ha".into())
        .spawn(move || {
            runtime.block_on(async move {
                let socket = match UdpSocket::from_std(socket) {
                    Ok(socket) => socket,
                    Err(e) => {
                        tracing::error!(error = %e, "HA: cannot use the heartbeat socket; this node stays out of the group");
                        let mut view = lock(&view.view);
                        view.error = Some(format!("cannot use the heartbeat socket: {e}"));
                        view.left = true;
                        return;
                    }
                };
                let key = heartbeat::key(config.key.bytes());
                let runner = Runner {
                    inbox: Inbox::new(key.clone(), config.group, &config.node, &config.peers),
                    config,
                    socket,
                    key,
                    sequence: Sequence::default(),
                    inner: view,
                    last_send_warning: None,
                    unreleased: false,
                    last_release_error: None,
                    claim_failed_at: None,
                    upgraded,
                    quiesce,
                    paused: false,
                };
                runner.run(received, shared, shutdown).await;
            })
        })?;
    Ok(HaHandle { inner })
}

/// A UDP socket on `addr` with `SO_REUSEPORT`, so that a process started by a binary
/// upgrade can bind it while this one still holds it.
fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

struct Runner {
    config: HaConfig,
    socket: UdpSocket,
    inbox: Inbox,
    key: aws_lc_rs::hmac::Key,
    sequence: Sequence,
    inner: Arc<Inner>,
    last_send_warning: Option<Instant>,
    /// The addresses could not be taken off yet: tried again at every tick.
    unreleased: bool,
    /// Why, as last logged (a failure that goes on is logged once).
    last_release_error: Option<String>,
    /// When a claim last failed, until it is tried again.
    claim_failed_at: Option<Instant>,
    /// Started by a binary upgrade: addresses found on the interface are handed over.
    upgraded: bool,
    /// The server's listeners, paused for a switchover.
    quiesce: Quiesce,
    /// Whether the listeners are paused: from a switchover's start until the address is
    /// off this node or the switchover failed, and never after the runner ends.
    paused: bool,
}

/// A switchover's drain: resolves with the connections still open at its end.
type Drain = Pin<Box<dyn Future<Output = usize> + Send>>;

impl Runner {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        shared: Arc<Shared>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Some(mut addresses) = self.open(&mut commands, &mut shutdown).await else {
            return;
        };
        let present = match addresses.present().await {
            Ok(present) => present,
            Err(e) => {
                tracing::warn!(error = %e, "HA: cannot tell whether the virtual addresses are here; starting as backup");
                Vec::new()
            }
        };
        let all_present = present.len() == self.config.virtual_addresses.len();
        // Only the process an upgrade started takes the role over with the addresses: on
        // any other start a process that held them died (or was killed), and whether this
        // node should hold the role is for the election to say, after listening.
        let held = all_present && self.upgraded;
        if !held && !present.is_empty() {
            tracing::warn!(
                addresses = ?present.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "HA: virtual addresses left by a previous run are on the interface: taking them off and listening for the peers first"
            );
        }
        let checks = !self.config.reach.is_empty() || self.config.reach_upstreams;
        // Until its first round, a node that already holds the addresses trusts the
        // process it replaces; any other starts ineligible, to claim nothing unchecked.
        let (verdict, mut eligibility) = watch::channel(held || !checks);
        let snapshots = shared.clone();
        tokio::spawn(reach::run(
            self.config.clone(),
            shared,
            verdict,
            shutdown.clone(),
        ));
        let settings = Settings {
            node: self.config.node.clone(),
            priority: self.config.priority,
            preempt: self.config.preempt,
            dead_time: self.config.dead_time(),
        };
        let (mut election, started) =
            Election::new(settings, *eligibility.borrow(), held, Instant::now());
        if !held {
            // What an earlier process that was killed left behind is not ours to hold.
            self.release(&addresses).await;
        }
        match started {
            Some(t) => self.apply(t, &addresses, &mut election).await,
            None => self.publish(&election),
        }
        let mut tick = tokio::time::interval(self.config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut waiting: Vec<oneshot::Sender<Result<String, String>>> = Vec::new();
        let mut drain: Option<Drain> = None;
        let mut watching = true;
        let mut buf = [0u8; MAX_DATAGRAM];
        loop {
            let mut send_now = false;
            let deadline = election.next_deadline(Instant::now());
            let step = tokio::select! {
                biased;
                _ = crate::server::stopping(&mut shutdown) => {
                    self.leave(true, &mut election, &addresses).await;
                    break;
                }
                command = commands.recv() => match command {
                    Some(Command::Switchover(reply)) => {
                        if drain.is_some() || election.wire_role() == WireRole::Yielding {
                            // Answered with the switchover under way.
                            waiting.push(reply);
                        } else {
                            match election.can_switchover(Instant::now()) {
                                Ok(()) => {
                                    let timeouts = &snapshots.load().config.timeouts;
                                    let within = timeouts.shutdown_grace.min(MAX_DRAIN);
                                    tracing::info!(
                                        ?within,
                                        "HA: switchover asked: taking no new connections and letting the open ones finish before yielding the role"
                                    );
                                    drain = Some(self.pause(within));
                                    waiting.push(reply);
                                }
                                Err(e) => {
                                    let _ = reply.send(Err(e));
                                }
                            }
                        }
                        None
                    }
                    Some(Command::Leave { release, done }) => {
                        self.leave(release, &mut election, &addresses).await;
                        let _ = done.send(());
                        break;
                    }
                    None => break,
                },
                open = drained(&mut drain) => {
                    drain = None;
                    if open == 0 {
                        tracing::info!("HA: connections finished: yielding the role");
                    } else {
                        tracing::warn!(
                            open,
                            "HA: drain time over with connections open, which break when the address moves: yielding the role"
                        );
                    }
                    match election.start_switchover(Instant::now()) {
                        Ok(()) => send_now = true,
                        Err(e) => {
                            for reply in waiting.drain(..) {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                    None
                }
                _ = tick.tick() => {
                    if self.unreleased && election.role() == Role::Backup {
                        self.release(&addresses).await;
                    }
                    send_now = true;
                    let now = Instant::now();
                    let retry = self
                        .claim_failed_at
                        .is_some_and(|at| now.duration_since(at) >= RETRY_EVERY);
                    if retry {
                        self.claim_failed_at = None;
                        self.reopen(&mut addresses).await;
                        election.retry_claim(now)
                    } else {
                        election.tick(now)
                    }
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    election.tick(Instant::now())
                }
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((len, from)) => {
                        let now = Instant::now();
                        match self.inbox.accept(from, &buf[..len], now) {
                            Ok(hb) => election.heard(from, &hb, now),
                            Err(Rejected::OwnName) => self.name_conflict(from, &mut election),
                            Err(_) => None,
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "HA: heartbeat receive failed");
                        None
                    }
                },
                changed = eligibility.changed(), if watching => match changed {
                    Ok(()) => {
                        let eligible = *eligibility.borrow_and_update();
                        election.set_eligible(eligible, Instant::now())
                    }
                    Err(_) => {
                        watching = false;
                        None
                    }
                },
            };
            if let Some(t) = step {
                if drain.is_some() && t.to == Role::Backup {
                    // Lost reach, or a better peer took the role: there is none to hand over.
                    drain = None;
                    let why = format!("the role went during the drain: {}", t.detail);
                    for reply in waiting.drain(..) {
                        let _ = reply.send(Err(why.clone()));
                    }
                }
                // `apply` heartbeats at once itself.
                self.apply(t, &addresses, &mut election).await;
            } else if send_now {
                self.send(election.wire_role(), election.eligible()).await;
            }
            if election.take_reannounce() {
                tracing::info!(
                    "HA: an active peer stepped down: announcing the virtual addresses again"
                );
                if let Some(t) = self.claim(&addresses, &mut election).await {
                    if drain.is_some() {
                        drain = None;
                        let why = format!("the role went during the drain: {}", t.detail);
                        for reply in waiting.drain(..) {
                            let _ = reply.send(Err(why.clone()));
                        }
                    }
                    self.apply(t, &addresses, &mut election).await;
                }
            }
            // The address is off this node now (its release is part of the change to
            // backup), or no peer took the role.
            if drain.is_none() && election.wire_role() != WireRole::Yielding {
                self.resume();
            }
            self.publish(&election);
            // Answered only now, so that whoever asked finds the listeners resumed and the
            // status saying how it ended.
            if let Some(outcome) = election.take_switchover_outcome() {
                for reply in waiting.drain(..) {
                    let _ = reply.send(outcome.clone());
                }
            }
        }
        self.resume();
        for reply in waiting.drain(..) {
            let _ = reply.send(Err("this node left the group".into()));
        }
        self.publish(&election);
        lock(&self.inner.view).left = true;
        // The socket goes now: with SO_REUSEPORT, a socket kept open would take its share
        // of the peers' heartbeats from the process that took over.
        drop(self);
        // Calls to leave after this one return at once.
        commands.close();
        while let Some(command) = commands.recv().await {
            if let Command::Leave { done, .. } = command {
                let _ = done.send(());
            }
        }
    }

    /// Opens the interface, trying again every second until it works or the node leaves.
    async fn open(
        &mut self,
        commands: &mut mpsc::Receiver<Command>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<VirtualAddresses> {
        loop {
            match VirtualAddresses::open(&self.config.interface, &self.config.virtual_addresses)
                .await
            {
                Ok(addresses) => {
                    lock(&self.inner.view).error = None;
                    return Some(addresses);
                }
                Err(e) => {
                    let error = format!("interface `{}`: {e}", self.config.interface);
                    let mut view = lock(&self.inner.view);
                    if view.error.as_ref() != Some(&error) {
                        tracing::error!(
                            "HA: {error}; this node stays out of the group until it can hold the addresses"
                        );
                    }
                    view.error = Some(error);
                }
            }
            tokio::select! {
                _ = crate::server::stopping(shutdown) => return None,
                command = commands.recv() => match command {
                    Some(Command::Switchover(reply)) => {
                        let _ = reply.send(Err("this node cannot open its interface".into()));
                    }
                    Some(Command::Leave { done, .. }) => {
                        let _ = done.send(());
                        return None;
                    }
                    None => return None,
                },
                _ = tokio::time::sleep(RETRY_EVERY) => {}
            }
        }
    }

    /// Acts on a change of role: the addresses first (a new active node claims before
    /// anything else), then a heartbeat at once, then the log line and the record. A node
    /// that cannot claim stays backup, says it is not eligible, and tries again later.
    async fn apply(
        &mut self,
        t: Transition,
        addresses: &VirtualAddresses,
        election: &mut Election,
    ) {
        if t.to == Role::Active && self.claim(addresses, election).await.is_some() {
            // Never announced: the peers heard this node as a backup throughout. What the
            // claim put on before it failed comes off.
            self.release(addresses).await;
            self.send(election.wire_role(), election.eligible()).await;
            self.publish(election);
            return;
        }
        if t.to == Role::Backup {
            self.release(addresses).await;
        }
        self.send(election.wire_role(), election.eligible()).await;
        let (from, to, reason) = (t.from.name(), t.to.name(), t.reason.name());
        match t.reason {
            Reason::PeerDead
            | Reason::LostReach
            | Reason::DualActive
            | Reason::ClaimFailed
            | Reason::NameConflict => {
                tracing::warn!(from, to, reason, detail = %t.detail, "HA: role changed")
            }
            _ => tracing::info!(from, to, reason, detail = %t.detail, "HA: role changed"),
        }
        self.record(t, election);
    }

    /// Shows `t` and the state it left in the status, at once.
    fn record(&self, t: Transition, election: &Election) {
        let mut view = lock(&self.inner.view);
        *view.transitions.entry((t.to, t.reason)).or_default() += 1;
        view.last_change = Some((SystemTime::now(), Instant::now(), t));
        self.publish_into(&mut view, election);
    }

    /// Puts the addresses on (and announces them). On failure the node may not hold the
    /// role until the claim is tried again ([`RETRY_EVERY`] later): returns the step down
    /// if it was active.
    async fn claim(
        &mut self,
        addresses: &VirtualAddresses,
        election: &mut Election,
    ) -> Option<Transition> {
        let result = addresses.claim().await;
        let mut view = lock(&self.inner.view);
        match result {
            Ok(()) => {
                if !view.error_is_for_good {
                    view.error = None;
                }
                None
            }
            Err(e) => {
                let error = format!(
                    "cannot put the virtual addresses on `{}`: {e}",
                    self.config.interface
                );
                if view.error.as_ref() != Some(&error) {
                    tracing::error!(
                        "HA: {error}; this node may not hold the role until a claim works (tried again every {RETRY_EVERY:?})"
                    );
                }
                view.error = Some(error.clone());
                self.claim_failed_at = Some(Instant::now());
                let step_down = election.claim_failed(error);
                // The error and the ineligibility it brings are shown together: a reader
                // of the status never sees one without the other.
                self.publish_into(&mut view, election);
                step_down
            }
        }
    }

    /// Takes the addresses off; on failure, tries again at the next tick.
    async fn release(&mut self, addresses: &VirtualAddresses) {
        let result = addresses.release().await;
        let mut view = lock(&self.inner.view);
        match result {
            Ok(()) => {
                self.unreleased = false;
                self.last_release_error = None;
                // A failed claim's error stays shown until a claim works.
                if self.claim_failed_at.is_none() && !view.error_is_for_good {
                    view.error = None;
                }
            }
            Err(e) => {
                let error = format!(
                    "cannot take the virtual addresses off `{}`: {e}",
                    self.config.interface
                );
                if self.last_release_error.as_ref() != Some(&error) {
                    tracing::error!("HA: {error}; trying again");
                }
                // A failed claim's error (which this often follows) says more.
                if self.claim_failed_at.is_none() && !view.error_is_for_good {
                    view.error = Some(error.clone());
                }
                self.last_release_error = Some(error);
                self.unreleased = true;
            }
        }
    }

    /// Before a claim is tried again: the interface looked up afresh by name, in case it
    /// was removed and made again (a new index). Keeps the old one if that fails.
    async fn reopen(&mut self, addresses: &mut VirtualAddresses) {
        match VirtualAddresses::open(&self.config.interface, &self.config.virtual_addresses).await {
            Ok(opened) => *addresses = opened,
            Err(e) => {
                tracing::debug!(error = %e, "HA: cannot open the interface again");
            }
        }
    }

    /// A heartbeat under this node's own name came from a configured peer's address: two
    /// nodes are configured alike, and neither can tell the other's heartbeats from its
    /// own. This node gives up the role for good; an operator must rename one.
    fn name_conflict(&mut self, from: SocketAddr, election: &mut Election) -> Option<Transition> {
        let mut view = lock(&self.inner.view);
        if view.error_is_for_good {
            return None;
        }
        let error = format!(
            "peer {from} sends heartbeats as `{}`, this node's own name: give each node a name of its own; this node holds no role until restarted",
            self.config.node
        );
        tracing::error!("HA: {error}");
        view.error = Some(error.clone());
        view.error_is_for_good = true;
        drop(view);
        election.name_conflict(error)
    }

    async fn leave(
        &mut self,
        release: bool,
        election: &mut Election,
        addresses: &VirtualAddresses,
    ) {
        if !release {
            tracing::info!(
                "HA: leaving the group, the virtual addresses left for the process that takes over"
            );
            // The process that takes over accepts on the same sockets.
            self.resume();
            return;
        }
        if election.role() == Role::Active {
            for _ in 0..FAREWELLS {
                self.send(WireRole::Yielding, election.eligible()).await;
            }
        }
        if let Some(t) = election.leave() {
            self.release(addresses).await;
            tracing::info!(
                from = t.from.name(),
                to = t.to.name(),
                reason = t.reason.name(),
                detail = %t.detail,
                "HA: role changed"
            );
            self.record(t, election);
        }
        // After the release: until then a SYN for the address goes unanswered, and the
        // client sends it again to the node taking over.
        self.resume();
        tracing::info!("HA: left the group");
    }

    /// Pauses the server's listeners for a switchover, and returns the wait for their
    /// connections to finish, up to `within`.
    fn pause(&mut self, within: Duration) -> Drain {
        self.quiesce.pause();
        self.paused = true;
        let quiesce = self.quiesce.clone();
        Box::pin(async move { quiesce.drained(within).await })
    }

    /// Undoes [`Runner::pause`], if paused.
    fn resume(&mut self) {
        if std::mem::take(&mut self.paused) {
            self.quiesce.resume();
            tracing::info!("HA: the listeners take new connections again");
        }
    }

    /// One heartbeat to every peer.
    async fn send(&mut self, role: WireRole, eligible: bool) {
        let bytes = Heartbeat {
            group: self.config.group,
            node: self.config.node.clone(),
            priority: self.config.priority,
            role,
            eligible,
            sequence: self.sequence.next(heartbeat::wall_clock_micros()),
        }
        .encode(&self.key);
        for &peer in &self.config.peers {
            if let Err(e) = self.socket.send_to(&bytes, peer).await {
                let now = Instant::now();
                let due = self
                    .last_send_warning
                    .is_none_or(|at| now.duration_since(at) >= SEND_WARNING_EVERY);
                if due {
                    self.last_send_warning = Some(now);
                    tracing::warn!(%peer, error = %e, "HA: cannot send a heartbeat (further failures are not logged for a minute)");
                }
            }
        }
    }

    fn publish(&self, election: &Election) {
        self.publish_into(&mut lock(&self.inner.view), election);
    }

    fn publish_into(&self, view: &mut View, election: &Election) {
        view.role = election.role();
        view.wire_role = election.wire_role();
        view.draining = self.paused && view.wire_role == WireRole::Active;
        view.eligible = election.eligible();
        for (addr, slot) in view.peers.iter_mut() {
            if let Some(peer) = election.peers().iter().find(|p| p.addr == *addr) {
                *slot = Some(peer.clone());
            }
        }
        view.dropped = self
            .inbox
            .dropped
            .iter()
            .map(|(&r, &count)| (r, count))
            .collect();
    }
}

/// The end of the drain under way (never without one): the connections still open then.
async fn drained(drain: &mut Option<Drain>) -> usize {
    match drain {
        Some(drain) => drain.await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline` (forever without one).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
