//! The control socket: a Unix socket beside each Fulcrum started with a config file, through
//! which `fulcrum reload`, `fulcrum upgrade` and `fulcrum ha switchover` ask that process to
//! act. One JSON request line in, one JSON reply line out ([`protocol`]).
//!
//! The [`server`] side binds the socket (refusing to start beside a live process that has
//! it), answers `status` itself and passes every other request to the run loop in
//! `main.rs`, where signals are handled too; the [`client`] side is what the commands use.

pub mod client;
pub mod protocol;
pub mod server;

pub use protocol::{Reply, Request, Status};
pub use server::{Control, Requests, bind, serve};
