//! Sticky sessions: the cookie that pins a client to a server and the token it carries. A
//! token is a keyed hash of the upstream's name and the server's address, so that without
//! the key nobody can tell which address a token stands for, not even by trying them all.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use http::{HeaderMap, HeaderValue};
use siphasher::sip::SipHasher24;
use siphasher::sip128::SipHasher24 as SipHasher24x128;

use crate::config::{ServerConfig, StickySecret};

/// An upstream's sticky cookie and every server's token, made once per runtime snapshot.
#[derive(Debug)]
pub(super) struct Sticky {
    /// The cookie's name.
    cookie: String,
    /// Per server, the `Set-Cookie` value that pins a client to it.
    set_cookie: Box<[HeaderValue]>,
    /// Token → server index, for every server listed (drained ones finish their sessions).
    by_token: HashMap<u64, usize>,
}

impl Sticky {
    /// Tokens for `servers` of upstream `name`, keyed by `secret`, or without one by a key
    /// drawn once per process: the same across reloads, different after a restart.
    pub(super) fn new(
        cookie: &str,
        name: &str,
        servers: &[ServerConfig],
        secret: Option<&StickySecret>,
    ) -> Sticky {
        let key = secret.map_or_else(process_key, key_from);
        let tokens: Vec<u64> = servers
            .iter()
            .map(|s| token(&key, name, s.address))
            .collect();
        Sticky {
            cookie: cookie.to_string(),
            set_cookie: tokens
                .iter()
                .map(|t| {
                    HeaderValue::from_str(&format!("{cookie}={t:016x}; Path=/; HttpOnly"))
                        .expect("a cookie name and hex are valid")
                })
                .collect(),
            // Drained servers too: their clients' sessions finish there (as nginx's and
            // HAProxy's `drain`), while new clients go elsewhere.
            by_token: tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect(),
        }
    }

    /// The server the request's cookie names, if it is one of ours.
    pub(super) fn pinned(&self, headers: &HeaderMap) -> Option<usize> {
        let token = crate::proxy::cookie(headers, &self.cookie)?;
        self.by_token
            .get(&u64::from_str_radix(token, 16).ok()?)
            .copied()
    }

    /// The `Set-Cookie` value that pins a client to server `index`.
    pub(super) fn set_cookie(&self, index: usize) -> &HeaderValue {
        &self.set_cookie[index]
    }
}

/// The key made from a configured secret: the secret condensed to 128 bits by SipHash-2-4
/// with a 128-bit output under a fixed key. The secret is long and random (it is checked
/// for length), so the key is as hard to guess as the secret.
fn key_from(secret: &StickySecret) -> [u8; 16] {
    SipHasher24x128::new_with_keys(0, 0)
        .hash(secret.as_bytes())
        .as_bytes()
}

/// The key tokens are made with when no secret is configured.
static PROCESS_KEY: OnceLock<[u8; 16]> = OnceLock::new();

/// A key drawn from the operating system's random source the first time it is needed (or
/// handed over by the process this one took over from), and kept for the life of the
/// process, so that pinned clients stay pinned through a reload and a binary upgrade.
pub(crate) fn process_key() -> [u8; 16] {
    *PROCESS_KEY.get_or_init(|| {
        let mut key = [0; 16];
        getrandom::fill(&mut key).expect("the operating system gives random bytes");
        key
    })
}

/// Makes `key`, handed over by the process this one took over from, the process key, so
/// that its cookies stay valid. Returns false if a key was already in use (drawn before the
/// handover was read), which then stays.
pub(crate) fn adopt_process_key(key: [u8; 16]) -> bool {
    PROCESS_KEY.set(key).is_ok()
}

/// A server's token: SipHash-2-4, a keyed pseudorandom function, over the upstream's name
/// (its length first, so that name and address cannot run into each other) and the
/// server's address (its IP's 4 or 16 octets, then the port's 2, big-endian).
fn token(key: &[u8; 16], name: &str, address: SocketAddr) -> u64 {
    let mut bytes = (name.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(name.as_bytes());
    match address.ip() {
        IpAddr::V4(ip) => bytes.extend_from_slice(&ip.octets()),
        IpAddr::V6(ip) => bytes.extend_from_slice(&ip.octets()),
    }
    bytes.extend_from_slice(&address.port().to_be_bytes());
    SipHasher24::new_with_key(key).hash(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> StickySecret {
        StickySecret::new(text).unwrap()
    }

    const ADDRESS: &str = "10.0.0.11:9000";

    #[test]
    fn the_same_secret_gives_the_same_token_in_any_process() {
        let address = ADDRESS.parse().unwrap();
        let key = key_from(&secret("0123456789abcdef0123456789abcdef"));
        // Pinned: a restart, another Fulcrum sharing the secret or a new version must
        // give this token, or every pinned client moves. (A SipHash written apart from
        // this crate, from the paper, gives the same.)
        assert_eq!(token(&key, "app", address), 0xc72d_a30d_efa7_9252);
        assert_eq!(token(&key, "app", address), token(&key, "app", address));
    }

    #[test]
    fn tokens_differ_by_secret_upstream_and_server() {
        let address: SocketAddr = ADDRESS.parse().unwrap();
        let one = key_from(&secret("0123456789abcdef0123456789abcdef"));
        let other = key_from(&secret("0123456789abcdef0123456789abcdeF"));
        let base = token(&one, "app", address);
        assert_ne!(token(&other, "app", address), base);
        assert_ne!(token(&process_key(), "app", address), base);
        assert_ne!(token(&one, "api", address), base);
        assert_ne!(token(&one, "app", "10.0.0.11:9001".parse().unwrap()), base);
        assert_ne!(
            token(&one, "app", "[::ffff:10.0.0.11]:9000".parse().unwrap()),
            base
        );
    }

    #[test]
    fn without_a_secret_the_key_is_random_and_the_same_for_the_whole_process() {
        assert_eq!(process_key(), process_key());
        assert_ne!(process_key(), [0; 16]);
    }

    #[test]
    fn a_token_is_not_the_unkeyed_hash_that_anyone_can_compute() {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let address: SocketAddr = ADDRESS.parse().unwrap();
        // What tokens were before they were keyed.
        let mut unkeyed = DefaultHasher::new();
        ("app", address).hash(&mut unkeyed);
        for key in [process_key(), key_from(&secret(&"s".repeat(32)))] {
            assert_ne!(token(&key, "app", address), unkeyed.finish());
        }
    }
}
