//! The validated config that the runtime is built from: every value parsed, in range and
//! cross-checked. Holding one of these means the config is good.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    /// Worker threads, each with its own event loop.
    pub workers: usize,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub http2: Http2,
    pub access_log: AccessLogConfig,
    /// How servers given by name are resolved.
    pub dns: DnsConfig,
    /// The admin listener (JSON API and metrics), if there is one.
    pub admin: Option<AdminConfig>,
    /// The control socket `fulcrum reload` and `fulcrum upgrade` talk to: from `[control]`,
    /// or derived from the file's path by [`load`](crate::config::load); none for a config
    /// that is not from a file (the demo).
    pub control: Option<ControlConfig>,
    /// This node's place in an active/standby group sharing virtual addresses, if any.
    pub ha: Option<HaConfig>,
    /// Things that work but deserve a look (a certificate about to expire), each located
    /// and worded like an error.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub max_connections: usize,
    /// Accept a connection only once its first bytes have arrived (Linux `TCP_DEFER_ACCEPT`).
    pub defer_accept: bool,
    pub routes: Vec<RouteConfig>,
    pub tls: Option<ListenerTls>,
    /// Answer every request with a redirect to the same URL over HTTPS, on this port.
    pub redirect_to_https: Option<u16>,
    /// The `Strict-Transport-Security` value added to responses (TLS listeners only).
    pub hsts: Option<http::HeaderValue>,
    /// What the listener speaks: HTTP (`routes`, `tls` and the rest above), or TCP or UDP
    /// relayed whole.
    pub mode: ListenerMode,
    /// Clients (by source address) whose connections must open with a PROXY protocol
    /// header (v1 or v2), whose source address then stands for the client's; a header from
    /// anyone else is refused. Empty: no header is read. TCP and HTTP listeners only.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

/// What a listener speaks.
#[derive(Debug, Clone)]
pub enum ListenerMode {
    /// HTTP/1.1 and HTTP/2 (over TLS when `tls` is set), routed by `routes`.
    Http,
    /// Each TCP connection relayed to a server, byte for byte.
    Tcp(TcpMode),
    /// Each client's datagrams relayed to a server, and its replies back.
    Udp(UdpMode),
}

impl ListenerMode {
    /// As the config names it.
    pub fn name(&self) -> &'static str {
        match self {
            ListenerMode::Http => "http",
            ListenerMode::Tcp(_) => "tcp",
            ListenerMode::Udp(_) => "udp",
        }
    }
}

/// A TCP listener's routes and limits.
#[derive(Debug, Clone)]
pub struct TcpMode {
    /// In config order; the first that matches a connection takes it. A listener's
    /// `upstream` is a last route that matches everything.
    pub routes: Vec<L4Route>,
    /// Connections must open with a TLS ClientHello, which is read (never answered) to
    /// route by and then passed on untouched: some route names `sni` or `alpn`.
    pub tls_passthrough: bool,
    /// A connection on which nothing moves either way for this long is closed.
    pub idle_timeout: Duration,
}

/// Where a TCP connection goes, by what its TLS ClientHello asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L4Route {
    /// Lower-case server names, exact or `*.example.com` (any name ending in
    /// `.example.com`); empty: any name, or none.
    pub sni: Vec<String>,
    /// Protocols of which the client must offer one; empty: whatever it offers.
    pub alpn: Vec<Vec<u8>>,
    /// Index into `Config::upstreams`.
    pub upstream: usize,
}

impl L4Route {
    /// Whether a ClientHello naming `server_name` and offering `alpn` takes this route.
    pub fn matches(&self, server_name: Option<&str>, alpn: &[Vec<u8>]) -> bool {
        let name_fits = self.sni.is_empty()
            || server_name.is_some_and(|name| {
                self.sni
                    .iter()
                    .any(|pattern| match pattern.strip_prefix('*') {
                        Some(suffix) => name.len() > suffix.len() && name.ends_with(suffix),
                        None => pattern == name,
                    })
            });
        let alpn_fits = self.alpn.is_empty() || alpn.iter().any(|p| self.alpn.contains(p));
        name_fits && alpn_fits
    }
}

/// A UDP listener's upstream and flows.
#[derive(Debug, Clone)]
pub struct UdpMode {
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    /// A flow (one client address and port) with no datagram either way for this long is
    /// forgotten.
    pub idle_timeout: Duration,
    /// Flows at once on the listener; a datagram that would start one more is dropped.
    pub max_flows: usize,
    /// Datagrams the server sends in answer to each client datagram (as DNS sends one):
    /// once a flow's server has answered every datagram its client sent, the flow ends at
    /// once rather than at `idle_timeout`. `None`: flows end only by `idle_timeout`.
    pub responses: Option<u32>,
}

/// The PROXY protocol header Fulcrum sends servers that want it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocolVersion {
    /// Text.
    V1,
    /// Binary.
    V2,
}

/// The header a verified client certificate is described in, unless a TLS listener names
/// another (the name Envoy gives it, which servers behind proxies often read already). A
/// client's own copy is removed on every listener.
pub const CLIENT_CERT_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-forwarded-client-cert");

#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// In config order: the first is served when no other matches the client's SNI.
    pub certificates: Vec<CertificateConfig>,
    pub min_version: TlsVersion,
    /// Protocols offered by ALPN, in order of preference.
    pub alpn: Vec<Vec<u8>>,
    pub session_tickets: bool,
    /// Sessions remembered for resumption by id; 0: none.
    pub session_cache: usize,
    pub client_auth: ClientAuth,
    /// Where a verified client certificate's subject and names go to the server; the
    /// client's own copy of this header is always removed.
    pub client_cert_header: http::HeaderName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

#[derive(Clone)]
pub struct CertificateConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ocsp: Option<PathBuf>,
    /// The chain and key as loaded and checked when the config was.
    pub loaded: Arc<crate::tls::certs::Loaded>,
    /// The files (cert, key, OCSP) as they were just before they were loaded, for the
    /// watcher to tell a later change by.
    pub stamps: Vec<(PathBuf, Option<crate::tls::watch::Stamp>)>,
}

impl CertificateConfig {
    /// How `path` (one of this certificate's files) looked when it was loaded.
    pub fn stamp_of(&self, path: &std::path::Path) -> Option<crate::tls::watch::Stamp> {
        self.stamps
            .iter()
            .find(|(p, _)| p == path)
            .and_then(|(_, stamp)| *stamp)
    }
}

impl fmt::Debug for CertificateConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateConfig")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("ocsp", &self.ocsp)
            .field("names", &self.loaded.names)
            .finish()
    }
}

/// Whether clients must show a certificate, and what it is verified against.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    Off,
    Optional(TrustedCa),
    Required(TrustedCa),
}

/// A CA file and the certificates read from it.
#[derive(Debug, Clone)]
pub struct TrustedCa {
    pub path: PathBuf,
    pub certificates: Arc<Vec<rustls::pki_types::CertificateDer<'static>>>,
}

/// TLS from Fulcrum to an upstream's servers.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// `None`: the system's roots.
    pub ca: Option<TrustedCa>,
    /// The name the servers' certificates are checked against and sent as SNI; `None`:
    /// each server's IP address.
    pub server_name: Option<String>,
    /// A certificate Fulcrum shows to servers that ask for one.
    pub client_cert: Option<ClientCertificate>,
    /// Accept any certificate: no protection against a server impersonated on the way.
    pub insecure_skip_verify: bool,
}

#[derive(Clone)]
pub struct ClientCertificate {
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub key: Arc<rustls::pki_types::PrivateKeyDer<'static>>,
}

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientCertificate(..)")
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Lower-case host name without port; `None` matches any host.
    pub host: Option<String>,
    pub path_prefix: String,
    /// Only clients whose verified certificate has one of these names (subject CN, DNS,
    /// URI or email SAN); empty: every client.
    pub client_names: Vec<String>,
    /// Index into `Config::upstreams`.
    pub upstream: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceKind {
    RoundRobin,
    Random,
    IpHash,
    LeastConnections,
    TwoChoices,
    ConsistentHash,
    LeastTime,
}

impl BalanceKind {
    /// Every algorithm by its config name, in the order error messages list them.
    pub const ALL: &'static [(&'static str, BalanceKind)] = &[
        ("round_robin", BalanceKind::RoundRobin),
        ("random", BalanceKind::Random),
        ("ip_hash", BalanceKind::IpHash),
        ("least_connections", BalanceKind::LeastConnections),
        ("two_choices", BalanceKind::TwoChoices),
        ("least_time", BalanceKind::LeastTime),
        ("consistent_hash", BalanceKind::ConsistentHash),
    ];

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, kind)| kind)
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub balance: BalanceKind,
    /// What `consistent_hash` hashes; `None` for the other algorithms.
    pub hash_key: Option<HashKey>,
    /// The cookie that pins a client to the server it first reached, if sessions are sticky.
    pub sticky_cookie: Option<String>,
    /// The config's `sticky_secret`, which keys sticky tokens; `None`: a key drawn at random
    /// once per process.
    pub sticky_secret: Option<StickySecret>,
    /// How fast `least_time` forgets a server's old response times.
    pub latency_decay: Duration,
    /// How long a server that joins (a reload adds or re-enables it) or recovers (its
    /// `fail_timeout` is over) takes to ramp from a small share to its whole weight.
    pub slow_start: Duration,
    /// How long a server that could not be reached is left alone; zero: never.
    pub fail_timeout: Duration,
    pub servers: Vec<ServerConfig>,
    /// Servers given by host name, each standing for every address the name resolves to.
    pub named: Vec<NamedServer>,
    /// Forward the client's Host header (true) or replace it with the server's address.
    pub preserve_host: bool,
    pub pool_max_idle_per_server: usize,
    pub pool_idle_timeout: Duration,
    pub tls: Option<UpstreamTls>,
    /// Retries, their budget and the circuit breaker.
    pub resilience: ResilienceConfig,
    /// Active checks of every server, if configured.
    pub health_check: Option<HealthCheck>,
    /// Passive checks: servers ejected for the errors real requests meet.
    pub outlier_detection: OutlierDetection,
    /// Percent of the primary servers that must be healthy; below it, requests are balanced
    /// over all of them as if all were (0: never).
    pub panic_threshold: u32,
    /// A PROXY protocol header sent at the start of every connection to a server, carrying
    /// the client's address (TCP listeners only: an HTTP listener's pooled connections
    /// carry many clients).
    pub proxy_protocol: Option<ProxyProtocolVersion>,
}

/// How the servers of an upstream are checked, apart from real traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval: Duration,
    /// Less than `interval`.
    pub timeout: Duration,
    /// Up to this much is added at random to each check's time, so that checks of many
    /// servers (and of many Fulcrums) do not fall in step.
    pub jitter: Duration,
    /// Passing checks in a row that bring a down server back.
    pub rise: u32,
    /// Failing checks in a row that take a server down.
    pub fall: u32,
    pub method: http::Method,
    pub path: String,
    /// The Host header; `None`: the server's address.
    pub host: Option<String>,
    /// Status codes that pass, as inclusive ranges.
    pub expect_status: Vec<(u16, u16)>,
    /// Text the start of the response body must contain.
    pub expect_body: Option<String>,
    /// The name a `dns` check asks for (type A); any answer to it passes, whatever its
    /// response code.
    pub query: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// A request whose response must have an expected status (and body).
    Http,
    /// A TCP connection that opens.
    Tcp,
    /// A DNS query over UDP that is answered.
    Dns,
}

/// When real traffic ejects a server, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierDetection {
    pub enabled: bool,
    /// 5xx responses in a row that eject a server (0: never).
    pub consecutive_5xx: u32,
    /// Timeouts and broken connections in a row that eject a server (0: never).
    pub consecutive_failures: u32,
    /// The first ejection's length; each further one is longer by as much.
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    /// Percent of the servers that may be ejected at once; one always may.
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            enabled: true,
            consecutive_5xx: 5,
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

/// How an upstream retries failed requests and limits what it takes on.
#[derive(Debug, Clone, PartialEq)]
pub struct ResilienceConfig {
    /// Tries after the first, each on a server not tried yet.
    pub retries: usize,
    /// How long one try of a request that may be retried waits for the response head;
    /// `None`: `timeouts.upstream_response_header`.
    pub try_timeout: Option<Duration>,
    /// Retries allowed as a percentage of the upstream's recent requests.
    pub retry_budget_percent: u32,
    /// Retries allowed per second whatever the traffic, so that a quiet upstream can retry.
    pub retry_budget_min_per_second: u32,
    /// `None`: no limit on requests in flight.
    pub circuit: Option<CircuitBreaker>,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        ResilienceConfig {
            retries: 2,
            try_timeout: None,
            retry_budget_percent: 20,
            retry_budget_min_per_second: 10,
            circuit: None,
        }
    }
}

/// Requests in flight to an upstream, and waiting for their turn, at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreaker {
    pub max_active_requests: usize,
    /// Requests that wait in line when `max_active_requests` are in flight; more are refused.
    pub max_pending_requests: usize,
    /// How long a request waits in line before it is refused.
    pub queue_timeout: Duration,
}

/// A secret of at least [`StickySecret::MIN_CHARS`] characters, shared by every upstream.
/// Its `Debug` hides it, so that printing a config does not give it away.
#[derive(Clone, PartialEq, Eq)]
pub struct StickySecret(Arc<str>);

impl StickySecret {
    /// As many as 32 hex digits hold: 128 bits, the size of the key made from it.
    pub const MIN_CHARS: usize = 32;

    /// `None` when `text` is too short.
    pub fn new(text: &str) -> Option<Self> {
        (text.chars().count() >= Self::MIN_CHARS).then(|| StickySecret(text.into()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for StickySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StickySecret(..)")
    }
}

/// The part of a request that `consistent_hash` balances on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Path,
    Header(http::HeaderName),
    Cookie(String),
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub address: SocketAddr,
    pub weight: u32,
    /// Used only when no primary server can be reached.
    pub backup: bool,
    /// Takes no new clients: only requests pinned to it by a sticky cookie, and those in flight.
    pub drain: bool,
    /// Takes nothing at all, sticky clients included (HAProxy's maintenance mode): set
    /// through the admin API, never by the file.
    pub disabled: bool,
    /// Connections Fulcrum may hold open to it at once, in use or idle in a pool, over all
    /// workers.
    pub max_connections: usize,
}

/// A server given by host name: at run time, one [`ServerConfig`] with these settings for
/// each address DNS gives for `host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedServer {
    /// `host:port` (the host in lower case), which names it in logs and in what was
    /// resolved.
    pub name: String,
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub backup: bool,
    pub drain: bool,
    pub max_connections: usize,
}

/// How host names of servers are resolved, and how often again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Name servers asked, in order; empty: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Bounds on how long an answer is used before the name is resolved again, whatever
    /// its TTL says; a failed resolution is retried after `min_ttl`.
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// How long one resolution of a name may take, every try included.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub client_header: Duration,
    pub client_idle: Duration,
    pub upstream_connect: Duration,
    pub upstream_response_header: Duration,
    pub upstream_idle: Duration,
    pub shutdown_grace: Duration,
    /// From a TLS client's connection to its finished handshake.
    pub tls_handshake: Duration,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    pub max_body_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Http2 {
    pub max_concurrent_streams: u32,
    pub max_header_list_bytes: u32,
    pub max_pending_resets: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct AccessLogConfig {
    pub enabled: bool,
    pub format: LogFormat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// Where the token was read from, as the config names it.
    pub token_file: Option<PathBuf>,
    /// What state-changing calls must present as `Authorization: Bearer`; `None`: such
    /// calls are refused.
    pub token: Option<AdminToken>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlConfig {
    /// Absolute.
    pub socket: PathBuf,
}

/// The admin API's bearer token. Its `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(Arc<str>);

impl AdminToken {
    /// Short tokens can be guessed over the network.
    pub const MIN_CHARS: usize = 16;

    /// `None` when `text` is too short.
    pub fn new(text: &str) -> Option<Self> {
        (text.chars().count() >= Self::MIN_CHARS).then(|| AdminToken(text.into()))
    }

    /// Whether `presented` is the token, compared in time that does not depend on where
    /// they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// The `[ha]` section: this node of an active/standby group, its peers, and the virtual
/// addresses the active node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaConfig {
    /// This node's name, unique in the group.
    pub node: String,
    /// 1..=254; the highest eligible node should be active.
    pub priority: u8,
    /// Heartbeats of other groups are ignored (like a VRRP router id).
    pub group: u8,
    /// Where heartbeats are received and sent from (UDP).
    pub bind: SocketAddr,
    /// The other nodes' `bind` addresses; heartbeats from anywhere else are dropped.
    pub peers: Vec<SocketAddr>,
    /// The secret heartbeats are authenticated with, read from `key_file`.
    pub key: HaKey,
    pub key_file: PathBuf,
    /// Where the virtual addresses go.
    pub interface: String,
    pub virtual_addresses: Vec<VirtualAddress>,
    pub heartbeat_interval: Duration,
    /// Heartbeats missed in a row after which a peer counts as gone.
    pub dead_after: u32,
    /// Whether a better node takes the role back from an active lesser one.
    pub preempt: bool,
    /// TCP targets of which one must answer for this node to hold the role; empty: none.
    pub reach: Vec<SocketAddr>,
    /// Whether holding the role also needs some upstream server up.
    pub reach_upstreams: bool,
}

impl HaConfig {
    /// How long a peer stays alive without a heartbeat.
    pub fn dead_time(&self) -> Duration {
        self.heartbeat_interval * self.dead_after
    }
}

/// An address with its prefix length, as the interface carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VirtualAddress {
    pub ip: std::net::IpAddr,
    pub prefix: u8,
}

impl fmt::Display for VirtualAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// The group's shared heartbeat key. Its `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct HaKey(Arc<[u8]>);

impl HaKey {
    /// Shorter keys could be guessed by a stranger on the segment.
    pub const MIN_BYTES: usize = 16;

    /// `None` when `bytes` is too short.
    pub fn new(bytes: &[u8]) -> Option<Self> {
        (bytes.len() >= Self::MIN_BYTES).then(|| HaKey(bytes.into()))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for HaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<hidden>")
    }
}
