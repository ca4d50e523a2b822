//! The virtual addresses on one interface: put on it by the active node, taken off by the
//! others. This version runs `ip addr` (iproute2) and announces nothing; the netlink
//! version with gratuitous ARP and unsolicited neighbour advertisements replaces it.

use std::io;
use std::process::Output;

use crate::config::VirtualAddress;

/// The virtual addresses on one interface: put on it (and announced) by the active node,
/// taken off by the others.
pub struct VirtualAddresses {
    interface: String,
    addresses: Vec<VirtualAddress>,
}

impl VirtualAddresses {
    pub async fn open(interface: &str, addresses: &[VirtualAddress]) -> io::Result<Self> {
        let out = ip(&["link", "show", "dev", interface]).await?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "interface `{interface}`: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(VirtualAddresses {
            interface: interface.to_string(),
            addresses: addresses.to_vec(),
        })
    }

    /// Adds every address (already present is fine; IPv6 without DAD).
    pub async fn claim(&self) -> io::Result<()> {
        for address in &self.addresses {
            let text = address.to_string();
            let mut args = vec!["addr", "add", &text, "dev", &self.interface];
            if address.ip.is_ipv6() {
                args.push("nodad");
            }
            let out = ip(&args).await?;
            if !out.status.success() && !stderr(&out).contains("File exists") {
                return Err(failed(&args, &out));
            }
        }
        Ok(())
    }

    /// Removes every address (already absent is fine).
    pub async fn release(&self) -> io::Result<()> {
        for address in &self.addresses {
            let text = address.to_string();
            let args = ["addr", "del", &text, "dev", &self.interface];
            let out = ip(&args).await?;
            if !out.status.success() && !stderr(&out).contains("Cannot assign requested address") {
                return Err(failed(&args, &out));
            }
        }
        Ok(())
    }

    /// Whether every address is on the interface now.
    pub async fn held(&self) -> io::Result<bool> {
        let out = ip(&["-o", "addr", "show", "dev", &self.interface]).await?;
        if !out.status.success() {
            return Err(failed(&["-o", "addr", "show"], &out));
        }
        let listed = String::from_utf8_lossy(&out.stdout).into_owned();
        let on: Vec<&str> = listed
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.find(|w| *w == "inet" || *w == "inet6")?;
                words.next()
            })
            .collect();
        Ok(self
            .addresses
            .iter()
            .all(|a| on.contains(&a.to_string().as_str())))
    }
}

async fn ip(args: &[&str]) -> io::Result<Output> {
    tokio::process::Command::new("ip").args(args).output().await
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn failed(args: &[&str], out: &Output) -> io::Error {
    io::Error::other(format!("ip {}: {}", args.join(" "), stderr(out).trim()))
}
