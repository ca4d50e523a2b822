//! Checking the DNS parts of a config: server addresses given as `host:port` rather than an
//! IP address, and the `[dns]` section that says how such names are resolved. Nothing is
//! resolved here, so `fulcrum check` gives the same answer offline.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use toml::Spanned;

use super::{Checker, DAY, HOUR, MINUTE, MS, file};
use crate::config::model::{DnsConfig, NamedServer};

/// Where a server's `address` points.
pub(super) enum ServerAddress {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

/// The port a name server is asked on when none is given.
const DNS_PORT: u16 = 53;

impl Checker {
    /// An upstream server's `address`: an IP address and port, or a host name and port.
    pub(super) fn server_address(&mut self, value: &Spanned<String>) -> Option<ServerAddress> {
        let text = value.get_ref();
        if text.parse::<SocketAddr>().is_ok() {
            return self.socket_addr(value, "address").map(ServerAddress::Ip);
        }
        let Some((host, port)) = text.rsplit_once(':') else {
            self.error(value.span(), format!("address `{text}` has no port: write it as 127.0.0.1:8080, [::1]:8080 or backend.internal:8080"));
            return None;
        };
        if host.contains(':') || host.starts_with('[') {
            self.error(value.span(), format!("address `{text}` is not an IP address and port: write an IPv6 address in brackets, as [::1]:8080"));
            return None;
        }
        let port = match port.parse::<u16>() {
            Ok(0) | Err(_) => {
                self.error(
                    value.span(),
                    format!("address `{text}` has no valid port: give one from 1 to 65535"),
                );
                return None;
            }
            Ok(port) => port,
        };
        if let Err(why) = check_host_name(host) {
            self.error(
                value.span(),
                format!("address `{text}` is not an IP address or host name and port: {why}"),
            );
            return None;
        }
        Some(ServerAddress::Name {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// Servers given by name, reached over TLS, have certificates for that name rather than
    /// for each of its addresses, which is what they are checked against without a
    /// `server_name`.
    pub(super) fn named_over_tls(
        &mut self,
        upstream: &str,
        named: &[NamedServer],
        tls: Option<&Spanned<file::UpstreamTls>>,
    ) {
        let Some(tls) = tls else { return };
        let settings = tls.get_ref();
        let verifies = !settings
            .insecure_skip_verify
            .as_ref()
            .is_some_and(|skip| *skip.get_ref());
        if let Some(first) = named.first()
            && settings.server_name.is_none()
            && verifies
        {
            self.warn(tls.span(), format!("upstream `{upstream}` reaches {} over TLS without a server_name: each server's certificate is checked against its IP address, not the name; set server_name = \"{}\" (or the name its certificates hold)", first.name, first.host.trim_end_matches('.')));
        }
    }

    pub(super) fn dns(&mut self, dns: &file::Dns) -> DnsConfig {
        let nameservers = match &dns.nameservers {
            None => Vec::new(),
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.error(list.span(), "nameservers is empty: list name servers such as \"127.0.0.1:53\", or leave it out for the system's (/etc/resolv.conf)");
                }
                list.get_ref()
                    .iter()
                    .filter_map(|ns| self.nameserver(ns))
                    .collect()
            }
        };
        let min_ttl = self.duration(
            dns.min_ttl.as_ref(),
            "min_ttl",
            Duration::from_secs(1)..=HOUR,
            Duration::from_secs(5),
        );
        let max_ttl = self.duration(
            dns.max_ttl.as_ref(),
            "max_ttl",
            Duration::from_secs(1)..=DAY,
            Duration::from_secs(300),
        );
        if min_ttl > max_ttl
            && let Some(max) = &dns.max_ttl
        {
            self.error(
                max.span(),
                format!(
                    "max_ttl = \"{}\" is shorter than min_ttl ({})",
                    max.get_ref(),
                    humantime::format_duration(min_ttl)
                ),
            );
        } else if min_ttl > max_ttl
            && let Some(min) = &dns.min_ttl
        {
            self.error(
                min.span(),
                format!(
                    "min_ttl = \"{}\" is longer than max_ttl ({})",
                    min.get_ref(),
                    humantime::format_duration(max_ttl)
                ),
            );
        }
        let timeout = self.duration(
            dns.timeout.as_ref(),
            "timeout",
            10 * MS..=MINUTE,
            Duration::from_secs(5),
        );
        DnsConfig {
            nameservers,
            min_ttl,
            max_ttl: max_ttl.max(min_ttl),
            timeout,
        }
    }

    fn nameserver(&mut self, value: &Spanned<String>) -> Option<SocketAddr> {
        let text = value.get_ref();
        let parsed = text.parse::<SocketAddr>().ok().or_else(|| {
            let ip = text.parse::<IpAddr>().ok()?;
            Some(SocketAddr::new(ip, DNS_PORT))
        });
        match parsed {
            Some(addr) if addr.port() != 0 => Some(addr),
            _ => {
                self.error(value.span(), format!("nameserver `{text}` is not an IP address with an optional port: write it as 10.0.0.2, 127.0.0.1:5353 or [::1]:53"));
                None
            }
        }
    }
}

/// Whether `host` is a DNS host name (RFC 1123 labels; `_` is allowed too, as container
/// and service names use it); a trailing `.` marks it fully qualified.
fn check_host_name(host: &str) -> Result<(), String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Err("the host name is empty".into());
    }
    if name.len() > 253 {
        return Err(format!(
            "the host name has {} characters, more than the 253 DNS allows",
            name.len()
        ));
    }
    // All digits and dots is a mistyped IPv4 address, not a name.
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err("it looks like an IPv4 address but is not one".into());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("the host name has an empty label (`..` or a leading `.`)".into());
        }
        if label.len() > 63 {
            return Err(format!(
                "label `{label}` has {} characters, more than the 63 DNS allows",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(format!(
                "`{c}` cannot be in a host name: use letters, digits, `-`, `_` and `.`"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label `{label}` starts or ends with `-`"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_host_name;

    #[test]
    fn host_names_follow_dns_rules() {
        for good in [
            "backend.internal",
            "localhost",
            "app.test.",
            "my_service",
            "a-1.b-2.example.com",
            "xn--bcher-kva.example",
            "1password.com",
        ] {
            assert!(check_host_name(good).is_ok(), "{good}");
        }
        let long_label = format!("{}.example", "a".repeat(64));
        let long_name = ["abcdefghi"; 26].join(".");
        for bad in [
            "",
            ".",
            "a..b",
            ".a",
            "-a.b",
            "a-.b",
            "back end",
            "ex!mple.com",
            "1.2.3.400",
            "10.0.0",
            "bücher.example",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert!(check_host_name(bad).is_err(), "{bad:?}");
        }
    }
}
