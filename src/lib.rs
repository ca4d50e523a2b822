//! Fulcrum: a high-availability HTTP load balancer and reverse proxy.
//!
//! # Layout
//! A request travels through the modules in this order:
//! - [`listener`]: accepts connections, within each listener's connection limit.
//! - [`http`]: tells HTTP/1.1 from HTTP/2 on a new connection; checks each request
//!   strictly, and keeps hop-by-hop and forwarding headers right.
//! - [`proxy`]: the phases of one request: validate → route → balance and forward →
//!   respond → log; `proxy::h1` runs them for HTTP/1.1 clients, `proxy::h2` for HTTP/2.
//! - [`http1`]: the hand-written HTTP/1.1 codec (heads, body framing, I/O) under `proxy::h1`.
//! - [`router`]: host and path prefix → upstream.
//! - [`balance`]: which server of an upstream takes the request.
//! - [`upstream`]: servers, their pools of kept-alive connections and their state (marked
//!   down, ramping up), and the order in which a request tries them.
//!
//! Around them:
//! - [`config`]: TOML file → validated config, with errors that name file, line and column.
//! - [`runtime`]: the state built once from a validated config, swapped whole on reload.
//! - [`server`]: binds the listeners, runs one event loop per worker thread, and shuts down
//!   gracefully.
//! - [`idle_timeout`]: closes connections on which nothing moves.
//! - [`logging`]: diagnostics to stderr, the access log to stdout.
//! - [`demo`]: the built-in demo backends behind `fulcrum demo`.

pub mod balance;
pub mod config;
pub mod demo;
pub mod http;
pub mod http1;
pub mod idle_timeout;
pub mod listener;
pub mod logging;
pub mod proxy;
pub mod router;
pub mod runtime;
pub mod server;
pub mod upstream;
