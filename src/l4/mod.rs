//! L4: connections and datagrams relayed whole, not parsed as HTTP. A TCP connection goes
//! accept → (PROXY header in) → (TLS ClientHello read, for routing by SNI) → route →
//! balance and connect (retrying another server) → (PROXY header out) → relay both ways;
//! a UDP listener keeps one flow per client address, each with its own socket to a server.

pub mod client_hello;
pub mod log;
pub mod relay;
pub mod tcp;
pub mod udp;
