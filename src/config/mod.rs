//! Configuration pipeline: TOML text → [`file`] (serde mirror of the file) → [`model`]
//! (validated). Errors carry the file, line and column of what is wrong.

mod admin;
pub mod control;
mod dns;
mod error;
pub mod file;
mod ha;
mod health;
mod l4;
pub mod model;
mod resilience;
mod tls;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

/// Connections to one server at most, unless its entry says otherwise: generous, so that
/// only a runaway (every HTTP/2 stream of a flood opening its own) meets it.
const DEFAULT_SERVER_CONNECTIONS: i64 = 10_000;

pub use error::{ConfigError, Problem};
pub use model::*;

/// Bounds of durations in the config. Timers keep milliseconds, so nothing shorter than one
/// is honoured; the upper bounds are generous for each use but catch a slip of unit
/// (`"30d"` for `"30s"`) and keep deadlines far from overflowing.
const MS: Duration = Duration::from_millis(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::plain(&name, format!("cannot read config file: {e}")))?;
    let mut config = parse(&name, &text)?;
    if config.control.is_none() {
        config.control = Some(ControlConfig {
            socket: control::default_socket(path),
        });
    }
    Ok(config)
}

/// Validates config `text`; `name` is what errors call the file.
pub fn parse(name: &str, text: &str) -> Result<Config, ConfigError> {
    let file: file::File = toml::from_str(text).map_err(|e| {
        let problem = Problem {
            message: e.message().trim_end().to_string(),
            span: e.span(),
        };
        ConfigError::new(name, text, vec![problem])
    })?;
    let mut check = Checker {
        dir: Path::new(name)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    let mut config = check.config(file);
    if check.problems.is_empty() {
        config.warnings = ConfigError::warnings(name, text, check.warnings);
        Ok(config)
    } else {
        Err(ConfigError::new(name, text, check.problems))
    }
}

/// Collects every problem rather than stopping at the first, so one `fulcrum check` shows all.
struct Checker {
    /// The config file's directory, which relative paths in it start from.
    dir: PathBuf,
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Checker {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.problems.push(Problem {
            message: message.into(),
            span: Some(span),
        });
    }

    fn warn(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.warnings.push(Problem {
            message: message.into(),
            span: Some(span),
        });
    }

    fn config(&mut self, file: file::File) -> Config {
        if file.listeners.is_empty() {
            self.problems.push(Problem {
                message: "no listeners: add a [listeners.NAME] table with bind = \"IP:PORT\" and at least one route".into(),
                span: Some(0..0),
            });
        }

        let sticky_secret = self.sticky_secret(
            file.sticky_secret.as_ref(),
            file.sticky_secret_file.as_ref(),
        );
        let mut upstream_index = HashMap::new();
        let mut upstreams = Vec::new();
        let mut upstream_spans = Vec::new();
        for (name, upstream) in file.upstreams {
            self.name(&name, "upstream");
            let upstream = upstream.into_inner();
            upstream_spans.push(l4::UpstreamSpans::of(&upstream));
            let mut up = self.upstream(name.get_ref(), upstream);
            up.sticky_secret = sticky_secret.clone();
            upstream_index.insert(name.into_inner(), upstreams.len());
            upstreams.push(up);
        }

        let mut listeners = Vec::new();
        // TCP (http and tcp listeners) and UDP ports are apart: DNS takes port 53 in both.
        let mut binds: HashMap<SocketAddr, String> = HashMap::new();
        let mut udp_binds: HashMap<SocketAddr, String> = HashMap::new();
        let mut users: Vec<l4::Users> = upstreams.iter().map(|_| l4::Users::default()).collect();
        for (name, listener) in file.listeners {
            self.name(&name, "listener");
            let span = listener.span();
            let mut listener = listener.into_inner();
            let Some(mode_name) = self.mode_name(listener.mode.as_ref()) else {
                continue;
            };
            let bind = self.socket_addr(&listener.bind, "bind");
            let taken = if mode_name == "udp" {
                &mut udp_binds
            } else {
                &mut binds
            };
            if let Some(bind) = bind
                && let Some(other) = taken.insert(bind, name.get_ref().clone())
            {
                self.error(
                    listener.bind.span(),
                    format!(
                        "listener `{}` binds {bind}, which listener `{other}` already binds",
                        name.get_ref()
                    ),
                );
            }
            let max_connections = self.int(
                listener.max_connections.as_ref(),
                "max_connections",
                1,
                10_000_000,
                100_000,
            );
            let proxy_protocol_from = if mode_name == "udp" {
                Vec::new()
            } else {
                self.proxy_protocol_from(listener.proxy_protocol_from.as_ref())
            };
            let defer_accept = listener.defer_accept.as_ref().map(|d| *d.get_ref());
            if mode_name != "http" {
                let Some(mode) = self.l4_mode(
                    name.get_ref(),
                    mode_name,
                    &mut listener,
                    span,
                    &upstream_index,
                ) else {
                    continue;
                };
                let used = match &mode {
                    ListenerMode::Tcp(tcp) => tcp.routes.iter().map(|r| r.upstream).collect(),
                    ListenerMode::Udp(udp) => vec![udp.upstream],
                    ListenerMode::Http => Vec::new(),
                };
                for upstream in used {
                    let users = &mut users[upstream];
                    let slot = match mode {
                        ListenerMode::Udp(_) => &mut users.udp,
                        _ => &mut users.tcp,
                    };
                    slot.get_or_insert_with(|| name.get_ref().clone());
                }
                if let Some(bind) = bind {
                    listeners.push(ListenerConfig {
                        name: name.into_inner(),
                        bind,
                        max_connections: max_connections as usize,
                        // Off by default: many protocols (SMTP, MySQL, SSH) have the server
                        // speak first, and their clients send nothing until it has.
                        defer_accept: defer_accept.unwrap_or(false),
                        routes: Vec::new(),
                        tls: None,
                        redirect_to_https: None,
                        hsts: None,
                        mode,
                        proxy_protocol_from,
                    });
                }
                continue;
            }
            self.no_l4_keys(&listener);
            let tls = listener
                .tls
                .take()
                .map(|tls| self.listener_tls(name.get_ref(), tls))
                .and_then(|tls| tls);
            let redirect_to_https = self.redirect_to_https(&listener, tls.is_some());
            let hsts = self.hsts(listener.hsts.as_ref(), tls.is_some());
            let host_spans: Vec<(String, Range<usize>)> = listener
                .routes
                .iter()
                .filter_map(|r| r.get_ref().host.as_ref())
                .map(|h| (h.get_ref().to_ascii_lowercase(), h.span()))
                .collect();
            let routes = if redirect_to_https.is_some() && listener.routes.is_empty() {
                Vec::new()
            } else {
                let verifies_clients = tls
                    .as_ref()
                    .is_some_and(|t| !matches!(t.client_auth, ClientAuth::Off));
                self.routes(
                    name.get_ref(),
                    listener.routes,
                    span,
                    &upstream_index,
                    verifies_clients,
                )
            };
            for route in &routes {
                users[route.upstream]
                    .http
                    .get_or_insert_with(|| name.get_ref().clone());
            }
            if let Some(tls) = &tls {
                self.hosts_covered(name.get_ref(), tls, &routes, &host_spans);
            }
            if let Some(bind) = bind {
                listeners.push(ListenerConfig {
                    name: name.into_inner(),
                    bind,
                    max_connections: max_connections as usize,
                    defer_accept: defer_accept.unwrap_or(true),
                    routes,
                    tls,
                    redirect_to_https,
                    hsts,
                    mode: ListenerMode::Http,
                    proxy_protocol_from,
                });
            }
        }
        for ((up, spans), users) in upstreams.iter().zip(&upstream_spans).zip(&users) {
            self.l4_upstream(up, spans, users);
        }

        let t = &file.timeouts;
        let timeouts = Timeouts {
            client_header: self.duration(
                t.client_header.as_ref(),
                "client_header",
                MS..=HOUR,
                Duration::from_secs(30),
            ),
            client_idle: self.duration(
                t.client_idle.as_ref(),
                "client_idle",
                MS..=DAY,
                Duration::from_secs(60),
            ),
            upstream_connect: self.duration(
                t.upstream_connect.as_ref(),
                "upstream_connect",
                // The kernel gives up a connect after about two minutes on its own.
                MS..=5 * MINUTE,
                Duration::from_secs(5),
            ),
            upstream_response_header: self.duration(
                t.upstream_response_header.as_ref(),
                "upstream_response_header",
                MS..=DAY,
                Duration::from_secs(60),
            ),
            upstream_idle: self.duration(
                t.upstream_idle.as_ref(),
                "upstream_idle",
                MS..=DAY,
                Duration::from_secs(60),
            ),
            shutdown_grace: self.duration(
                t.shutdown_grace.as_ref(),
                "shutdown_grace",
                MS..=HOUR,
                Duration::from_secs(30),
            ),
            tls_handshake: self.duration(
                t.tls_handshake.as_ref(),
                "tls_handshake",
                MS..=5 * MINUTE,
                Duration::from_secs(10),
            ),
        };
        let l = &file.limits;
        let limits = Limits {
            max_header_bytes: self.int(
                l.max_header_bytes.as_ref(),
                "max_header_bytes",
                8192,
                1 << 20,
                16 * 1024,
            ) as usize,
            max_headers: self.int(l.max_headers.as_ref(), "max_headers", 8, 256, 100) as usize,
            max_uri_bytes: self.int(
                l.max_uri_bytes.as_ref(),
                "max_uri_bytes",
                64,
                65_534,
                8 * 1024,
            ) as usize,
            max_body_bytes: self.int(
                l.max_body_bytes.as_ref(),
                "max_body_bytes",
                0,
                i64::MAX,
                100 << 20,
            ) as u64,
        };
        let h = &file.http2;
        let http2 = Http2 {
            max_concurrent_streams: self.int(
                h.max_concurrent_streams.as_ref(),
                "max_concurrent_streams",
                1,
                10_000,
                100,
            ) as u32,
            max_header_list_bytes: self.int(
                h.max_header_list_bytes.as_ref(),
                "max_header_list_bytes",
                1024,
                1 << 20,
                64 * 1024,
            ) as u32,
            max_pending_resets: self.int(
                h.max_pending_resets.as_ref(),
                "max_pending_resets",
                1,
                10_000,
                50,
            ) as usize,
        };
        let format = match file
            .access_log
            .format
            .as_ref()
            .map(|f| (f.get_ref().as_str(), f.span()))
        {
            None | Some(("text", _)) => LogFormat::Text,
            Some(("json", _)) => LogFormat::Json,
            Some((other, span)) => {
                self.error(
                    span,
                    format!("unknown access log format `{other}`: expected \"text\" or \"json\""),
                );
                LogFormat::Text
            }
        };
        let access_log = AccessLogConfig {
            enabled: file.access_log.enabled.unwrap_or(true),
            format,
        };

        let dns = self.dns(&file.dns);
        let admin = file.admin.map(|admin| self.admin(admin, &binds));
        let control = file.control.and_then(|control| self.control(control));
        let ha = file.ha.and_then(|ha| self.ha(ha, &upstreams));

        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
        let workers = self.int(file.workers.as_ref(), "workers", 1, 1024, cores) as usize;
        Config {
            workers,
            listeners,
            upstreams,
            timeouts,
            limits,
            http2,
            access_log,
            dns,
            admin: admin.flatten(),
            control,
            ha,
            warnings: Vec::new(),
        }
    }

    fn upstream(&mut self, name: &str, up: file::Upstream) -> UpstreamConfig {
        let resilience = self.resilience(&up);
        let balance = match &up.balance {
            None => BalanceKind::RoundRobin,
            Some(b) => match BalanceKind::from_name(b.get_ref()) {
                Some(kind) => kind,
                None => {
                    self.error(
                        b.span(),
                        format!(
                            "unknown balance algorithm `{}`: expected one of {}",
                            b.get_ref(),
                            quoted(&BalanceKind::ALL.iter().map(|(n, _)| *n).collect::<Vec<_>>())
                        ),
                    );
                    BalanceKind::RoundRobin
                }
            },
        };
        if up.servers.get_ref().is_empty() {
            self.error(
                up.servers.span(),
                format!(
                    "upstream `{name}` has no servers: add at least one {{ address = \"IP:PORT\" }}"
                ),
            );
        }
        let mut seen = HashSet::new();
        let mut seen_names = HashSet::new();
        let mut servers = Vec::new();
        let mut named = Vec::new();
        for server in up.servers.into_inner() {
            let server = server.into_inner();
            let weight = self.int(server.weight.as_ref(), "weight", 1, 1000, 1) as u32;
            let max_connections = self.int(
                server.max_connections.as_ref(),
                "max_connections",
                1,
                1_000_000,
                DEFAULT_SERVER_CONNECTIONS,
            ) as usize;
            let (backup, drain) = (
                server.backup.unwrap_or(false),
                server.drain.unwrap_or(false),
            );
            match self.server_address(&server.address) {
                None => {}
                Some(dns::ServerAddress::Ip(address)) => {
                    if !seen.insert(address) {
                        self.error(
                            server.address.span(),
                            format!("server {address} is listed twice in upstream `{name}`"),
                        );
                    }
                    servers.push(ServerConfig {
                        address,
                        weight,
                        backup,
                        drain,
                        disabled: false,
                        max_connections,
                    });
                }
                Some(dns::ServerAddress::Name { host, port }) => {
                    let written = format!("{host}:{port}");
                    if !seen_names.insert(written.clone()) {
                        self.error(
                            server.address.span(),
                            format!("server {written} is listed twice in upstream `{name}`"),
                        );
                    }
                    named.push(NamedServer {
                        name: written,
                        host,
                        port,
                        weight,
                        backup,
                        drain,
                        max_connections,
                    });
                }
            }
        }
        self.named_over_tls(name, &named, up.tls.as_ref());
        let hash_key = self.hash_key(balance, up.hash_key.as_ref());
        let sticky_cookie = up.sticky_cookie.as_ref().and_then(|c| {
            let name = c.get_ref();
            let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid {
                self.error(c.span(), format!("sticky_cookie `{name}` is not a cookie name: use letters, digits, `_` and `-`"));
            }
            valid.then(|| name.clone())
        });
        let latency_decay = self.duration(
            up.latency_decay.as_ref(),
            "latency_decay",
            MS..=HOUR,
            Duration::from_secs(10),
        );
        // 0 turns these off.
        let slow_start = self.duration(
            up.slow_start.as_ref(),
            "slow_start",
            Duration::ZERO..=HOUR,
            Duration::ZERO,
        );
        let fail_timeout = self.duration(
            up.fail_timeout.as_ref(),
            "fail_timeout",
            Duration::ZERO..=HOUR,
            Duration::from_secs(10),
        );
        let health_check = up.health_check.and_then(|c| self.health_check(c));
        let outlier_detection = self.outlier_detection(up.outlier_detection);
        let panic_threshold = self.int(
            up.panic_threshold.as_ref(),
            "panic_threshold",
            0,
            100,
            health::PANIC_THRESHOLD,
        ) as u32;
        UpstreamConfig {
            name: name.to_string(),
            health_check,
            outlier_detection,
            panic_threshold,
            proxy_protocol: self.proxy_protocol(up.proxy_protocol.as_ref()),
            hash_key,
            sticky_cookie,
            sticky_secret: None,
            latency_decay,
            slow_start,
            fail_timeout,
            balance,
            servers,
            named,
            preserve_host: up.preserve_host.unwrap_or(true),
            pool_max_idle_per_server: self.int(
                up.pool_max_idle_per_server.as_ref(),
                "pool_max_idle_per_server",
                0,
                100_000,
                64,
            ) as usize,
            resilience,
            tls: up.tls.map(|tls| self.upstream_tls(tls)).and_then(|tls| tls),
            pool_idle_timeout: self.duration(
                up.pool_idle_timeout.as_ref(),
                "pool_idle_timeout",
                MS..=HOUR,
                Duration::from_secs(60),
            ),
        }
    }

    /// The secret that keys sticky tokens: `sticky_secret`, or the contents of
    /// `sticky_secret_file` (relative to the config's directory, surrounding whitespace
    /// trimmed), not both. The secret itself is never repeated in an error.
    fn sticky_secret(
        &mut self,
        inline: Option<&Spanned<String>>,
        file: Option<&Spanned<String>>,
    ) -> Option<StickySecret> {
        let min = StickySecret::MIN_CHARS;
        match (inline, file) {
            (None, None) => None,
            (Some(_), Some(file)) => {
                self.error(
                    file.span(),
                    "give sticky_secret or sticky_secret_file, not both",
                );
                None
            }
            (Some(secret), None) => {
                let found = StickySecret::new(secret.get_ref());
                if found.is_none() {
                    self.error(secret.span(), format!("sticky_secret has {} characters: it needs at least {min}, such as the output of `openssl rand -hex 32`", secret.get_ref().chars().count()));
                }
                found
            }
            (None, Some(file)) => {
                let path = self.dir.join(file.get_ref());
                let text = match std::fs::read_to_string(&path) {
                    Ok(text) => text,
                    Err(e) => {
                        self.error(
                            file.span(),
                            format!(
                                "sticky_secret_file `{}` cannot be read: {e}",
                                path.display()
                            ),
                        );
                        return None;
                    }
                };
                let found = StickySecret::new(text.trim());
                if found.is_none() {
                    self.error(file.span(), format!("sticky_secret_file `{}` holds {} characters: a secret needs at least {min}, such as the output of `openssl rand -hex 32`", path.display(), text.trim().chars().count()));
                }
                found
            }
        }
    }

    /// `hash_key` goes with `balance = "consistent_hash"` (default: the client's address).
    fn hash_key(&mut self, balance: BalanceKind, key: Option<&Spanned<String>>) -> Option<HashKey> {
        let Some(key) = key else {
            return (balance == BalanceKind::ConsistentHash).then_some(HashKey::ClientIp);
        };
        if balance != BalanceKind::ConsistentHash {
            self.error(
                key.span(),
                "hash_key applies only with balance = \"consistent_hash\"",
            );
            return None;
        }
        let text = key.get_ref();
        let parsed = match text.split_once(':') {
            None if text == "client_ip" => Some(HashKey::ClientIp),
            None if text == "path" => Some(HashKey::Path),
            Some(("header", name)) => http::HeaderName::from_bytes(name.as_bytes())
                .ok()
                .map(HashKey::Header),
            Some(("cookie", name))
                if !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'=' && b != b';') =>
            {
                Some(HashKey::Cookie(name.to_string()))
            }
            _ => None,
        };
        if parsed.is_none() {
            self.error(key.span(), format!("hash_key `{text}` is not a key: use \"client_ip\", \"path\", \"header:NAME\" or \"cookie:NAME\""));
        }
        parsed
    }

    fn routes(
        &mut self,
        listener: &str,
        routes: Vec<Spanned<file::Route>>,
        listener_span: Range<usize>,
        upstreams: &HashMap<String, usize>,
        verifies_clients: bool,
    ) -> Vec<RouteConfig> {
        if routes.is_empty() {
            self.error(listener_span, format!("listener `{listener}` has no routes: add [[listeners.{listener}.routes]] with upstream = \"NAME\""));
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for route in routes {
            let span = route.span();
            let route = route.into_inner();
            let host = route.host.as_ref().and_then(|h| self.host(h));
            let path_prefix = match &route.path_prefix {
                None => "/".to_string(),
                Some(p)
                    if p.get_ref().starts_with('/')
                        && !p
                            .get_ref()
                            .bytes()
                            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) =>
                {
                    p.get_ref().clone()
                }
                Some(p) => {
                    self.error(p.span(), format!("path_prefix `{}` must start with `/` and hold no spaces or control characters", p.get_ref()));
                    continue;
                }
            };
            let upstream = match upstreams.get(route.upstream.get_ref()) {
                Some(&i) => i,
                None => {
                    let mut names: Vec<&str> = upstreams.keys().map(String::as_str).collect();
                    names.sort_unstable();
                    let defined = if names.is_empty() {
                        "none is defined: add an [upstreams.NAME] table".to_string()
                    } else {
                        format!("defined: {}", quoted(&names))
                    };
                    self.error(
                        route.upstream.span(),
                        format!(
                            "route sends to upstream `{}`, which is not defined ({defined})",
                            route.upstream.get_ref()
                        ),
                    );
                    continue;
                }
            };
            let mut client_names = Vec::new();
            if let Some(names) = &route.client_names {
                if !verifies_clients {
                    self.error(names.span(), format!("client_names needs client certificates: set client_auth and client_ca in [listeners.{listener}.tls]"));
                } else if names.get_ref().is_empty() {
                    self.error(names.span(), "client_names is empty: list the certificate names this route takes, or leave it out for every client");
                }
                client_names = names.get_ref().clone();
                client_names.sort();
            }
            if !seen.insert((host.clone(), path_prefix.clone(), client_names.clone())) {
                self.error(span, format!("listener `{listener}` has two routes for host {} and path_prefix `{path_prefix}`", host.as_deref().unwrap_or("(any)")));
            }
            out.push(RouteConfig {
                host,
                path_prefix,
                client_names,
                upstream,
            });
        }
        out
    }

    /// The HTTPS port a listener redirects every request to, if it does.
    fn redirect_to_https(&mut self, listener: &file::Listener, is_tls: bool) -> Option<u16> {
        let on = listener.redirect_to_https.as_ref();
        if let Some(port) = &listener.https_port
            && !on.is_some_and(|on| *on.get_ref())
        {
            self.error(
                port.span(),
                "https_port is only used with redirect_to_https = true",
            );
        }
        let on = on.filter(|on| *on.get_ref())?;
        if is_tls {
            self.error(on.span(), "redirect_to_https on a TLS listener would send clients to itself: set it on the plain HTTP listener");
            return None;
        }
        Some(self.int(listener.https_port.as_ref(), "https_port", 1, 65_535, 443) as u16)
    }

    fn hsts(&mut self, value: Option<&Spanned<String>>, is_tls: bool) -> Option<http::HeaderValue> {
        let value = value?;
        let text = value.get_ref();
        let max_age = text
            .split(';')
            .map(str::trim)
            .filter_map(|d| d.strip_prefix("max-age="))
            .next()
            .is_some_and(|age| !age.is_empty() && age.bytes().all(|b| b.is_ascii_digit()));
        if !is_tls {
            self.error(value.span(), "hsts only takes effect over HTTPS (browsers ignore it on plain HTTP): set it on the TLS listener");
            return None;
        }
        match http::HeaderValue::from_str(text) {
            Ok(header) if max_age => Some(header),
            _ => {
                self.error(value.span(), format!("hsts \"{text}\" is not a Strict-Transport-Security value: write it like \"max-age=31536000; includeSubDomains\""));
                None
            }
        }
    }

    fn host(&mut self, host: &Spanned<String>) -> Option<String> {
        let h = host.get_ref();
        let valid = !h.is_empty()
            && h.len() <= 253
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if valid {
            Some(h.to_ascii_lowercase())
        } else {
            self.error(host.span(), format!("host `{h}` is not a host name: use letters, digits, `-`, `_` and `.`, without port or scheme"));
            None
        }
    }

    fn name(&mut self, name: &Spanned<String>, what: &str) {
        let n = name.get_ref();
        if n.is_empty()
            || !n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            self.error(
                name.span(),
                format!("{what} name `{n}` may hold only letters, digits, `-` and `_`"),
            );
        }
    }

    fn socket_addr(&mut self, value: &Spanned<String>, key: &str) -> Option<SocketAddr> {
        match value.get_ref().parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 || key == "bind" => Some(addr),
            Ok(_) => {
                self.error(
                    value.span(),
                    format!(
                        "{key} `{}` has port 0: give the server's real port",
                        value.get_ref()
                    ),
                );
                None
            }
            Err(_) => {
                self.error(value.span(), format!("{key} `{}` is not an IP address and port: write it as 127.0.0.1:8080 or [::]:8080 (host names are only for upstream servers)", value.get_ref()));
                None
            }
        }
    }

    fn int(
        &mut self,
        value: Option<&Spanned<i64>>,
        key: &str,
        min: i64,
        max: i64,
        default: i64,
    ) -> i64 {
        let Some(value) = value else { return default };
        let v = *value.get_ref();
        if (min..=max).contains(&v) {
            v
        } else {
            self.error(
                value.span(),
                format!("{key} = {v} is out of range: allowed {min} to {max}"),
            );
            default
        }
    }

    /// A duration within `range`; one whose range starts at zero is off at zero.
    fn duration(
        &mut self,
        value: Option<&Spanned<String>>,
        key: &str,
        range: RangeInclusive<Duration>,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else { return default };
        let text = value.get_ref();
        match humantime::parse_duration(text) {
            Ok(d) if range.contains(&d) => d,
            Ok(_) => {
                let min = if range.start().is_zero() {
                    "0s (off)".to_string()
                } else {
                    humantime::format_duration(*range.start()).to_string()
                };
                let max = humantime::format_duration(*range.end());
                self.error(
                    value.span(),
                    format!("{key} = \"{text}\" is out of range: allowed {min} to {max}"),
                );
                default
            }
            Err(e) => {
                self.error(value.span(), format!("{key} = \"{text}\" is not a duration ({e}): write it like \"500ms\", \"30s\" or \"2m\""));
                default
            }
        }
    }
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
