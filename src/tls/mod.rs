//! TLS: certificates loaded and checked, chosen per client by SNI, and the transport that
//! carries HTTP/1.1 and HTTP/2 over TLS on either side of the proxy.

pub mod certs;
pub mod resolver;
