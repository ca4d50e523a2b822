//! The config file as written: serde structs that mirror the TOML one to one, with spans kept
//! so that validation can point at the offending line. Nothing here is checked beyond syntax.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// The whole `fulcrum.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub workers: Option<Spanned<i64>>,
    pub sticky_secret: Option<Spanned<String>>,
    pub sticky_secret_file: Option<Spanned<String>>,
    #[serde(default)]
    pub listeners: BTreeMap<Spanned<String>, Spanned<Listener>>,
    #[serde(default)]
    pub upstreams: BTreeMap<Spanned<String>, Spanned<Upstream>>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub http2: Http2,
    #[serde(default)]
    pub access_log: AccessLog,
    #[serde(default)]
    pub dns: Dns,
    pub admin: Option<Spanned<Admin>>,
    pub control: Option<Spanned<Control>>,
    pub ha: Option<Spanned<Ha>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub bind: Spanned<String>,
    pub max_connections: Option<Spanned<i64>>,
    pub defer_accept: Option<Spanned<bool>>,
    pub tls: Option<Spanned<ListenerTls>>,
    pub redirect_to_https: Option<Spanned<bool>>,
    pub https_port: Option<Spanned<i64>>,
    pub hsts: Option<Spanned<String>>,
    #[serde(default)]
    pub routes: Vec<Spanned<Route>>,
    pub mode: Option<Spanned<String>>,
    pub upstream: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub max_flows: Option<Spanned<i64>>,
    pub responses: Option<Spanned<i64>>,
    pub proxy_protocol_from: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    pub certificates: Spanned<Vec<Spanned<Certificate>>>,
    pub min_version: Option<Spanned<String>>,
    pub alpn: Option<Spanned<Vec<Spanned<String>>>>,
    pub session_tickets: Option<bool>,
    pub session_cache: Option<Spanned<i64>>,
    pub client_auth: Option<Spanned<String>>,
    pub client_ca: Option<Spanned<String>>,
    pub client_cert_header: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub ocsp: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    pub ca: Option<Spanned<String>>,
    pub server_name: Option<Spanned<String>>,
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub insecure_skip_verify: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub host: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    pub client_names: Option<Spanned<Vec<String>>>,
    pub sni: Option<Spanned<Vec<Spanned<String>>>>,
    pub alpn: Option<Spanned<Vec<Spanned<String>>>>,
    pub upstream: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub balance: Option<Spanned<String>>,
    pub hash_key: Option<Spanned<String>>,
    pub servers: Spanned<Vec<Spanned<Server>>>,
    pub preserve_host: Option<bool>,
    pub sticky_cookie: Option<Spanned<String>>,
    pub latency_decay: Option<Spanned<String>>,
    pub slow_start: Option<Spanned<String>>,
    pub fail_timeout: Option<Spanned<String>>,
    pub pool_max_idle_per_server: Option<Spanned<i64>>,
    pub pool_idle_timeout: Option<Spanned<String>>,
    pub tls: Option<Spanned<UpstreamTls>>,
    pub retries: Option<Spanned<i64>>,
    pub try_timeout: Option<Spanned<String>>,
    pub retry_budget: Option<Spanned<i64>>,
    pub retry_budget_min_per_second: Option<Spanned<i64>>,
    pub max_active_requests: Option<Spanned<i64>>,
    pub max_pending_requests: Option<Spanned<i64>>,
    pub queue_timeout: Option<Spanned<String>>,
    pub health_check: Option<Spanned<HealthCheck>>,
    pub outlier_detection: Option<Spanned<OutlierDetection>>,
    pub panic_threshold: Option<Spanned<i64>>,
    pub proxy_protocol: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub kind: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub jitter: Option<Spanned<String>>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
    pub method: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    pub expect_status: Option<Spanned<Vec<Spanned<StatusItem>>>>,
    pub expect_body: Option<Spanned<String>>,
    pub query: Option<Spanned<String>>,
}

/// One entry of `expect_status`: a code (`200`) or a range of codes as text (`"200-399"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StatusItem {
    Code(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    pub enabled: Option<bool>,
    pub consecutive_5xx: Option<Spanned<i64>>,
    pub consecutive_failures: Option<Spanned<i64>>,
    pub base_ejection_time: Option<Spanned<String>>,
    pub max_ejection_time: Option<Spanned<String>>,
    pub max_ejection_percent: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub address: Spanned<String>,
    pub weight: Option<Spanned<i64>>,
    pub backup: Option<bool>,
    pub drain: Option<bool>,
    pub max_connections: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    pub client_header: Option<Spanned<String>>,
    pub client_idle: Option<Spanned<String>>,
    pub upstream_connect: Option<Spanned<String>>,
    pub upstream_response_header: Option<Spanned<String>>,
    pub upstream_idle: Option<Spanned<String>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub tls_handshake: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_header_bytes: Option<Spanned<i64>>,
    pub max_headers: Option<Spanned<i64>>,
    pub max_uri_bytes: Option<Spanned<i64>>,
    pub max_body_bytes: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http2 {
    pub max_concurrent_streams: Option<Spanned<i64>>,
    pub max_header_list_bytes: Option<Spanned<i64>>,
    pub max_pending_resets: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    pub enabled: Option<bool>,
    pub format: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    pub nameservers: Option<Spanned<Vec<Spanned<String>>>>,
    pub min_ttl: Option<Spanned<String>>,
    pub max_ttl: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub bind: Spanned<String>,
    pub token_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    pub socket: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ha {
    pub node: Spanned<String>,
    pub priority: Option<Spanned<i64>>,
    pub group: Option<Spanned<i64>>,
    pub bind: Spanned<String>,
    pub peers: Spanned<Vec<Spanned<String>>>,
    pub key_file: Spanned<String>,
    pub interface: Spanned<String>,
    pub virtual_addresses: Spanned<Vec<Spanned<String>>>,
    pub heartbeat_interval: Option<Spanned<String>>,
    pub dead_after: Option<Spanned<i64>>,
    pub preempt: Option<bool>,
    #[serde(default)]
    pub reach: Vec<Spanned<String>>,
    pub reach_upstreams: Option<bool>,
}
