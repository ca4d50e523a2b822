//! Finding an upstream's servers at run time rather than only in the config file: servers
//! given by host name, whose addresses come from DNS.

pub mod dns;
