//! Checking the `[ha]` section: this node of an active/standby group, its peers, the shared
//! heartbeat key (read now, so a missing or short one stops the start) and the virtual
//! addresses the active node puts on its interface.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use toml::Spanned;

use super::{Checker, MS, file};
use crate::config::model::{HaConfig, HaKey, UpstreamConfig, VirtualAddress};

/// Node names travel in every heartbeat, behind a one-byte length.
const MAX_NODE_BYTES: usize = 64;
/// Linux's limit on an interface name (`IFNAMSIZ` less the terminating zero).
const MAX_INTERFACE_BYTES: usize = 15;
/// The key shipped in `examples/`, which anyone can read.
const EXAMPLE_KEY: &[u8] = include_bytes!("../../examples/ha.key");

impl Checker {
    pub(super) fn ha(
        &mut self,
        ha: Spanned<file::Ha>,
        upstreams: &[UpstreamConfig],
    ) -> Option<HaConfig> {
        let span = ha.span();
        let ha = ha.into_inner();
        let node = self.ha_node(&ha.node);
        let priority = self.int(ha.priority.as_ref(), "priority", 1, 254, 100) as u8;
        let group = self.int(ha.group.as_ref(), "group", 1, 255, 1) as u8;
        let bind = self.ha_addr(&ha.bind, "bind");
        let peers = self.ha_peers(&ha.peers, bind);
        let key = self.ha_key(&ha.key_file);
        let interface = self.ha_interface(&ha.interface);
        let virtual_addresses = self.virtual_addresses(&ha.virtual_addresses, bind);
        let heartbeat_interval = self.duration(
            ha.heartbeat_interval.as_ref(),
            "heartbeat_interval",
            10 * MS..=Duration::from_secs(10),
            Duration::from_millis(50),
        );
        let dead_after = self.int(ha.dead_after.as_ref(), "dead_after", 2, 100, 3) as u32;
        let mut reach = Vec::new();
        for target in &ha.reach {
            let Some(addr) = self.socket_addr(target, "reach") else {
                continue;
            };
            if reach.contains(&addr) {
                self.error(target.span(), format!("reach lists {addr} twice"));
            }
            reach.push(addr);
        }
        let unkeyed: Vec<&str> = upstreams
            .iter()
            .filter(|u| u.sticky_cookie.is_some() && u.sticky_secret.is_none())
            .map(|u| u.name.as_str())
            .collect();
        if !unkeyed.is_empty() {
            self.warn(
                span.start..span.start,
                format!(
                    "upstream(s) {} set sticky_cookie without sticky_secret: each node draws its own secret, so a client's sticky cookie is worthless after a takeover; set the same sticky_secret_file on every node",
                    super::quoted(&unkeyed)
                ),
            );
        }
        Some(HaConfig {
            node: node?,
            priority,
            group,
            bind: bind?,
            peers: peers?,
            key: key?,
            key_file: self.dir.join(ha.key_file.get_ref()),
            interface: interface?,
            virtual_addresses: virtual_addresses?,
            heartbeat_interval,
            dead_after,
            preempt: ha.preempt.unwrap_or(true),
            reach,
            reach_upstreams: ha.reach_upstreams.unwrap_or(false),
        })
    }

    fn ha_node(&mut self, node: &Spanned<String>) -> Option<String> {
        let name = node.get_ref();
        let valid = !name.is_empty()
            && name.len() <= MAX_NODE_BYTES
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !valid {
            self.error(node.span(), format!("node `{name}` is not a node name: use 1 to {MAX_NODE_BYTES} letters, digits, `-`, `_` and `.`"));
        }
        valid.then(|| name.clone())
    }

    /// A heartbeat address: a specific IP (peers tell heartbeats apart by where they come
    /// from, so the source must be this address) and a real port.
    fn ha_addr(&mut self, value: &Spanned<String>, key: &str) -> Option<SocketAddr> {
        let Ok(addr) = value.get_ref().parse::<SocketAddr>() else {
            self.error(
                value.span(),
                format!(
                    "{key} `{}` is not an IP address and port: write it as 192.0.2.11:7946",
                    value.get_ref()
                ),
            );
            return None;
        };
        if addr.ip().is_unspecified() || addr.ip().is_multicast() || addr.port() == 0 {
            self.error(value.span(), format!("{key} `{addr}` must be one node's own unicast address with a port (not 0.0.0.0, [::], a multicast address or port 0): peers check where heartbeats come from"));
            return None;
        }
        Some(addr)
    }

    fn ha_peers(
        &mut self,
        peers: &Spanned<Vec<Spanned<String>>>,
        bind: Option<SocketAddr>,
    ) -> Option<Vec<SocketAddr>> {
        if peers.get_ref().is_empty() {
            self.error(
                peers.span(),
                "peers is empty: list the other nodes' bind addresses",
            );
            return None;
        }
        let mut out = Vec::new();
        let mut ok = true;
        for peer in peers.get_ref() {
            let Some(addr) = self.ha_addr(peer, "peer") else {
                ok = false;
                continue;
            };
            if out.contains(&addr) {
                self.error(peer.span(), format!("peers lists {addr} twice"));
                ok = false;
            } else if Some(addr) == bind {
                self.error(
                    peer.span(),
                    format!("peer {addr} is this node's own bind address"),
                );
                ok = false;
            } else if let Some(bind) = bind
                && bind.is_ipv4() != addr.is_ipv4()
            {
                self.error(
                    peer.span(),
                    format!("peer {addr} is not of the address family of bind {bind}: heartbeats go out of the one bind socket"),
                );
                ok = false;
            }
            out.push(addr);
        }
        ok.then_some(out)
    }

    /// The key in `key_file` (relative to the config's directory), surrounding ASCII
    /// whitespace trimmed so that a key written by `openssl rand -hex 32 >` works. The key
    /// itself is never repeated in an error.
    fn ha_key(&mut self, key_file: &Spanned<String>) -> Option<HaKey> {
        let path = self.dir.join(key_file.get_ref());
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                self.error(
                    key_file.span(),
                    format!("key_file `{}` cannot be read: {e}", path.display()),
                );
                return None;
            }
        };
        let key = bytes.trim_ascii();
        if key == EXAMPLE_KEY.trim_ascii() {
            self.warn(
                key_file.span(),
                format!("key_file `{}` holds the example key shipped with Fulcrum, which anyone can read and forge heartbeats with: make the group's own with `openssl rand -hex 32 > ha.key` and copy it to every node", path.display()),
            );
        }
        let found = HaKey::new(key);
        if found.is_none() {
            self.error(key_file.span(), format!("key_file `{}` holds {} bytes: a heartbeat key needs at least {}, such as the output of `openssl rand -hex 32` (the same file on every node)", path.display(), key.len(), HaKey::MIN_BYTES));
        }
        found
    }

    fn ha_interface(&mut self, interface: &Spanned<String>) -> Option<String> {
        let name = interface.get_ref();
        let problem = if name.is_empty() {
            Some("is empty".to_string())
        } else if name.len() > MAX_INTERFACE_BYTES {
            Some(format!(
                "is {} bytes long: Linux allows at most {MAX_INTERFACE_BYTES}",
                name.len()
            ))
        } else if name == "." || name == ".." {
            Some("is not an interface name".to_string())
        } else if name
            .bytes()
            .any(|b| b == b'/' || b == b':' || !b.is_ascii_graphic())
        {
            Some("may not hold `/`, `:`, spaces or control characters".to_string())
        } else {
            None
        };
        if let Some(problem) = &problem {
            self.error(interface.span(), format!("interface `{name}` {problem}"));
        }
        problem.is_none().then(|| name.clone())
    }

    /// The addresses, none of them `bind`'s: the node takes virtual addresses off when it
    /// is backup, which would take its own address (and its heartbeats) with them.
    fn virtual_addresses(
        &mut self,
        addresses: &Spanned<Vec<Spanned<String>>>,
        bind: Option<SocketAddr>,
    ) -> Option<Vec<VirtualAddress>> {
        if addresses.get_ref().is_empty() {
            self.error(addresses.span(), "virtual_addresses is empty: list the addresses clients reach the group at, like \"192.0.2.100/24\"");
            return None;
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut ok = true;
        for written in addresses.get_ref() {
            match parse_virtual_address(written.get_ref()) {
                Ok(address) => {
                    if !seen.insert(address.ip) {
                        self.error(
                            written.span(),
                            format!("virtual_addresses lists {} twice", address.ip),
                        );
                        ok = false;
                    } else if bind.is_some_and(|b| b.ip() == address.ip) {
                        self.error(
                            written.span(),
                            format!("virtual address {} is this node's heartbeat bind address: a backup takes the virtual addresses off its interface; give the group an address of its own", address.ip),
                        );
                        ok = false;
                    }
                    out.push(address);
                }
                Err(problem) => {
                    self.error(
                        written.span(),
                        format!("virtual address `{}` {problem}", written.get_ref()),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }
}

/// `IP/PREFIX`, or why not.
fn parse_virtual_address(text: &str) -> Result<VirtualAddress, String> {
    let Some((ip, prefix)) = text.split_once('/') else {
        return Err("has no prefix length: write it as 192.0.2.100/24 or 2001:db8::100/64".into());
    };
    let ip: IpAddr = ip.parse().map_err(|_| {
        "is not an IP address with a prefix length: write it as 192.0.2.100/24 or 2001:db8::100/64"
            .to_string()
    })?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix.parse::<u8>() {
        Ok(p) if p >= 1 && p <= max && prefix.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => return Err(format!("has prefix length `{prefix}`: allowed 1 to {max}")),
    };
    if ip.is_unspecified() || ip.is_multicast() {
        return Err("must be a unicast address".into());
    }
    if let IpAddr::V4(v4) = ip
        && v4.is_broadcast()
    {
        return Err("must be a unicast address".into());
    }
    Ok(VirtualAddress { ip, prefix })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::parse;

    const LISTENER: &str = "[listeners.web]\nbind = \"127.0.0.1:8080\"\n[[listeners.web.routes]]\nupstream = \"app\"\n[upstreams.app]\nservers = [{ address = \"127.0.0.1:9001\" }]\n";

    const HA: &str = r#"[ha]
node = "lb1"
priority = 200
group = 51
bind = "192.0.2.11:7946"
peers = ["192.0.2.12:7946"]
key_file = "ha.key"
interface = "eth0"
virtual_addresses = ["192.0.2.100/24", "2001:db8::100/64"]
"#;

    /// A directory with a good key, a short one, and the config file's name in it.
    struct Dir {
        dir: tempfile::TempDir,
        name: String,
    }

    fn dir() -> Dir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ha.key"), "0123456789abcdef0123\n").unwrap();
        std::fs::write(dir.path().join("short.key"), "  0123456789abcde \n").unwrap();
        let name = dir.path().join("fulcrum.toml").display().to_string();
        Dir { dir, name }
    }

    /// The config with `key = value` lines of `[ha]` replaced (or added), and the
    /// `LINE:COLUMN` where the first changed value starts.
    fn with(changes: &[(&str, &str)]) -> (String, String) {
        let mut lines: Vec<String> = HA.lines().map(str::to_string).collect();
        for (key, value) in changes {
            let line = format!("{key} = {value}");
            match lines
                .iter()
                .position(|l| l.starts_with(&format!("{key} =")))
            {
                Some(at) => lines[at] = line,
                None => lines.push(line),
            }
        }
        let text = format!("{LISTENER}{}\n", lines.join("\n"));
        let position = changes
            .first()
            .map(|(key, value)| {
                let prefix = format!("{key} = ");
                // A list's problem is shown at its item.
                let item = usize::from(value.starts_with("[\""));
                let (index, _) = text
                    .lines()
                    .enumerate()
                    .skip_while(|(_, l)| *l != "[ha]")
                    .find(|(_, l)| l.starts_with(&prefix))
                    .unwrap();
                format!(":{}:{}:", index + 1, prefix.len() + 1 + item)
            })
            .unwrap_or_default();
        (text, position)
    }

    fn error(dir: &Dir, changes: &[(&str, &str)]) -> (String, String) {
        let (text, position) = with(changes);
        let e = parse(&dir.name, &text).unwrap_err().to_string();
        (e, position)
    }

    #[test]
    fn a_good_section_takes_defaults_and_reads_its_key_from_the_configs_directory() {
        let dir = dir();
        let config = parse(&dir.name, &with(&[]).0).unwrap();
        let ha = config.ha.unwrap();
        assert_eq!(ha.node, "lb1");
        assert_eq!((ha.priority, ha.group), (200, 51));
        assert_eq!(ha.peers, vec!["192.0.2.12:7946".parse().unwrap()]);
        assert_eq!(ha.key.bytes(), b"0123456789abcdef0123");
        assert_eq!(format!("{:?}", ha.key), "<hidden>");
        assert_eq!(ha.key_file, Path::new(&dir.dir.path().join("ha.key")));
        assert_eq!(ha.interface, "eth0");
        assert_eq!(
            ha.virtual_addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["192.0.2.100/24", "2001:db8::100/64"]
        );
        assert_eq!(ha.heartbeat_interval, std::time::Duration::from_millis(50));
        assert_eq!(ha.dead_after, 3);
        assert!(ha.preempt);
        assert!(ha.reach.is_empty());
        assert!(!ha.reach_upstreams);
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        assert!(parse(&dir.name, LISTENER).unwrap().ha.is_none());
    }

    #[test]
    fn every_bad_value_is_refused_where_it_is() {
        let dir = dir();
        let cases: &[(&str, &str, &str)] = &[
            ("node", "\"\"", "node `` is not a node name"),
            ("node", "\"lb 1\"", "node `lb 1` is not a node name"),
            (
                "priority",
                "0",
                "priority = 0 is out of range: allowed 1 to 254",
            ),
            (
                "priority",
                "255",
                "priority = 255 is out of range: allowed 1 to 254",
            ),
            ("group", "0", "group = 0 is out of range: allowed 1 to 255"),
            (
                "bind",
                "\"0.0.0.0:7946\"",
                "bind `0.0.0.0:7946` must be one node's own unicast address",
            ),
            (
                "bind",
                "\"192.0.2.11:0\"",
                "bind `192.0.2.11:0` must be one node's own unicast address",
            ),
            (
                "bind",
                "\"lb1:7946\"",
                "bind `lb1:7946` is not an IP address and port",
            ),
            ("peers", "[]", "peers is empty"),
            ("key_file", "\"missing.key\"", "key_file `"),
            (
                "key_file",
                "\"short.key\"",
                "holds 15 bytes: a heartbeat key needs at least 16",
            ),
            ("interface", "\"\"", "interface `` is empty"),
            (
                "interface",
                "\"a-very-long-name0\"",
                "interface `a-very-long-name0` is 17 bytes long: Linux allows at most 15",
            ),
            ("interface", "\"eth0:1\"", "may not hold `/`, `:`"),
            ("virtual_addresses", "[]", "virtual_addresses is empty"),
            (
                "virtual_addresses",
                "[\"192.0.2.100\"]",
                "virtual address `192.0.2.100` has no prefix length",
            ),
            (
                "virtual_addresses",
                "[\"192.0.2.100/33\"]",
                "has prefix length `33`: allowed 1 to 32",
            ),
            (
                "virtual_addresses",
                "[\"2001:db8::1/129\"]",
                "has prefix length `129`: allowed 1 to 128",
            ),
            (
                "virtual_addresses",
                "[\"vip/24\"]",
                "virtual address `vip/24` is not an IP address",
            ),
            (
                "virtual_addresses",
                "[\"224.0.0.1/32\"]",
                "must be a unicast address",
            ),
            (
                "heartbeat_interval",
                "\"5ms\"",
                "heartbeat_interval = \"5ms\" is out of range: allowed 10ms to 10s",
            ),
            ("heartbeat_interval", "\"11s\"", "is out of range"),
            (
                "dead_after",
                "1",
                "dead_after = 1 is out of range: allowed 2 to 100",
            ),
            (
                "reach",
                "[\"192.0.2.1\"]",
                "reach `192.0.2.1` is not an IP address and port",
            ),
            (
                "reach",
                "[\"192.0.2.1:0\"]",
                "reach `192.0.2.1:0` has port 0",
            ),
        ];
        for (key, value, message) in cases {
            let (e, position) = error(&dir, &[(key, value)]);
            assert!(
                e.contains(&position),
                "{key} = {value}: not at {position}: {e}"
            );
            assert!(e.contains(message), "{key} = {value}: {e}");
        }
        let (e, _) = error(&dir, &[("prempt", "true")]);
        assert!(e.contains(":16:1: error: unknown field `prempt`"), "{e}");
    }

    #[test]
    fn peers_must_differ_from_each_other_and_from_bind_and_match_its_family() {
        let dir = dir();
        let (e, _) = error(
            &dir,
            &[("peers", "[\"192.0.2.12:7946\", \"192.0.2.12:7946\"]")],
        );
        assert!(e.contains("peers lists 192.0.2.12:7946 twice"), "{e}");
        let (e, _) = error(&dir, &[("peers", "[\"192.0.2.11:7946\"]")]);
        assert!(
            e.contains("peer 192.0.2.11:7946 is this node's own bind address"),
            "{e}"
        );
        let (e, _) = error(&dir, &[("peers", "[\"[2001:db8::12]:7946\"]")]);
        assert!(e.contains("is not of the address family of bind"), "{e}");
        let (e, _) = error(
            &dir,
            &[(
                "virtual_addresses",
                "[\"192.0.2.100/24\", \"192.0.2.100/32\"]",
            )],
        );
        assert!(
            e.contains("virtual_addresses lists 192.0.2.100 twice"),
            "{e}"
        );
        let (e, _) = error(&dir, &[("reach", "[\"192.0.2.1:80\", \"192.0.2.1:80\"]")]);
        assert!(e.contains("reach lists 192.0.2.1:80 twice"), "{e}");
    }

    #[test]
    fn a_virtual_address_may_not_be_the_bind_address() {
        let dir = dir();
        let (e, position) = error(&dir, &[("virtual_addresses", "[\"192.0.2.11/24\"]")]);
        assert!(e.contains(&position), "not at {position}: {e}");
        assert!(
            e.contains("virtual address 192.0.2.11 is this node's heartbeat bind address"),
            "{e}"
        );
    }

    #[test]
    fn the_example_key_is_warned_about() {
        let dir = dir();
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/ha.key"),
            dir.dir.path().join("example.key"),
        )
        .unwrap();
        let (text, position) = with(&[("key_file", "\"example.key\"")]);
        let config = parse(&dir.name, &text).unwrap();
        assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
        assert!(
            config.warnings[0].contains(&position),
            "{:?}",
            config.warnings
        );
        assert!(
            config.warnings[0].contains("holds the example key shipped with Fulcrum"),
            "{:?}",
            config.warnings
        );
    }

    #[test]
    fn sticky_cookies_without_a_shared_secret_are_warned_about() {
        let dir = dir();
        let text = with(&[]).0.replace(
            "[upstreams.app]\n",
            "[upstreams.app]\nsticky_cookie = \"lb\"\n",
        );
        let config = parse(&dir.name, &text).unwrap();
        assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
        assert!(
            config.warnings[0].contains("`app` set sticky_cookie without sticky_secret"),
            "{:?}",
            config.warnings
        );
        let shared = format!("sticky_secret = \"0123456789abcdef0123456789abcdef\"\n{text}");
        assert!(parse(&dir.name, &shared).unwrap().warnings.is_empty());
    }
}
