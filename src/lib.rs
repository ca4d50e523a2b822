//! Fulcrum: a high-availability HTTP, TCP and UDP load balancer and reverse proxy.
//!
//! # Layout
//! A request travels through the modules in this order:
//! - [`listener`]: accepts connections, within each listener's connection limit.
//! - [`tls`]: on a TLS listener, the handshake (certificate by SNI, protocol by ALPN), the
//!   certificates and their reload; and TLS to servers.
//! - [`transport`]: the connection the HTTP adapters and the upstream client read and write,
//!   plain TCP or TLS, one way while the other.
//! - [`http`]: tells HTTP/1.1 from HTTP/2 on a new connection and hands it to that
//!   protocol's adapter (`http::h1`, `http::h2`); checks each request strictly, and holds
//!   the header policy every protocol shares.
//! - [`proxy`]: the life of one request, written once for every protocol: validate → route
//!   → request filters → pick a server and connect → send and relay → respond and log, over
//!   the adapter traits in `proxy::downstream`; the one HTTP/1.1 upstream client.
//! - [`http1`]: the hand-written HTTP/1.1 codec (heads, body framing, I/O) used by `http::h1`
//!   and by the upstream client.
//! - [`router`]: host, path prefix (and a client certificate's names) → upstream.
//! - [`balance`]: which server of an upstream takes the request.
//! - [`upstream`]: servers, their pools of kept-alive connections and their state (marked
//!   down, ejected, ramping up), and the order in which a request tries them.
//! - [`health`]: active health checks of the servers, once per process.
//!
//! A connection on a `mode = "tcp"` listener goes from [`listener`] to [`l4`] instead:
//! [`proxy_protocol`] (a PROXY header from a trusted proxy in front, and the one sent to
//! servers) → `l4::client_hello` (on a TLS passthrough listener, the SNI and ALPN to route
//! by) → a route, [`balance`] and [`upstream`] as above → `l4::relay`, both ways. A
//! `mode = "udp"` listener's datagrams go to `l4::udp`, one flow per client.
//!
//! Around them:
//! - [`config`]: TOML file → validated config, with errors that name file, line and column.
//! - [`runtime`]: the state built once from a validated config, swapped whole on reload.
//! - [`discovery`]: servers given by host name, resolved by DNS and followed as it changes.
//! - [`server`]: binds the listeners, runs one event loop per worker thread, and shuts down
//!   gracefully.
//! - [`ha`]: the active/standby group: heartbeats, election, reach checks, and the
//!   virtual addresses the active node holds.
//! - [`idle_timeout`]: closes connections on which nothing moves.
//! - [`control`]: the control socket through which `fulcrum reload`, `fulcrum upgrade` and
//!   `fulcrum ha switchover` reach the process started with a config file.
//! - [`admin`]: the admin listener: JSON status and config, run-time server changes, and
//!   Prometheus metrics.
//! - [`logging`]: diagnostics to stderr, the access log to stdout.
//! - [`demo`]: the built-in demo backends behind `fulcrum demo`.
//! - [`cert`]: a local CA for development behind `fulcrum cert`: certificates for servers
//!   and clients, and a description of any certificate file.

pub mod admin;
pub mod balance;
pub mod cert;
pub mod config;
pub mod control;
pub mod demo;
pub mod discovery;
pub mod ha;
pub mod health;
pub mod http;
pub mod http1;
pub mod idle_timeout;
pub mod l4;
pub mod listener;
pub mod logging;
pub mod proxy;
pub mod proxy_protocol;
pub mod router;
pub mod runtime;
pub mod server;
pub mod tls;
pub mod transport;
pub mod upgrade;
pub mod upstream;
