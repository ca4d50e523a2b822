//! The heartbeat datagram the nodes of a group send each other, its authentication
//! (HMAC-SHA256 with the group's key), and the [`Inbox`] that drops what a stranger, a
//! replay or another group sends.
//!
//! Layout (big-endian): magic `FLHA`, version, group, priority, role, flags, sequence (u64),
//! name length (u8), name, then the 32-byte HMAC of everything before it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use aws_lc_rs::hmac;

const MAGIC: &[u8; 4] = b"FLHA";
const VERSION: u8 = 1;
/// Magic, version, group, priority, role, flags, sequence, name length.
const HEAD_BYTES: usize = 4 + 1 + 1 + 1 + 1 + 1 + 8 + 1;
const TAG_BYTES: usize = 32;
/// The flag set while the sender passes its reach checks.
const FLAG_ELIGIBLE: u8 = 1;
/// How often drops from one source are logged at most.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// The role a heartbeat announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WireRole {
    Backup,
    Active,
    /// Active, handing the role over: the best peer should take it now.
    Yielding,
}

impl WireRole {
    fn byte(self) -> u8 {
        match self {
            WireRole::Backup => 0,
            WireRole::Active => 1,
            WireRole::Yielding => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(WireRole::Backup),
            1 => Some(WireRole::Active),
            2 => Some(WireRole::Yielding),
            _ => None,
        }
    }
}

/// One heartbeat, as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub group: u8,
    pub node: String,
    pub priority: u8,
    pub role: WireRole,
    /// Whether the sender passes its reach checks (may hold the role).
    pub eligible: bool,
    /// Greater in every heartbeat a node sends, across restarts too: see [`Sequence`].
    pub sequence: u64,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rejected {
    /// Not a heartbeat of this version (or cut short).
    Malformed,
    /// The HMAC does not match: another key, or altered on the way.
    Unauthenticated,
    /// Authenticated, but of another group.
    OtherGroup,
    /// From an address not in `peers`.
    UnknownPeer,
    /// A sequence number no greater than one already seen from that node.
    Replayed,
    /// Claims to come from this very node (from a configured peer: two nodes named alike,
    /// which the runner treats as fatal).
    OwnName,
}

impl Rejected {
    pub const ALL: [Rejected; 6] = [
        Rejected::Malformed,
        Rejected::Unauthenticated,
        Rejected::OtherGroup,
        Rejected::UnknownPeer,
        Rejected::Replayed,
        Rejected::OwnName,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::Unauthenticated => "unauthenticated",
            Rejected::OtherGroup => "other_group",
            Rejected::UnknownPeer => "unknown_peer",
            Rejected::Replayed => "replayed",
            Rejected::OwnName => "own_name",
        }
    }
}

/// The sequence numbers one process sends: each the greater of one above the last and the
/// wall clock in microseconds, so that they follow time. A peer drops any number not above
/// the greatest it saw from a name; numbers that only counted up from the start would let
/// a second process of the same node (an upgrade's child that failed, a clock stepped
/// back) push that mark ahead of the running process for as long as it has been up.
#[derive(Debug, Default)]
pub struct Sequence {
    last: u64,
}

impl Sequence {
    /// The number for a heartbeat sent at `now_micros` (see [`wall_clock_micros`]).
    pub fn next(&mut self, now_micros: u64) -> u64 {
        self.last = self.last.saturating_add(1).max(now_micros);
        self.last
    }
}

/// Microseconds since the Unix epoch, by the wall clock.
pub fn wall_clock_micros() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
}

/// The group's key, ready to sign and verify with.
pub fn key(bytes: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, bytes)
}

impl Heartbeat {
    /// The datagram, signed with `key`. Names longer than 255 bytes are cut (the config
    /// allows 64).
    pub fn encode(&self, key: &hmac::Key) -> Vec<u8> {
        let name = &self.node.as_bytes()[..self.node.len().min(255)];
        let mut out = Vec::with_capacity(HEAD_BYTES + name.len() + TAG_BYTES);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(self.group);
        out.push(self.priority);
        out.push(self.role.byte());
        out.push(if self.eligible { FLAG_ELIGIBLE } else { 0 });
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        let tag = hmac::sign(key, &out);
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// The heartbeat in `bytes` if it is well formed and signed with `key`. The tag is
    /// checked before anything else is believed.
    pub fn decode(bytes: &[u8], key: &hmac::Key) -> Result<Heartbeat, Rejected> {
        if bytes.len() < HEAD_BYTES + TAG_BYTES || &bytes[..4] != MAGIC || bytes[4] != VERSION {
            return Err(Rejected::Malformed);
        }
        let name_len = bytes[HEAD_BYTES - 1] as usize;
        if bytes.len() != HEAD_BYTES + name_len + TAG_BYTES {
            return Err(Rejected::Malformed);
        }
        let (signed, tag) = bytes.split_at(HEAD_BYTES + name_len);
        hmac::verify(key, signed, tag).map_err(|_| Rejected::Unauthenticated)?;
        let role = WireRole::from_byte(bytes[7]).ok_or(Rejected::Malformed)?;
        let node = std::str::from_utf8(&signed[HEAD_BYTES..])
            .map_err(|_| Rejected::Malformed)?
            .to_string();
        if node.is_empty() {
            return Err(Rejected::Malformed);
        }
        let sequence = u64::from_be_bytes(bytes[9..17].try_into().expect("8 bytes"));
        Ok(Heartbeat {
            group: bytes[5],
            node,
            priority: bytes[6],
            role,
            eligible: bytes[8] & FLAG_ELIGIBLE != 0,
            sequence,
        })
    }
}

/// What a node accepts heartbeats from: its peers' addresses, its group, its key, and
/// sequence numbers above the last one each node sent.
pub struct Inbox {
    key: hmac::Key,
    group: u8,
    node: String,
    peers: Vec<SocketAddr>,
    /// The greatest sequence number seen per node name.
    last_sequence: HashMap<String, u64>,
    /// Drops so far, by reason.
    pub dropped: HashMap<Rejected, u64>,
    /// When a drop from each peer was last logged; strangers share the `None` slot, so
    /// that spoofed sources cannot grow the map.
    last_logged: HashMap<Option<SocketAddr>, Instant>,
}

impl Inbox {
    pub fn new(key: hmac::Key, group: u8, node: &str, peers: &[SocketAddr]) -> Inbox {
        Inbox {
            key,
            group,
            node: node.to_string(),
            peers: peers.to_vec(),
            last_sequence: HashMap::new(),
            dropped: HashMap::new(),
            last_logged: HashMap::new(),
        }
    }

    /// The heartbeat in `bytes` from `from`, or why it was dropped (counted, and logged at
    /// most once a minute per peer).
    pub fn accept(
        &mut self,
        from: SocketAddr,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Heartbeat, Rejected> {
        let outcome = self.check(from, bytes);
        if let Err(reason) = outcome {
            *self.dropped.entry(reason).or_default() += 1;
            let slot = self.peers.contains(&from).then_some(from);
            let due = self
                .last_logged
                .get(&slot)
                .is_none_or(|&at| now.duration_since(at) >= LOG_EVERY);
            if due {
                self.last_logged.insert(slot, now);
                tracing::warn!(%from, reason = reason.name(), "heartbeat dropped (further drops from this source are only counted for a minute)");
            }
        }
        outcome
    }

    fn check(&mut self, from: SocketAddr, bytes: &[u8]) -> Result<Heartbeat, Rejected> {
        if !self.peers.contains(&from) {
            return Err(Rejected::UnknownPeer);
        }
        let heartbeat = Heartbeat::decode(bytes, &self.key)?;
        if heartbeat.group != self.group {
            return Err(Rejected::OtherGroup);
        }
        if heartbeat.node == self.node {
            return Err(Rejected::OwnName);
        }
        let last = self
            .last_sequence
            .entry(heartbeat.node.clone())
            .or_default();
        if heartbeat.sequence <= *last {
            return Err(Rejected::Replayed);
        }
        *last = heartbeat.sequence;
        Ok(heartbeat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Heartbeat {
        Heartbeat {
            group: 51,
            node: "lb2".into(),
            priority: 200,
            role: WireRole::Active,
            eligible: true,
            sequence: 1_700_000_000_000_000,
        }
    }

    fn group_key() -> hmac::Key {
        key(b"0123456789abcdef0123")
    }

    const PEER: &str = "127.0.0.2:7946";

    fn inbox() -> Inbox {
        Inbox::new(group_key(), 51, "lb1", &[PEER.parse().unwrap()])
    }

    #[test]
    fn a_heartbeat_survives_the_round_trip() {
        for role in [WireRole::Backup, WireRole::Active, WireRole::Yielding] {
            for eligible in [false, true] {
                let hb = Heartbeat {
                    role,
                    eligible,
                    ..sample()
                };
                assert_eq!(
                    Heartbeat::decode(&hb.encode(&group_key()), &group_key()),
                    Ok(hb)
                );
            }
        }
    }

    #[test]
    fn another_key_fails_authentication() {
        let bytes = sample().encode(&key(b"another key of the group"));
        assert_eq!(
            Heartbeat::decode(&bytes, &group_key()),
            Err(Rejected::Unauthenticated)
        );
    }

    #[test]
    fn cut_or_padded_datagrams_are_malformed() {
        let bytes = sample().encode(&group_key());
        for len in 0..bytes.len() {
            assert_eq!(
                Heartbeat::decode(&bytes[..len], &group_key()),
                Err(Rejected::Malformed)
            );
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert_eq!(
            Heartbeat::decode(&padded, &group_key()),
            Err(Rejected::Malformed)
        );
    }

    #[test]
    fn the_inbox_takes_growing_sequences_from_peers_only() {
        let mut inbox = inbox();
        let now = Instant::now();
        let peer = PEER.parse().unwrap();
        let hb = sample();
        assert_eq!(
            inbox.accept(peer, &hb.encode(&group_key()), now),
            Ok(hb.clone())
        );
        // The same datagram again, and an older one: replays.
        assert_eq!(
            inbox.accept(peer, &hb.encode(&group_key()), now),
            Err(Rejected::Replayed)
        );
        let older = Heartbeat {
            sequence: hb.sequence - 1,
            ..hb.clone()
        };
        assert_eq!(
            inbox.accept(peer, &older.encode(&group_key()), now),
            Err(Rejected::Replayed)
        );
        let next = Heartbeat {
            sequence: hb.sequence + 1,
            ..hb.clone()
        };
        assert_eq!(
            inbox.accept(peer, &next.encode(&group_key()), now),
            Ok(next)
        );
        let stranger = "127.0.0.3:7946".parse().unwrap();
        let later = Heartbeat {
            sequence: hb.sequence + 2,
            ..hb.clone()
        };
        assert_eq!(
            inbox.accept(stranger, &later.encode(&group_key()), now),
            Err(Rejected::UnknownPeer)
        );
        let other_group = Heartbeat {
            group: 52,
            ..later.clone()
        };
        assert_eq!(
            inbox.accept(peer, &other_group.encode(&group_key()), now),
            Err(Rejected::OtherGroup)
        );
        let mine = Heartbeat {
            node: "lb1".into(),
            ..later
        };
        assert_eq!(
            inbox.accept(peer, &mine.encode(&group_key()), now),
            Err(Rejected::OwnName)
        );
        assert_eq!(inbox.dropped[&Rejected::Replayed], 2);
        assert_eq!(inbox.dropped[&Rejected::UnknownPeer], 1);
        assert_eq!(inbox.dropped[&Rejected::OtherGroup], 1);
    }

    #[test]
    fn a_forged_heartbeat_does_not_advance_the_sequence() {
        let mut inbox = inbox();
        let now = Instant::now();
        let peer = PEER.parse().unwrap();
        let forged = Heartbeat {
            sequence: u64::MAX,
            ..sample()
        };
        assert_eq!(
            inbox.accept(peer, &forged.encode(&key(b"a stranger's own key")), now),
            Err(Rejected::Unauthenticated)
        );
        assert!(
            inbox
                .accept(peer, &sample().encode(&group_key()), now)
                .is_ok()
        );
    }

    #[test]
    fn a_process_started_earlier_is_heard_again_once_it_sends_later_in_time() {
        let mut inbox = inbox();
        let now = Instant::now();
        let peer = PEER.parse().unwrap();
        let started = 1_700_000_000_000_000;
        let mut running = Sequence::default();
        assert!(
            inbox
                .accept(peer, &numbered(running.next(started)), now)
                .is_ok()
        );
        // A second process of the same node, an hour later, sends for a minute.
        let mut second = Sequence::default();
        let hour = 3_600_000_000;
        for tick in 0..1200 {
            let sequence = second.next(started + hour + tick * 50_000);
            assert!(inbox.accept(peer, &numbered(sequence), now).is_ok());
        }
        // Rejected while the running process's numbers are behind the mark...
        let behind = running.next(started + 100);
        assert_eq!(
            inbox.accept(peer, &numbered(behind), now),
            Err(Rejected::Replayed)
        );
        // ...and heard again once it sends later than the second process did.
        let later = running.next(started + hour + 61_000_000);
        assert_eq!(
            inbox
                .accept(peer, &numbered(later), now)
                .map(|h| h.sequence),
            Ok(later)
        );
        // Within one microsecond, the numbers still grow.
        assert_eq!(running.next(started), later + 1);
    }

    fn numbered(sequence: u64) -> Vec<u8> {
        Heartbeat {
            sequence,
            ..sample()
        }
        .encode(&group_key())
    }

    proptest! {
        #[test]
        fn sequences_grow_whatever_the_clock_does(
            clock in proptest::collection::vec(any::<u64>(), 1..50),
        ) {
            let mut sequence = Sequence::default();
            let mut last = 0;
            for now in clock {
                let next = sequence.next(now % (u64::MAX / 2));
                prop_assert!(next > last && next >= now % (u64::MAX / 2));
                last = next;
            }
        }

        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Heartbeat::decode(&bytes, &group_key());
        }

        #[test]
        fn any_single_bit_flip_fails(
            node in "[a-z0-9._-]{1,64}",
            priority in any::<u8>(),
            group in any::<u8>(),
            sequence in any::<u64>(),
            role in 0u8..3,
            eligible in any::<bool>(),
            bit in any::<prop::sample::Index>(),
        ) {
            let hb = Heartbeat {
                group, node, priority, sequence, eligible,
                role: WireRole::from_byte(role).unwrap(),
            };
            let mut bytes = hb.encode(&group_key());
            let bit = bit.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Heartbeat::decode(&bytes, &group_key()).is_err());
        }
    }
}
