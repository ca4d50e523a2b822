//! Upstream groups and their servers: where a routed request can be sent, each server with
//! its own pool of kept-alive connections, its load (requests in flight, response times)
//! and its health (down, ejected, ramping up); the order in which a request tries servers
//! (sticky pin, primaries, backups, everyone in a panic).

mod admission;
mod budget;
mod latency;
mod outlier;
mod pool;
mod resilience;
mod state;
pub mod stats;
pub(crate) mod sticky;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};

pub use admission::{Admitted, Refused};
use latency::PeakEwma;
use outlier::{Outlier, Trigger, ejection_cap};
pub use pool::{ConnectError, Pool, RawConn, TunnelSlot};
pub use resilience::{ResilienceStats, Unavailable};
pub use state::{Down, HealthEvent, now_ms, unix_ms};
use state::{History, ServerState, Settled};
use sticky::Sticky;

use crate::balance::{self, Balancer, FULL_SHARE, Loads, PickContext, Thinning};
use crate::config::{HashKey, OutlierDetection, UpstreamConfig, UpstreamTls};
use crate::tls::client::Connector;

/// A named group of servers and the balancers that choose among them.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub servers: Box<[Arc<Server>]>,
    /// Servers that take requests first.
    primary: Tier,
    /// Servers that take requests only when no primary could be reached.
    backup: Tier,
    /// What the balancer hashes, for `consistent_hash`.
    pub hash_key: Option<HashKey>,
    /// Pinning clients to a server with a cookie, if sessions are sticky.
    sticky: Option<Sticky>,
    /// Forward the client's Host header rather than the server's own address.
    pub preserve_host: bool,
    /// Per server, its tier and position there; `None` for drained and disabled servers.
    placement: Box<[Option<(Rank, usize)>]>,
    /// Per server, whether it is disabled: not even its sticky clients reach it.
    disabled: Box<[bool]>,
    /// How long a server that could not be reached is left alone (0: never).
    fail_timeout: Duration,
    /// How long a server takes to ramp up to its whole weight (0: at once).
    slow_start: Duration,
    /// When real traffic ejects a server.
    outlier: OutlierDetection,
    /// Percent of healthy primaries below which all are balanced over (0: never).
    panic_threshold: u32,
    /// Too few servers are healthy: requests go to all of them as if all were.
    panicking: AtomicBool,
    /// Held from counting the servers ejected to ejecting one more, so that workers
    /// ejecting at once cannot pass the cap together, and while the panic is judged. Taken
    /// only when a server's state changes, never per request.
    ejecting: Mutex<()>,
    /// Servers down or ramping up. While there are any, picks bring their shares up to
    /// date and thin out their picks; otherwise a pick costs just this one load.
    unsettled: AtomicUsize,
    /// When shares were last brought up to date, in `now_ms` time.
    settled_at: AtomicU64,
    /// Whether a balancer keeps servers ordered by load, and so must hear of every request
    /// that starts or ends.
    ordered_by_load: bool,
    /// How connections to the servers become TLS, if they do.
    pub tls: Option<Connector>,
    /// Retries, their budget and the circuit breaker.
    resilience: resilience::Resilience,
    /// Shared with the upstreams this one replaced and will be replaced by.
    lineage: Arc<Lineage>,
    /// This upstream's place in `lineage`: the current one has the latest.
    generation: u64,
}

/// What the upstreams of one name share across reloads, so that a request or tunnel
/// tracked by a replaced upstream (its `InFlight` holds that one) still reaches the current
/// balancer when it ends: it marks its server for rescoring, and the current upstream's
/// next pick rescores the marked servers. Without it, a `least_connections` balancer built
/// while long tunnels were open would count them forever.
#[derive(Debug, Default)]
struct Lineage {
    /// The generation of the latest upstream built.
    latest: AtomicU64,
    /// Some server has `rescore` set.
    rescore: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rank {
    Primary,
    Backup,
}

/// One backend server.
#[derive(Debug)]
pub struct Server {
    pub address: SocketAddr,
    /// `address` as a Host header value, for upstreams that do not preserve the client's.
    pub host_header: HeaderValue,
    pub pool: Pool,
    /// Requests in flight to this server from every worker, for load-aware balancers.
    active: AtomicUsize,
    /// A request or tunnel tracked by a replaced upstream ended: the current upstream's
    /// balancer has yet to hear of this server's load (see [`Lineage`]).
    rescore: AtomicBool,
    /// Response times seen from this server, for `least_time`.
    latency: PeakEwma,
    state: ServerState,
    /// Errors of real requests in a row, and past ejections.
    outlier: Outlier,
    /// The latest changes of state, for the admin API.
    history: History,
    /// What the latest active check found.
    last_check: Mutex<Option<CheckReport>>,
    /// Requests answered through this server, for the metrics and the admin API.
    pub stats: stats::RequestStats,
    /// What the server was built with, so a reload knows whether it can keep it.
    pool_settings: PoolSettings,
}

/// The result of one active check, as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub passed: bool,
    /// What was found: `status 200`, `timed out`, `connection refused`, …
    pub detail: String,
    /// Checks in a row with this result.
    pub streak: u32,
}

/// Everything a server's pool is built from besides its address.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PoolSettings {
    workers: usize,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    /// The server's own `max_connections`.
    max_connections: usize,
    latency_decay: Duration,
    /// The upstream's TLS settings, as a digest: pooled connections made with other ones
    /// are not reused (0: plain TCP).
    tls: u64,
}

impl Server {
    fn new(address: SocketAddr, settings: PoolSettings) -> Self {
        Server {
            address,
            host_header: HeaderValue::from_str(&address.to_string())
                .expect("a socket address is a valid header value"),
            pool: Pool::new(
                address,
                settings.workers,
                settings.max_idle,
                settings.idle_timeout,
                settings.connect_timeout,
                settings.max_connections,
            ),
            active: AtomicUsize::new(0),
            rescore: AtomicBool::new(false),
            latency: PeakEwma::new(settings.latency_decay),
            state: ServerState::new(),
            outlier: Outlier::default(),
            history: History::default(),
            last_check: Mutex::new(None),
            stats: stats::RequestStats::new(settings.workers),
            pool_settings: settings,
        }
    }

    /// Requests in flight to this server now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Records how long the server took to start answering a request, `response_time`,
    /// as of `at` (a time already read for it: no second read of the clock).
    pub fn observe(&self, response_time: Duration, at: Instant) {
        self.latency.observe(response_time, at);
    }

    /// The recent response time `least_time` balances on (decaying while none arrive).
    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency.estimate_ns() as u64)
    }

    /// The server's health as the admin API shows it.
    pub fn health_report(&self) -> HealthReport {
        let (consecutive_5xx, consecutive_failures) = self.outlier.streaks();
        HealthReport {
            state: self.health_state(),
            share: self.share(),
            ejections: self.outlier.ejections(),
            history: self.history.events(),
            last_check: self
                .last_check
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            consecutive_5xx,
            consecutive_failures,
        }
    }

    /// `up`, `ramping`, `down` (failing its active checks), `ejected` (outlier detection)
    /// or `unreachable` (a connection to it failed): cheap enough for every metrics scrape.
    pub fn health_state(&self) -> &'static str {
        match self.state.down() {
            Some(down) => down.name(),
            None if self.share() >= FULL_SHARE => "up",
            None => "ramping",
        }
    }

    /// Whether the server takes requests now (up or ramping), as a metric shows it.
    pub fn is_healthy(&self) -> bool {
        self.state.down().is_none()
    }

    /// Whether its active checks say it is down.
    pub fn checks_failing(&self) -> bool {
        self.state.checks_failing()
    }

    /// Keeps the result of an active check for the report.
    pub fn record_check(&self, report: CheckReport) {
        *self.last_check.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
    }

    /// Thousandths of its weight the server takes now: 0 while down, less than
    /// `FULL_SHARE` while ramping up.
    pub fn share(&self) -> u32 {
        self.state.share()
    }
}

/// What became of one try of a request at a server, as passive outlier detection counts
/// it. (A connection that cannot be made is reported by `unreachable`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// A response below 500.
    Success,
    /// A 5xx response.
    ServerError,
    /// No response head within the (per-try) timeout.
    Timeout,
    /// The connection failed before a whole response head arrived.
    Broken,
}

/// What the admin API and the metrics show of a server's health.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HealthReport {
    /// `up`, `ramping` (back, taking a growing share), `down` (failed its active checks),
    /// `ejected` (outlier detection) or `unreachable` (a connection to it failed).
    pub state: &'static str,
    /// Thousandths of its weight it takes now.
    pub share: u32,
    /// Times outlier detection has ejected it.
    pub ejections: u64,
    /// The latest changes of state, oldest first.
    pub history: Vec<HealthEvent>,
    /// The latest active check, if the upstream has them.
    pub last_check: Option<CheckReport>,
    /// 5xx responses to real requests in a row, now.
    pub consecutive_5xx: u32,
    /// Timeouts and broken connections of real requests in a row, now.
    pub consecutive_failures: u32,
}

/// What ties a request to a server beside the balancer's own choice.
#[derive(Debug, Clone, Copy)]
pub struct Affinity {
    pub client_ip: IpAddr,
    /// The hash of the request's `hash_key`, for `consistent_hash`.
    pub key: Option<u64>,
    /// The server the request's sticky cookie names, if it is still listed.
    pub pinned: Option<usize>,
}

/// Where one try of a request goes.
enum Turn<'a> {
    Pinned(usize),
    Tier(&'a Tier, usize),
}

/// Servers of one rank that take new requests (drained ones do not), and the balancer
/// that picks among them by their position in `members`.
#[derive(Debug)]
struct Tier {
    /// Indices into the upstream's server list.
    members: Box<[usize]>,
    balancer: Box<dyn Balancer>,
}

/// A tier's view of the servers' loads, indexed as the tier's balancer sees them.
struct TierLoads<'a> {
    servers: &'a [Arc<Server>],
    members: &'a [usize],
    /// The upstream panics: every server counts as up at its whole share.
    panic: bool,
}

impl Loads for TierLoads<'_> {
    fn active(&self, server: usize) -> usize {
        self.servers[self.members[server]].active()
    }

    fn latency_ns(&self, server: usize) -> f64 {
        self.servers[self.members[server]].latency.estimate_ns()
    }

    fn share(&self, server: usize) -> u32 {
        if self.panic {
            return FULL_SHARE;
        }
        self.servers[self.members[server]].share()
    }
}

/// One request in flight to a server; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight {
    upstream: Arc<Upstream>,
    server: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let upstream = &self.upstream;
        let server = &upstream.servers[self.server];
        server.active.fetch_sub(1, Ordering::Relaxed);
        if upstream.ordered_by_load {
            upstream.load_changed(self.server);
            if upstream.lineage.latest.load(Ordering::Relaxed) != upstream.generation {
                server.rescore.store(true, Ordering::Relaxed);
                upstream.lineage.rescore.store(true, Ordering::Release);
            }
        }
    }
}

/// At most this many picks look for a server that takes the request (one not down, and a
/// ramping one only for its share) before `Upstream::pick_in` settles for another way.
const MAX_PICKS: usize = 8;

impl Upstream {
    /// Builds an upstream whose pools keep one queue per worker. With the same upstream
    /// from the runtime being replaced (`previous`), servers at the same address keep their
    /// connections, load and state, and servers that were not taking requests there (new or
    /// drained) ramp up over `slow_start`.
    pub fn build(
        config: &UpstreamConfig,
        workers: usize,
        connect_timeout: Duration,
        previous: Option<&Upstream>,
    ) -> Self {
        let settings = PoolSettings {
            workers,
            max_idle: config.pool_max_idle_per_server,
            idle_timeout: config.pool_idle_timeout,
            connect_timeout,
            max_connections: 0,
            latency_decay: config.latency_decay,
            tls: tls_digest(config.tls.as_ref()),
        };
        let mut joining = Vec::new();
        let servers: Box<[Arc<Server>]> = config
            .servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let settings = PoolSettings {
                    max_connections: s.max_connections,
                    ..settings
                };
                let kept = previous.and_then(|p| {
                    let old = p.servers.iter().position(|o| o.address == s.address)?;
                    Some((old, p.placement[old].is_some()))
                });
                let serves = !s.drain && !s.disabled;
                if previous.is_some() && serves && !kept.is_some_and(|(_, served)| served) {
                    joining.push(i);
                }
                match (previous, kept) {
                    (Some(p), Some((old, _))) if p.servers[old].pool_settings == settings => {
                        p.servers[old].clone()
                    }
                    _ => Arc::new(Server::new(s.address, settings)),
                }
            })
            .collect();
        let mut placement = vec![None; servers.len()].into_boxed_slice();
        let mut tier = |rank: Rank| {
            let members: Box<[usize]> = (0..config.servers.len())
                .filter(|&i| {
                    let s = &config.servers[i];
                    s.backup == (rank == Rank::Backup) && !s.drain && !s.disabled
                })
                .collect();
            for (position, &i) in members.iter().enumerate() {
                placement[i] = Some((rank, position));
            }
            let configs: Vec<_> = members.iter().map(|&i| config.servers[i].clone()).collect();
            Tier {
                members,
                balancer: balance::build(config.balance, &configs),
            }
        };
        let (primary, backup) = (tier(Rank::Primary), tier(Rank::Backup));
        let sticky = config.sticky_cookie.as_ref().map(|cookie| {
            Sticky::new(
                cookie,
                &config.name,
                &config.servers,
                config.sticky_secret.as_ref(),
            )
        });
        let lineage = previous.map_or_else(Arc::default, |p| p.lineage.clone());
        let generation = lineage.latest.fetch_add(1, Ordering::Relaxed) + 1;
        let upstream = Upstream {
            lineage,
            generation,
            name: config.name.clone(),
            sticky,
            servers,
            hash_key: config.hash_key.clone(),
            preserve_host: config.preserve_host,
            placement,
            disabled: config.servers.iter().map(|s| s.disabled).collect(),
            fail_timeout: config.fail_timeout,
            slow_start: config.slow_start,
            outlier: config.outlier_detection.clone(),
            panic_threshold: config.panic_threshold,
            // Kept over a reload, so that a panic going on is not announced again.
            panicking: AtomicBool::new(
                previous.is_some_and(|p| p.panicking.load(Ordering::Relaxed)),
            ),
            ejecting: Mutex::new(()),
            unsettled: AtomicUsize::new(0),
            settled_at: AtomicU64::new(0),
            ordered_by_load: primary.balancer.ordered_by_load()
                || backup.balancer.ordered_by_load(),
            primary,
            backup,
            tls: None,
            resilience: resilience::Resilience::build(
                &config.resilience,
                previous.map(|p| &p.resilience),
            ),
        };
        for i in joining {
            if upstream.servers[i].state.ramp_up(upstream.slow_start) {
                tracing::info!(upstream = %upstream.name, server = %upstream.servers[i].address, slow_start = ?upstream.slow_start, "server joins; ramping up");
            }
        }
        // Kept servers bring their state along: let the new balancers see every server's
        // load and share.
        upstream.settle(now_ms());
        for i in 0..upstream.servers.len() {
            upstream.load_changed(i);
        }
        upstream
    }
}

/// A digest of everything TLS to the servers is made with, certificate and key bytes
/// included, so that a reload changing any of it leaves earlier connections behind.
fn tls_digest(tls: Option<&UpstreamTls>) -> u64 {
    use std::hash::{Hash, Hasher};
    let Some(tls) = tls else { return 0 };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    format!("{tls:?}").hash(&mut hasher);
    if let Some(cert) = &tls.client_cert {
        for c in &cert.chain {
            c.as_ref().hash(&mut hasher);
        }
        cert.key.secret_der().hash(&mut hasher);
    }
    hasher.finish().max(1)
}

impl Upstream {
    /// How many tries a request may make: its pinned server, then each primary once, then
    /// each backup once.
    pub fn tries(&self, affinity: &Affinity) -> usize {
        usize::from(affinity.pinned.is_some())
            + self.primary.members.len()
            + self.backup.members.len()
    }

    /// The server for try number `attempt` of a request: its pinned server first, then
    /// picked among the primaries until every one has been tried, then among the backups.
    ///
    /// A server in `failed` (indices of servers this request could not reach) is not picked
    /// again while another is left: a dead server has nothing in flight and no slow
    /// responses on record, so load-aware balancers would otherwise choose it every time.
    /// Nor is a server marked down, and one ramping up is passed over for all but its share
    /// of picks. With no primary left the backups are chosen from, and with no server left
    /// at all, one is tried anyway. While the upstream panics (too few servers healthy),
    /// every server is picked as if it were up.
    pub fn pick(
        &self,
        attempt: usize,
        affinity: &Affinity,
        failed: &[usize],
    ) -> Option<(usize, &Arc<Server>)> {
        if self.ordered_by_load && self.lineage.rescore.load(Ordering::Relaxed) {
            self.rescore_marked();
        }
        let unsettled = self.unsettled.load(Ordering::Relaxed) != 0;
        if unsettled {
            self.settle_now();
        }
        // Only servers down make a panic, so the fast path never reads this.
        let panic = unsettled && self.panicking.load(Ordering::Relaxed);
        let (tier, tier_attempt) = match self.turn(attempt, affinity) {
            Turn::Pinned(index) => {
                // A pin holds through a ramp (the client's session is there); not through
                // failures.
                if !failed.contains(&index) && (panic || self.servers[index].share() > 0) {
                    return Some((index, &self.servers[index]));
                }
                (&self.primary, 0)
            }
            Turn::Tier(tier, attempt) => (tier, attempt),
        };
        if (!unsettled || panic) && failed.is_empty() {
            // Every server up and at its whole share (or taken as such in a panic), no
            // failures yet: what the balancer says goes.
            let loads = TierLoads {
                servers: &self.servers,
                members: &tier.members,
                panic: self.panicking.load(Ordering::Relaxed),
            };
            let cx = PickContext {
                attempt: tier_attempt,
                client_ip: affinity.client_ip,
                loads: &loads,
                key: affinity.key,
            };
            if let Some(member) = tier.balancer.pick(&cx) {
                let index = tier.members[member];
                if panic || self.servers[index].share() >= FULL_SHARE {
                    return Some((index, &self.servers[index]));
                }
                // Marked down through the snapshot a reload replaced, so not counted
                // here: count again, and look further.
                self.settle(now_ms());
            }
        }
        let mut first = None;
        let found = self
            .pick_in(tier, tier_attempt, affinity, failed, panic, &mut first)
            .or_else(|| {
                // No primary takes it: the backups' own balancer chooses among them.
                let in_primaries = !std::ptr::eq(tier, &self.backup);
                in_primaries
                    .then(|| self.pick_in(&self.backup, 0, affinity, failed, panic, &mut first))
                    .flatten()
            })
            .or_else(|| {
                // Nothing fits: the first server in list order not yet failed (everything
                // is down, and down may be wrong), then what the balancer chose first.
                self.primary
                    .members
                    .iter()
                    .chain(self.backup.members.iter())
                    .copied()
                    .find(|i| !failed.contains(i))
            })
            .or(first)?;
        Some((found, &self.servers[found]))
    }

    /// A server of `tier` for this request, off the fast path (a server is down or ramping,
    /// the request failed somewhere, or the tier is empty): up to `MAX_PICKS` choices are
    /// looked at for one that takes the request, falling back to a server that is up and
    /// not failed. `first` keeps the very first choice, for when nothing fits anywhere.
    /// In a `panic`, any server not failed fits.
    fn pick_in(
        &self,
        tier: &Tier,
        tier_attempt: usize,
        affinity: &Affinity,
        failed: &[usize],
        panic: bool,
        first: &mut Option<usize>,
    ) -> Option<usize> {
        let picks = tier.members.len().min(MAX_PICKS);
        let loads = TierLoads {
            servers: &self.servers,
            members: &tier.members,
            panic,
        };
        let mut first_up = None;
        for skip in 0..picks {
            let cx = PickContext {
                attempt: tier_attempt + skip,
                client_ip: affinity.client_ip,
                loads: &loads,
                key: affinity.key,
            };
            let index = tier.members[tier.balancer.pick(&cx)?];
            first.get_or_insert(index);
            if failed.contains(&index) {
                continue;
            }
            if panic {
                return Some(index);
            }
            if self.servers[index].share() == 0 {
                continue;
            }
            if self.takes(tier, index, affinity) {
                return Some(index);
            }
            first_up.get_or_insert(index);
        }
        // Only ramping servers came up (random draws can repeat): the next server after the
        // first of them that takes its whole share, if any.
        let ramping = first_up?;
        let (_, from) = self.placement[ramping]?;
        let n = tier.members.len();
        (1..n)
            .map(|k| tier.members[(from + k) % n])
            .find(|&i| !failed.contains(&i) && self.servers[i].share() >= FULL_SHARE)
            .or(Some(ramping))
    }

    /// Whether a server that is up takes this request: while it ramps up, only its share
    /// of the picks of balancers that do not weigh shares themselves: a random share, or for
    /// hashing balancers the same share of keys each time, so that clients do not move back
    /// and forth.
    fn takes(&self, tier: &Tier, index: usize, affinity: &Affinity) -> bool {
        let share = self.servers[index].share();
        if share >= FULL_SHARE {
            return true;
        }
        let draw = match tier.balancer.thinning() {
            Thinning::Weighed => return true,
            Thinning::Random => fastrand::u32(..FULL_SHARE),
            Thinning::ByKey => {
                let key = affinity
                    .key
                    .unwrap_or_else(|| balance::hash(&affinity.client_ip));
                let mixed = (key ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    .wrapping_mul(0xBF58_476D_1CE4_E5B9);
                ((mixed >> 32) % u64::from(FULL_SHARE)) as u32
            }
        };
        draw < share
    }

    /// Where try number `attempt` goes: the pinned server, or a tier and the try's number
    /// within it.
    fn turn(&self, attempt: usize, affinity: &Affinity) -> Turn<'_> {
        // Past the last server, tries start over: a request that found a pooled connection
        // closed may go once more.
        let mut attempt = attempt % self.tries(affinity).max(1);
        if let Some(pinned) = affinity.pinned {
            if attempt == 0 {
                return Turn::Pinned(pinned);
            }
            attempt -= 1;
        }
        let primaries = self.primary.members.len();
        if attempt < primaries {
            Turn::Tier(&self.primary, attempt)
        } else {
            Turn::Tier(&self.backup, attempt - primaries)
        }
    }

    /// Counts a request as in flight to server `index` until the returned guard is dropped.
    pub fn track(self: &Arc<Self>, index: usize) -> InFlight {
        self.servers[index].active.fetch_add(1, Ordering::Relaxed);
        if self.ordered_by_load {
            self.load_changed(index);
        }
        InFlight {
            upstream: self.clone(),
            server: index,
        }
    }

    /// Tells the balancer of each server marked by a replaced upstream (see [`Lineage`]) its
    /// load. Rare: only after a reload, while requests it did not track end.
    #[cold]
    fn rescore_marked(&self) {
        if !self.lineage.rescore.swap(false, Ordering::Acquire) {
            return;
        }
        for (index, server) in self.servers.iter().enumerate() {
            if server.rescore.swap(false, Ordering::Relaxed) {
                self.load_changed(index);
            }
        }
    }

    /// Tells the balancer of the server's tier that its load or share changed.
    fn load_changed(&self, index: usize) {
        if let Some((rank, position)) = self.placement[index] {
            let tier = match rank {
                Rank::Primary => &self.primary,
                Rank::Backup => &self.backup,
            };
            let loads = TierLoads {
                servers: &self.servers,
                members: &tier.members,
                panic: self.panicking.load(Ordering::Relaxed),
            };
            tier.balancer.load_changed(position, &loads);
        }
    }

    /// A connection to server `index` could not be made: it is left alone for
    /// `fail_timeout` (as nginx's `max_fails=1`), so that requests stop paying for it. Not
    /// limited by `max_ejection_percent`: a refused connection is a fact, and a dead server
    /// left in would cost every request that picks it a failed connect.
    pub fn unreachable(&self, index: usize) {
        self.servers[index].count_failed_try();
        if self.fail_timeout.is_zero() {
            return;
        }
        let server = &self.servers[index];
        // A longer ejection for failed requests runs its course (the server was tried
        // anyway, every server being out).
        if server.state.down() == Some(Down::Ejected) {
            return;
        }
        if server.share() != 0 {
            tracing::warn!(upstream = %self.name, server = %server.address, fail_timeout = ?self.fail_timeout, "server marked down");
            server
                .history
                .record(Down::Unreachable.name(), "a connection failed".into());
        }
        if server.state.mark_down(self.fail_timeout, Down::Unreachable) {
            self.unsettled.fetch_add(1, Ordering::Relaxed);
        }
        self.load_changed(index);
        self.refresh_panic();
    }

    /// A connection to server `index` was made: if it was marked unreachable, it is up
    /// again (with every server down, one is tried anyway), and ramps up. A server down
    /// for its checks or ejected stays so: checks and the ejection's end bring it back.
    pub fn reached(&self, index: usize) {
        let server = &self.servers[index];
        if server.share() == 0 && server.state.down() == Some(Down::Unreachable) {
            tracing::info!(upstream = %self.name, server = %server.address, "server reachable again");
            server
                .history
                .record("ramping", "a connection was made".into());
            if server.state.ramp_up(self.slow_start) {
                self.unsettled.fetch_add(1, Ordering::Relaxed);
            }
            self.load_changed(index);
            self.refresh_panic();
        }
    }

    /// Whether one more server may be ejected now, within `max_ejection_percent` of the
    /// servers that take requests.
    fn may_eject(&self, now: u64) -> bool {
        let serving = self.placement.iter().filter(|p| p.is_some()).count();
        let ejected = self
            .servers
            .iter()
            .zip(self.placement.iter())
            .filter(|(s, p)| p.is_some() && s.state.ejected_at(now))
            .count();
        ejected < ejection_cap(serving, self.outlier.max_ejection_percent)
    }

    /// Outlier detection ejects server `index`, unless it is down already or too many are
    /// ejected.
    fn eject(&self, index: usize, why: Trigger) {
        let server = &self.servers[index];
        let now = now_ms();
        if server.share() == 0 {
            return;
        }
        let ejecting = self.ejecting.lock().unwrap_or_else(|e| e.into_inner());
        if !self.may_eject(now) {
            tracing::warn!(upstream = %self.name, server = %server.address, reason = %why, max_ejection_percent = self.outlier.max_ejection_percent, "outlier left in: as many servers as may be are ejected already");
            return;
        }
        let time = server.outlier.eject(now, &self.outlier);
        tracing::warn!(upstream = %self.name, server = %server.address, reason = %why, ejection_time = ?time, "outlier ejected");
        server.history.record(
            Down::Ejected.name(),
            format!("{why}; for {}", humantime::format_duration(time)),
        );
        if server.state.mark_down(time, Down::Ejected) {
            self.unsettled.fetch_add(1, Ordering::Relaxed);
        }
        drop(ejecting);
        self.load_changed(index);
        self.refresh_panic();
    }

    /// The active checks of server `index` failed `fall` times in a row: it takes no
    /// requests until they pass `rise` times.
    pub fn checks_failed(&self, index: usize, why: &str) {
        let server = &self.servers[index];
        tracing::warn!(upstream = %self.name, server = %server.address, reason = %why, "server down: health checks fail");
        server.history.record(Down::Checks.name(), why.to_string());
        if server.state.checks_down() {
            self.unsettled.fetch_add(1, Ordering::Relaxed);
        }
        self.load_changed(index);
        self.refresh_panic();
    }

    /// The active checks of server `index` passed `rise` times in a row: it comes back
    /// through `slow_start` (once an ejection running is over).
    pub fn checks_passed(&self, index: usize, why: &str) {
        let server = &self.servers[index];
        tracing::info!(upstream = %self.name, server = %server.address, reason = %why, slow_start = ?self.slow_start, "server up: health checks pass");
        if server.state.checks_up(self.slow_start) {
            self.unsettled.fetch_add(1, Ordering::Relaxed);
        }
        // Ramping, or up without slow start, or still ejected for a while.
        server
            .history
            .record(server.health_state(), why.to_string());
        self.load_changed(index);
        self.refresh_panic();
    }

    /// Whether requests go to every server, too few being healthy.
    pub fn is_panicking(&self) -> bool {
        self.panicking.load(Ordering::Relaxed)
    }

    /// Enters or leaves the panic, as the share of healthy primaries falls below
    /// `panic_threshold` or climbs back. While a backup is healthy, it takes over instead.
    fn refresh_panic(&self) {
        // Serialized, so that the last change of state is also the last one judged: two
        // callers racing without it could leave the flag as the earlier one saw things.
        let _judging = self.ejecting.lock().unwrap_or_else(|e| e.into_inner());
        let primaries = &self.primary.members;
        let healthy = |i: &&usize| self.servers[**i].share() > 0;
        let up = primaries.iter().filter(healthy).count();
        // A reload that turns the threshold off ends a panic going on.
        let panic = up * 100 < primaries.len() * self.panic_threshold as usize
            && !self.backup.members.iter().any(|i| healthy(&i));
        if self.panicking.swap(panic, Ordering::Relaxed) == panic {
            return;
        }
        if panic {
            tracing::warn!(upstream = %self.name, healthy = up, servers = primaries.len(), panic_threshold = self.panic_threshold, "panic: too few servers healthy, balancing over all of them");
        } else {
            tracing::info!(upstream = %self.name, healthy = up, servers = primaries.len(), "panic over: enough servers healthy");
        }
        for i in 0..self.servers.len() {
            self.load_changed(i);
        }
    }

    /// Brings the shares of servers down or ramping up to date, at most every 10 ms.
    fn settle_now(&self) {
        let now = now_ms();
        let last = self.settled_at.load(Ordering::Relaxed);
        if now < last + 10
            || self
                .settled_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        self.settle(now);
    }

    /// Brings every server's share up to date and counts those still unsettled.
    fn settle(&self, now: u64) {
        let mut unsettled = 0;
        let mut back = false;
        for (index, server) in self.servers.iter().enumerate() {
            let was_down = server.share() == 0;
            match server.state.settle(now, self.slow_start) {
                Settled::Unchanged => {}
                Settled::Changed => {
                    if was_down {
                        server
                            .history
                            .record("ramping", "its time out of rotation is over".into());
                        back = true;
                    }
                    self.load_changed(index)
                }
                Settled::Done => {
                    let why = if was_down {
                        back = true;
                        "its time out of rotation is over"
                    } else {
                        "ramped up to its whole weight"
                    };
                    server.history.record("up", why.into());
                    tracing::info!(upstream = %self.name, server = %server.address, "server takes its whole weight");
                    self.load_changed(index);
                }
            }
            unsettled += usize::from(server.state.is_unsettled());
        }
        self.unsettled.store(unsettled, Ordering::Relaxed);
        if back || unsettled != 0 || self.panicking.load(Ordering::Relaxed) {
            self.refresh_panic();
        }
    }

    /// The server the request's sticky cookie names, if sessions are sticky and that server
    /// is still listed (drained or not) and not disabled.
    pub fn pinned(&self, headers: &HeaderMap) -> Option<usize> {
        self.sticky
            .as_ref()?
            .pinned(headers)
            .filter(|&i| !self.disabled[i])
    }

    /// What became of a request sent to server `index`, for passive outlier detection:
    /// enough errors in a row eject the server (see [`OutlierDetection`]).
    pub fn record_outcome(&self, index: usize, observed: Observed) {
        self.servers[index].count_if_failed(observed);
        if !self.outlier.enabled {
            return;
        }
        if let Some(why) = self.servers[index].outlier.count(observed, &self.outlier) {
            self.eject(index, why);
        }
    }

    /// The `Set-Cookie` value that pins the client to `server`, when sessions are sticky and
    /// the request was not pinned to it already.
    pub fn pin_cookie(&self, affinity: &Affinity, server: &Arc<Server>) -> Option<&HeaderValue> {
        let sticky = self.sticky.as_ref()?;
        if affinity
            .pinned
            .is_some_and(|p| Arc::ptr_eq(&self.servers[p], server))
        {
            return None;
        }
        let index = self.servers.iter().position(|s| Arc::ptr_eq(s, server))?;
        Some(sticky.set_cookie(index))
    }
}

#[cfg(test)]
mod tests;
