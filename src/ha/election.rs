//! Who of the group should be active, decided by each node from what it hears: a pure state
//! machine with time passed in, so every rule is tested without sockets or clocks.
//!
//! Rules: the best eligible node (highest priority, then the name that sorts first) among
//! those alive should be active. A node starts as backup and listens for a dead time before
//! claiming, unless it takes over from the process a binary upgrade replaced on the active
//! node (the addresses on its interface, handed over), when it starts active at once. Without preemption an active peer keeps
//! the role even against a better node; two active nodes that hear each other resolve at
//! once, the lesser stepping down; an active node that fails its reach checks steps down,
//! as does one that cannot put the addresses on (until a claim is tried again) or hears
//! another node under its own name (for good).
//! A planned switchover announces "yielding" until a peer is heard active.

use std::cmp::Reverse;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::heartbeat::{Heartbeat, WireRole};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Backup,
    Active,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Backup => "backup",
            Role::Active => "active",
        }
    }
}

/// Why a node changed role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// No active peer was heard while listening at start (or the addresses were already
    /// here).
    Startup,
    /// The active peer's heartbeats stopped.
    PeerDead,
    /// The active peer handed the role over (a switchover, or its shutdown).
    PeerYielded,
    /// A better node took the role from a lesser one.
    Preempted,
    /// Reach checks failed: this node (or the active peer) may not hold the role.
    LostReach,
    /// Two active nodes heard each other; the lesser stepped down.
    DualActive,
    /// This node handed the role over as asked.
    Switchover,
    /// This node is shutting down.
    Shutdown,
    /// The addresses could not be put on (no privilege, the interface gone).
    ClaimFailed,
    /// A peer sends heartbeats under this node's name: two nodes are configured alike.
    NameConflict,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Startup => "startup",
            Reason::PeerDead => "peer_dead",
            Reason::PeerYielded => "peer_yielded",
            Reason::Preempted => "preempted",
            Reason::LostReach => "lost_reach",
            Reason::DualActive => "dual_active",
            Reason::Switchover => "switchover",
            Reason::Shutdown => "shutdown",
            Reason::ClaimFailed => "claim_failed",
            Reason::NameConflict => "name_conflict",
        }
    }
}

/// A change of role, with why in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: Role,
    pub to: Role,
    pub reason: Reason,
    pub detail: String,
}

/// This node as the election sees it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node: String,
    pub priority: u8,
    pub preempt: bool,
    /// How long a peer counts as alive after its last heartbeat.
    pub dead_time: Duration,
}

/// A peer as last heard.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub name: String,
    pub priority: u8,
    pub role: WireRole,
    pub eligible: bool,
    pub last_heard: Instant,
}

pub struct Election {
    settings: Settings,
    role: Role,
    /// Whether this node passes its reach checks.
    reach: bool,
    /// Why the last claim failed, until it is tried again: no role meanwhile.
    claim_error: Option<String>,
    /// Set for good once a peer is heard under this node's name.
    name_conflict: Option<String>,
    /// A backup claims nothing before this, to hear its peers first.
    listen_until: Instant,
    /// In the order first heard.
    peers: Vec<Peer>,
    /// Set while a planned switchover waits for a peer to take the role.
    yielding_since: Option<Instant>,
    /// Set once this node handed the role over, until it holds it again: it must not take
    /// it back by preemption, or a switchover to a lesser node would undo itself.
    yielded: bool,
    /// How the last switchover ended, until taken.
    switchover_outcome: Option<Result<String, String>>,
    /// The peer last heard active, to tell why the role came to this node.
    last_active_peer: Option<SocketAddr>,
    /// A peer heard as a live backup that now says it is active: it preempted this node,
    /// rather than two actives meeting after a split.
    claimed_from_backup: Option<SocketAddr>,
    /// Set when an active peer stepped down while this node is active: the peer may have
    /// announced the addresses as its own since this node last did, so this node announces
    /// them again.
    reannounce: bool,
}

impl Election {
    /// A node starting now; `held`: the virtual addresses are on the interface, handed over
    /// by the process a binary upgrade replaced. Returns the transition to active when it starts active.
    pub fn new(
        settings: Settings,
        eligible: bool,
        held: bool,
        now: Instant,
    ) -> (Election, Option<Transition>) {
        let mut election = Election {
            listen_until: now + settings.dead_time,
            settings,
            role: Role::Backup,
            reach: eligible,
            claim_error: None,
            name_conflict: None,
            peers: Vec::new(),
            yielding_since: None,
            yielded: false,
            switchover_outcome: None,
            last_active_peer: None,
            claimed_from_backup: None,
            reannounce: false,
        };
        let started = held.then(|| {
            election.change(
                Role::Active,
                Reason::Startup,
                "the virtual addresses are already on the interface (a binary upgrade of the active node)".into(),
            )
        });
        (election, started)
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether this node may hold the role: it passes its reach checks, its last claim did
    /// not fail, and no other node uses its name.
    pub fn eligible(&self) -> bool {
        self.reach && self.claim_error.is_none() && self.name_conflict.is_none()
    }

    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The role this node's heartbeats announce now.
    pub fn wire_role(&self) -> WireRole {
        match (self.role, self.yielding_since) {
            (Role::Backup, _) => WireRole::Backup,
            (Role::Active, None) => WireRole::Active,
            (Role::Active, Some(_)) => WireRole::Yielding,
        }
    }

    pub fn is_alive(&self, peer: &Peer, now: Instant) -> bool {
        now.saturating_duration_since(peer.last_heard) < self.settings.dead_time
    }

    /// A heartbeat from `from`, already authenticated.
    pub fn heard(&mut self, from: SocketAddr, hb: &Heartbeat, now: Instant) -> Option<Transition> {
        let peer = Peer {
            addr: from,
            name: hb.node.clone(),
            priority: hb.priority,
            role: hb.role,
            eligible: hb.eligible,
            last_heard: now,
        };
        let dead_time = self.settings.dead_time;
        match self.peers.iter_mut().find(|p| p.addr == from) {
            Some(known) => {
                let was_live_backup = known.role == WireRole::Backup
                    && now.saturating_duration_since(known.last_heard) < dead_time;
                if was_live_backup && peer.role == WireRole::Active {
                    self.claimed_from_backup = Some(from);
                }
                if self.role == Role::Active
                    && known.role == WireRole::Active
                    && peer.role == WireRole::Backup
                {
                    self.reannounce = true;
                }
                *known = peer;
            }
            None => self.peers.push(peer),
        }
        self.decide(now)
    }

    /// The reach checks' verdict changed (or not).
    pub fn set_eligible(&mut self, eligible: bool, now: Instant) -> Option<Transition> {
        self.reach = eligible;
        self.decide(now)
    }

    /// Putting the addresses on failed: this node may not hold the role (it steps down if
    /// it does) until [`Election::retry_claim`].
    pub fn claim_failed(&mut self, error: String) -> Option<Transition> {
        self.claim_error = Some(error.clone());
        self.bar(Reason::ClaimFailed, error)
    }

    /// Lets the node try claiming again (the election decides at once whether it does).
    pub fn retry_claim(&mut self, now: Instant) -> Option<Transition> {
        self.claim_error = None;
        self.decide(now)
    }

    /// A peer was heard under this node's name: this node gives the role up for good.
    pub fn name_conflict(&mut self, detail: String) -> Option<Transition> {
        self.name_conflict = Some(detail.clone());
        self.bar(Reason::NameConflict, detail)
    }

    fn bar(&mut self, reason: Reason, detail: String) -> Option<Transition> {
        if self.yielding_since.take().is_some() {
            self.switchover_outcome = Some(Err(detail.clone()));
        }
        (self.role == Role::Active).then(|| self.change(Role::Backup, reason, detail))
    }

    /// Time passed: peers may have died, the listening or a switchover may be over.
    pub fn tick(&mut self, now: Instant) -> Option<Transition> {
        self.decide(now)
    }

    /// Starts a planned hand-over: heartbeats say "yielding" until a peer is heard active
    /// (see [`Election::take_switchover_outcome`]).
    pub fn start_switchover(&mut self, now: Instant) -> Result<(), String> {
        self.can_switchover(now)?;
        self.yielding_since = Some(now);
        self.switchover_outcome = None;
        Ok(())
    }

    /// Whether a switchover could start now: this node is active and a peer alive and
    /// eligible could take the role (or why not).
    pub fn can_switchover(&self, now: Instant) -> Result<(), String> {
        if self.role != Role::Active {
            return Err(format!("{} is not active", self.settings.node));
        }
        let takers = self
            .peers
            .iter()
            .filter(|p| p.eligible && self.is_alive(p, now))
            .count();
        if takers == 0 {
            return Err("no peer is alive and eligible to take the role".into());
        }
        Ok(())
    }

    /// When the election should next look again though nothing is heard: a backup at the
    /// end of its listening or when a peer alive now would count as gone, a yielding node
    /// when its switchover runs out. Waking then, rather than at the next heartbeat tick,
    /// takes up to an interval off a takeover.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        match (self.role, self.yielding_since) {
            (Role::Active, Some(since)) => Some(since + self.settings.dead_time),
            (Role::Active, None) => None,
            (Role::Backup, _) => {
                let listening = (now < self.listen_until).then_some(self.listen_until);
                self.peers
                    .iter()
                    .filter(|p| self.is_alive(p, now))
                    .map(|p| p.last_heard + self.settings.dead_time)
                    .chain(listening)
                    .min()
            }
        }
    }

    /// How the last switchover ended (the peer that took the role, or why none did), once.
    pub fn take_switchover_outcome(&mut self) -> Option<Result<String, String>> {
        self.switchover_outcome.take()
    }

    /// Whether this node, active, should announce its addresses again (once).
    pub fn take_reannounce(&mut self) -> bool {
        std::mem::take(&mut self.reannounce) && self.role == Role::Active
    }

    /// This node stops holding the role because it shuts down.
    pub fn leave(&mut self) -> Option<Transition> {
        if self.yielding_since.take().is_some() {
            self.switchover_outcome = Some(Err("this node is shutting down".into()));
        }
        (self.role == Role::Active).then(|| {
            self.change(
                Role::Backup,
                Reason::Shutdown,
                "this node is shutting down".into(),
            )
        })
    }

    fn decide(&mut self, now: Instant) -> Option<Transition> {
        if let Some(active) = self
            .peers
            .iter()
            .find(|p| p.role == WireRole::Active && self.is_alive(p, now))
        {
            self.last_active_peer = Some(active.addr);
        }
        match self.role {
            Role::Active => self.decide_active(now),
            Role::Backup => self.decide_backup(now),
        }
    }

    fn decide_active(&mut self, now: Instant) -> Option<Transition> {
        if !self.eligible() {
            if self.yielding_since.take().is_some() {
                self.switchover_outcome = Some(Err("this node lost reach".into()));
            }
            return Some(self.change(
                Role::Backup,
                Reason::LostReach,
                "reach checks fail: this node may not hold the role".into(),
            ));
        }
        if let Some(since) = self.yielding_since {
            if let Some(taker) = self
                .peers
                .iter()
                .find(|p| p.role == WireRole::Active && self.is_alive(p, now))
            {
                let detail = format!("handed over to {}", describe(taker));
                self.switchover_outcome = Some(Ok(taker.name.clone()));
                self.yielding_since = None;
                self.yielded = true;
                return Some(self.change(Role::Backup, Reason::Switchover, detail));
            }
            if now.saturating_duration_since(since) >= self.settings.dead_time {
                self.yielding_since = None;
                self.switchover_outcome = Some(Err(format!(
                    "no peer took the role within {:?}: {} stays active",
                    self.settings.dead_time, self.settings.node
                )));
            }
            return None;
        }
        let me = self.rank();
        let better = self.peers.iter().find(|p| {
            p.role == WireRole::Active && p.eligible && self.is_alive(p, now) && rank(p) > me
        })?;
        if self.claimed_from_backup == Some(better.addr) {
            let detail = format!("{} ranks higher and took the role", describe(better));
            return Some(self.change(Role::Backup, Reason::Preempted, detail));
        }
        let detail = format!("{} is active too and ranks higher", describe(better));
        Some(self.change(Role::Backup, Reason::DualActive, detail))
    }

    fn decide_backup(&mut self, now: Instant) -> Option<Transition> {
        if !self.eligible() || now < self.listen_until {
            return None;
        }
        let me = self.rank();
        let alive: Vec<&Peer> = self
            .peers
            .iter()
            .filter(|p| self.is_alive(p, now))
            .collect();
        if let Some(active) = alive.iter().find(|p| p.role == WireRole::Active) {
            if self.settings.preempt && !self.yielded && rank(active) < me {
                let detail = format!("{} is active with a lower rank", describe(active));
                return Some(self.change(Role::Active, Reason::Preempted, detail));
            }
            return None;
        }
        // No one holds the role (or its holder is yielding it): the best eligible node that
        // is not yielding takes it.
        let better_taker = alive
            .iter()
            .any(|p| p.eligible && p.role != WireRole::Yielding && rank(p) > me);
        if better_taker {
            return None;
        }
        let (reason, detail) = match self
            .last_active_peer
            .and_then(|addr| self.peers.iter().find(|p| p.addr == addr))
        {
            Some(p) if self.is_alive(p, now) && p.role == WireRole::Yielding => (
                Reason::PeerYielded,
                format!("{} yielded the role", describe(p)),
            ),
            Some(p) if self.is_alive(p, now) && !p.eligible => (
                Reason::LostReach,
                format!("{} lost reach and gave the role up", describe(p)),
            ),
            Some(p) if self.is_alive(p, now) => (
                Reason::PeerYielded,
                format!("{} gave the role up", describe(p)),
            ),
            Some(p) => (
                Reason::PeerDead,
                format!(
                    "{} not heard for {:?}",
                    describe(p),
                    now.saturating_duration_since(p.last_heard)
                ),
            ),
            None => (
                Reason::Startup,
                "no active peer heard, and this node ranks highest of those alive".into(),
            ),
        };
        Some(self.change(Role::Active, reason, detail))
    }

    fn change(&mut self, to: Role, reason: Reason, detail: String) -> Transition {
        let from = std::mem::replace(&mut self.role, to);
        self.claimed_from_backup = None;
        if to == Role::Active {
            self.yielded = false;
        }
        Transition {
            from,
            to,
            reason,
            detail,
        }
    }

    fn rank(&self) -> (u8, Reverse<&str>) {
        (self.settings.priority, Reverse(self.settings.node.as_str()))
    }
}

/// Higher priority first, then the name that sorts first.
fn rank(peer: &Peer) -> (u8, Reverse<&str>) {
    (peer.priority, Reverse(peer.name.as_str()))
}

fn describe(peer: &Peer) -> String {
    format!("{} ({}, priority {})", peer.name, peer.addr, peer.priority)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEAD: Duration = Duration::from_millis(150);
    const HALF: Duration = Duration::from_millis(50);

    struct Node {
        election: Election,
        now: Instant,
        sequence: u64,
    }

    fn peer_addr() -> SocketAddr {
        "127.0.0.2:7946".parse().unwrap()
    }

    fn node(name: &str, priority: u8, preempt: bool, held: bool) -> (Node, Option<Transition>) {
        let now = Instant::now();
        let settings = Settings {
            node: name.into(),
            priority,
            preempt,
            dead_time: DEAD,
        };
        let (election, started) = Election::new(settings, true, held, now);
        (
            Node {
                election,
                now,
                sequence: 0,
            },
            started,
        )
    }

    impl Node {
        fn pass(&mut self, by: Duration) -> Option<Transition> {
            self.now += by;
            self.election.tick(self.now)
        }

        fn hear(&mut self, name: &str, priority: u8, role: WireRole) -> Option<Transition> {
            self.hear_from(name, priority, role, true)
        }

        fn hear_from(
            &mut self,
            name: &str,
            priority: u8,
            role: WireRole,
            eligible: bool,
        ) -> Option<Transition> {
            self.sequence += 1;
            let hb = Heartbeat {
                group: 1,
                node: name.into(),
                priority,
                role,
                eligible,
                sequence: self.sequence,
            };
            self.election.heard(peer_addr(), &hb, self.now)
        }

        /// Heartbeats from a peer every 50 ms for `count` intervals.
        fn hear_for(&mut self, count: usize, name: &str, priority: u8, role: WireRole) {
            for _ in 0..count {
                assert_eq!(self.hear(name, priority, role), None);
                assert_eq!(self.pass(HALF), None);
            }
        }
    }

    fn reason(t: Option<Transition>) -> Option<(Role, Reason)> {
        t.map(|t| (t.to, t.reason))
    }

    #[test]
    fn a_lone_node_claims_after_listening_for_a_dead_time() {
        let (mut n, started) = node("lb1", 100, true, false);
        assert_eq!(started, None);
        assert_eq!(n.pass(HALF), None);
        assert_eq!(n.pass(HALF), None);
        assert_eq!(reason(n.pass(HALF)), Some((Role::Active, Reason::Startup)));
    }

    #[test]
    fn a_node_finding_its_addresses_starts_active_at_once() {
        let (n, started) = node("lb1", 100, true, true);
        assert_eq!(reason(started), Some((Role::Active, Reason::Startup)));
        assert_eq!(n.election.role(), Role::Active);
    }

    #[test]
    fn the_backup_takes_over_once_the_active_peer_is_dead() {
        let (mut n, _) = node("lb2", 100, true, false);
        n.hear_for(6, "lb1", 200, WireRole::Active);
        assert_eq!(n.election.role(), Role::Backup);
        // Silence: alive for the dead time after its last heartbeat, then gone.
        assert_eq!(n.pass(HALF), None);
        let t = n.pass(HALF).expect("takeover");
        assert_eq!((t.to, t.reason), (Role::Active, Reason::PeerDead));
        assert!(t.detail.contains("lb1"), "{}", t.detail);
    }

    #[test]
    fn a_better_backup_preempts_only_with_preempt_on() {
        let (mut on, _) = node("lb1", 200, true, false);
        on.hear_for(2, "lb2", 100, WireRole::Active);
        assert_eq!(
            reason(on.hear("lb2", 100, WireRole::Active)),
            None,
            "still listening"
        );
        assert_eq!(
            reason(on.pass(HALF)),
            Some((Role::Active, Reason::Preempted))
        );

        let (mut off, _) = node("lb1", 200, false, false);
        off.hear_for(10, "lb2", 100, WireRole::Active);
        assert_eq!(off.election.role(), Role::Backup);
    }

    #[test]
    fn of_two_active_nodes_the_lesser_steps_down_whatever_preempt_says() {
        let (mut lesser, _) = node("lb2", 100, false, true);
        assert_eq!(
            reason(lesser.hear("lb1", 200, WireRole::Active)),
            Some((Role::Backup, Reason::DualActive))
        );
        let (mut better, _) = node("lb1", 200, false, true);
        assert_eq!(better.hear("lb2", 100, WireRole::Active), None);
        assert_eq!(better.election.role(), Role::Active);
    }

    #[test]
    fn an_active_node_a_better_backup_takes_the_role_from_says_preempted() {
        let (mut lesser, _) = node("lb2", 100, true, true);
        assert_eq!(lesser.hear("lb1", 200, WireRole::Backup), None);
        assert_eq!(lesser.pass(HALF), None);
        assert_eq!(
            reason(lesser.hear("lb1", 200, WireRole::Active)),
            Some((Role::Backup, Reason::Preempted))
        );
    }

    #[test]
    fn the_node_that_stays_active_announces_again_once_the_other_steps_down() {
        let (mut better, _) = node("lb1", 200, true, true);
        assert_eq!(better.hear("lb2", 100, WireRole::Active), None);
        assert!(!better.election.take_reannounce());
        assert_eq!(better.hear("lb2", 100, WireRole::Backup), None);
        assert!(better.election.take_reannounce());
        assert!(!better.election.take_reannounce(), "once");
        assert_eq!(better.hear("lb2", 100, WireRole::Backup), None);
        assert!(!better.election.take_reannounce());
    }

    #[test]
    fn a_backup_wakes_when_its_listening_ends_and_when_a_peer_would_be_gone() {
        let (mut n, _) = node("lb2", 100, true, false);
        let start = n.now;
        assert_eq!(n.election.next_deadline(n.now), Some(start + DEAD));
        n.pass(HALF);
        n.hear("lb1", 200, WireRole::Active);
        assert_eq!(n.election.next_deadline(n.now), Some(start + DEAD));
        n.pass(DEAD);
        n.hear("lb1", 200, WireRole::Active);
        assert_eq!(n.election.next_deadline(n.now), Some(n.now + DEAD));
        // At that very moment the peer is gone and this node takes over.
        let deadline = n.election.next_deadline(n.now).unwrap();
        n.now = deadline;
        assert_eq!(
            reason(n.election.tick(deadline)),
            Some((Role::Active, Reason::PeerDead))
        );
        assert_eq!(
            n.election.next_deadline(n.now),
            None,
            "active, not yielding"
        );
    }

    #[test]
    fn equal_priorities_resolve_by_name() {
        let (mut b, _) = node("lb-b", 100, true, true);
        assert_eq!(
            reason(b.hear("lb-a", 100, WireRole::Active)),
            Some((Role::Backup, Reason::DualActive))
        );
        let (mut a, _) = node("lb-a", 100, true, true);
        assert_eq!(a.hear("lb-b", 100, WireRole::Active), None);
    }

    #[test]
    fn an_active_node_that_loses_reach_steps_down_and_a_backup_without_it_stays() {
        let (mut n, _) = node("lb1", 200, true, true);
        let t = n.election.set_eligible(false, n.now).unwrap();
        assert_eq!((t.to, t.reason), (Role::Backup, Reason::LostReach));
        // Alone and ineligible: it never claims.
        assert_eq!(n.pass(DEAD * 3), None);
        // Reach back: it claims.
        assert_eq!(
            reason(n.election.set_eligible(true, n.now)),
            Some((Role::Active, Reason::Startup))
        );
    }

    #[test]
    fn a_failed_claim_bars_the_node_until_tried_again() {
        let (mut n, _) = node("lb1", 200, true, true);
        let t = n.election.claim_failed("no CAP_NET_ADMIN".into()).unwrap();
        assert_eq!((t.to, t.reason), (Role::Backup, Reason::ClaimFailed));
        assert_eq!(t.detail, "no CAP_NET_ADMIN");
        assert!(!n.election.eligible());
        assert_eq!(n.pass(DEAD * 3), None, "no claim while barred");
        assert_eq!(
            reason(n.election.retry_claim(n.now)),
            Some((Role::Active, Reason::Startup))
        );
        // A backup's failed claim changes no role, only its eligibility.
        let (mut b, _) = node("lb2", 100, true, false);
        assert_eq!(b.election.claim_failed("gone".into()), None);
        assert!(!b.election.eligible());
    }

    #[test]
    fn a_peer_under_this_nodes_name_bars_it_for_good() {
        let (mut n, _) = node("lb1", 200, true, true);
        let t = n
            .election
            .name_conflict("lb1 heard from 127.0.0.2:7946".into());
        assert_eq!(reason(t), Some((Role::Backup, Reason::NameConflict)));
        assert_eq!(n.election.retry_claim(n.now), None);
        assert_eq!(n.election.set_eligible(true, n.now), None);
        assert_eq!(n.pass(DEAD * 3), None);
        assert!(!n.election.eligible());
    }

    #[test]
    fn the_backup_takes_over_from_an_active_peer_that_lost_reach() {
        let (mut n, _) = node("lb2", 100, true, false);
        n.hear_for(4, "lb1", 200, WireRole::Active);
        assert_eq!(
            reason(n.hear_from("lb1", 200, WireRole::Backup, false)),
            Some((Role::Active, Reason::LostReach))
        );
    }

    #[test]
    fn a_backup_defers_to_a_better_eligible_backup() {
        let (mut n, _) = node("lb2", 100, true, false);
        n.hear_for(4, "lb1", 200, WireRole::Backup);
        assert_eq!(n.election.role(), Role::Backup);
        // The better one cannot hold it: this one takes it.
        assert_eq!(
            reason(n.hear_from("lb1", 200, WireRole::Backup, false)),
            Some((Role::Active, Reason::Startup))
        );
    }

    #[test]
    fn a_switchover_hands_the_role_to_the_peer_and_is_not_undone() {
        let (mut old, _) = node("lb1", 200, true, true);
        assert!(old.election.start_switchover(old.now).is_err(), "no peer");
        old.hear("lb2", 100, WireRole::Backup);
        old.election.start_switchover(old.now).unwrap();
        assert_eq!(old.election.wire_role(), WireRole::Yielding);

        // The peer's side: it takes the role at once on hearing "yielding".
        let (mut new, _) = node("lb2", 100, true, false);
        new.hear_for(4, "lb1", 200, WireRole::Active);
        assert_eq!(
            reason(new.hear("lb1", 200, WireRole::Yielding)),
            Some((Role::Active, Reason::PeerYielded))
        );

        assert_eq!(old.pass(HALF), None, "still yielding");
        assert_eq!(
            reason(old.hear("lb2", 100, WireRole::Active)),
            Some((Role::Backup, Reason::Switchover))
        );
        assert_eq!(
            old.election.take_switchover_outcome(),
            Some(Ok("lb2".into()))
        );
        // Better and preempting, but it yielded: it leaves the role where it sent it.
        old.hear_for(50, "lb2", 100, WireRole::Active);
        assert_eq!(old.election.role(), Role::Backup);
    }

    #[test]
    fn a_switchover_no_peer_takes_fails_and_the_node_stays_active() {
        let (mut n, _) = node("lb1", 200, true, true);
        n.hear("lb2", 100, WireRole::Backup);
        n.election.start_switchover(n.now).unwrap();
        for _ in 0..3 {
            assert_eq!(n.hear("lb2", 100, WireRole::Backup), None);
            assert_eq!(n.pass(HALF), None);
        }
        let outcome = n.election.take_switchover_outcome().unwrap();
        assert!(outcome.unwrap_err().contains("no peer took the role"));
        assert_eq!(n.election.role(), Role::Active);
        assert_eq!(n.election.wire_role(), WireRole::Active);
    }

    #[test]
    fn a_leaving_active_node_steps_down_and_the_peer_takes_over_at_once() {
        let (mut n, _) = node("lb1", 200, true, true);
        assert_eq!(
            reason(n.election.leave()),
            Some((Role::Backup, Reason::Shutdown))
        );
        let (mut peer, _) = node("lb2", 100, true, false);
        peer.hear_for(4, "lb1", 200, WireRole::Active);
        assert_eq!(
            reason(peer.hear("lb1", 200, WireRole::Yielding)),
            Some((Role::Active, Reason::PeerYielded))
        );
    }

    #[test]
    fn a_restarted_better_node_preempts_after_listening() {
        // The lesser node holds the role; the better one comes back and listens first.
        let (mut n, _) = node("lb1", 200, true, false);
        n.hear_for(2, "lb2", 100, WireRole::Active);
        assert_eq!(
            n.hear("lb2", 100, WireRole::Active),
            None,
            "still listening"
        );
        assert_eq!(
            reason(n.pass(HALF)),
            Some((Role::Active, Reason::Preempted))
        );
    }

    /// Two nodes on a simulated link, stepped 10 ms at a time: each heartbeats every 50 ms
    /// (at its own phase), delivered at once while the link is up.
    mod simulated {
        use super::*;
        use proptest::prelude::*;

        const STEP: Duration = Duration::from_millis(10);
        const INTERVAL_STEPS: u32 = 5;

        /// A stretch of time: how many steps, whether the link is up, and whether each
        /// node passes its reach checks.
        type Phase = (u32, bool, bool, bool);

        struct Sim {
            nodes: [Election; 2],
            sequence: u64,
            now: Instant,
            addrs: [SocketAddr; 2],
            /// Steps in a row with both nodes active and the link up.
            split_for: u32,
        }

        impl Sim {
            fn new(preempt: bool) -> Sim {
                let now = Instant::now();
                let make = |node: &str, priority| {
                    let settings = Settings {
                        node: node.into(),
                        priority,
                        preempt,
                        dead_time: DEAD,
                    };
                    Election::new(settings, true, false, now).0
                };
                Sim {
                    nodes: [make("lb1", 200), make("lb2", 100)],
                    sequence: 0,
                    now,
                    addrs: [
                        "127.0.0.1:1".parse().unwrap(),
                        "127.0.0.2:1".parse().unwrap(),
                    ],
                    split_for: 0,
                }
            }

            fn step(&mut self, step: u32, phases: [u32; 2], (_, up, e0, e1): Phase) {
                self.now += STEP;
                self.nodes[0].set_eligible(e0, self.now);
                self.nodes[1].set_eligible(e1, self.now);
                for (i, phase) in phases.into_iter().enumerate() {
                    self.nodes[i].tick(self.now);
                    if step % INTERVAL_STEPS != phase || !up {
                        continue;
                    }
                    self.sequence += 1;
                    let from = &self.nodes[i];
                    let hb = Heartbeat {
                        group: 1,
                        node: from.settings().node.clone(),
                        priority: from.settings().priority,
                        role: from.wire_role(),
                        eligible: from.eligible(),
                        sequence: self.sequence,
                    };
                    let to = 1 - i;
                    self.nodes[to].heard(self.addrs[i], &hb, self.now);
                }
                let split = up && self.actives() == 2;
                self.split_for = if split { self.split_for + 1 } else { 0 };
            }

            fn actives(&self) -> usize {
                self.nodes
                    .iter()
                    .filter(|n| n.role() == Role::Active)
                    .count()
            }
        }

        proptest! {
            #[test]
            fn the_pair_never_stays_split_and_settles_on_one_active(
                preempt in any::<bool>(),
                phases in [0u32..INTERVAL_STEPS, 0u32..INTERVAL_STEPS],
                chaos in proptest::collection::vec(
                    (1u32..60, any::<bool>(), any::<bool>(), any::<bool>()), 0..12),
            ) {
                let mut sim = Sim::new(preempt);
                let calm: Phase = (100, true, true, true);
                let mut step = 0;
                for phase in chaos.iter().chain([&calm]) {
                    for _ in 0..phase.0 {
                        step += 1;
                        sim.step(step, phases, *phase);
                        for n in &sim.nodes {
                            prop_assert!(
                                n.role() == Role::Backup || n.eligible(),
                                "{} active though not eligible", n.settings().node
                            );
                        }
                        // Two actives that can hear each other resolve within a heartbeat.
                        prop_assert!(
                            sim.split_for <= INTERVAL_STEPS,
                            "both active with the link up for {} steps", sim.split_for
                        );
                    }
                }
                prop_assert_eq!(sim.actives(), 1);
                if preempt {
                    prop_assert_eq!(sim.nodes[0].role(), Role::Active, "the better node holds the role");
                }
            }
        }
    }
}
