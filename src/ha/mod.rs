//! The balancer's own redundancy: an active/standby group of Fulcrum nodes sharing
//! virtual addresses.
//!
//! Minimal until the heartbeat/election runner lands: only the OS side of the addresses.

use std::net::IpAddr;

pub mod address;

/// One virtual address with its prefix length, as `[ha] virtual_addresses` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtualAddress {
    pub ip: IpAddr,
    pub prefix: u8,
}
