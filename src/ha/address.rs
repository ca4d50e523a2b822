//! The OS side of the virtual addresses: put on the interface through netlink by the
//! active node and announced to the segment (gratuitous ARP, unsolicited neighbour
//! advertisement) so that clients and switches move to it at once; taken off by the others.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::TryStreamExt;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType};
use rtnetlink::{AddressMessageBuilder, Handle};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::task::AbortHandle;

use crate::config::VirtualAddress;

/// When announcements are sent again after the first, counted from the claim: a frame lost
/// on a busy segment, or a switch port still coming up, must not strand clients.
const REPEATS: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_millis(1000),
];

/// The virtual addresses on one interface: put on it (and announced) by the active node,
/// taken off by the others.
pub struct VirtualAddresses {
    interface: String,
    /// The kernel's index of `interface`, which every netlink request names it by.
    index: u32,
    addresses: Vec<VirtualAddress>,
    netlink: Handle,
    /// The task driving the netlink socket; stopped with `self`.
    connection: AbortHandle,
    announcer: Arc<Announcer>,
    /// The announcements still to repeat after the last claim: a release cancels them, so
    /// a late frame never pulls traffic back to a node that has let the addresses go.
    repeats: Mutex<Option<AbortHandle>>,
}

impl VirtualAddresses {
    /// Looks `interface` up and opens what claiming needs (the netlink connection, and the
    /// raw sockets that announce), so that a missing interface or privilege shows at start
    /// rather than at the first takeover.
    pub async fn open(interface: &str, addresses: &[VirtualAddress]) -> io::Result<Self> {
        let (connection, netlink, _) = rtnetlink::new_connection()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open a netlink socket: {e}")))?;
        let connection = tokio::spawn(connection).abort_handle();
        let opened = async {
            let link = netlink
                .link()
                .get()
                .match_name(interface)
                .execute()
                .try_next()
                .await
                .map_err(|e| netlink_error(format!("interface `{interface}`"), e))?
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("interface `{interface}`: no such interface"),
                    )
                })?;
            let mac = (link.header.link_layer_type == LinkLayerType::Ether)
                .then(|| {
                    link.attributes.iter().find_map(|a| match a {
                        LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(&bytes[..]).ok(),
                        _ => None,
                    })
                })
                .flatten();
            let index = link.header.index;
            Ok((index, Announcer::open(interface, index, mac, addresses)?))
        };
        let (index, announcer) = match opened.await {
            Ok(opened) => opened,
            Err(e) => {
                connection.abort();
                return Err(e);
            }
        };
        Ok(VirtualAddresses {
            interface: interface.to_string(),
            index,
            addresses: addresses.to_vec(),
            netlink,
            connection,
            announcer: Arc::new(announcer),
            repeats: Mutex::new(None),
        })
    }

    /// Adds every address (already present is fine; IPv6 without duplicate address
    /// detection, so it is usable at once), then announces them: gratuitous ARP for IPv4,
    /// unsolicited neighbour advertisement for IPv6, sent at once and repeated a few times
    /// shortly after, without waiting for the repeats. An `Err` after the addresses went on
    /// means the first announcement failed (the addresses stay on; the repeats still run).
    pub async fn claim(&self) -> io::Result<()> {
        for address in &self.addresses {
            let mut request = self
                .netlink
                .address()
                .add(self.index, address.ip, address.prefix);
            if address.ip.is_ipv6() {
                let message = request.message_mut();
                message.header.flags = AddressHeaderFlags::Nodad;
                message
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            match request.execute().await {
                Ok(()) => {}
                Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(netlink_error(self.describe("add", address), e)),
            }
        }
        let announcer = self.announcer.clone();
        let repeats = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for delay in REPEATS {
                tokio::time::sleep_until(start + delay).await;
                if let Err(e) = announcer.send() {
                    tracing::warn!("virtual addresses: a repeated announcement failed: {e}");
                }
            }
        });
        if let Some(previous) = self.repeats.lock().unwrap().replace(repeats.abort_handle()) {
            previous.abort();
        }
        self.announcer.send()
    }

    /// Removes every address (already absent is fine), and cancels announcements still due.
    pub async fn release(&self) -> io::Result<()> {
        if let Some(repeats) = self.repeats.lock().unwrap().take() {
            repeats.abort();
        }
        for address in &self.addresses {
            let message = match address.ip {
                IpAddr::V4(ip) => AddressMessageBuilder::<Ipv4Addr>::new()
                    .index(self.index)
                    .address(ip, address.prefix)
                    .build(),
                IpAddr::V6(ip) => AddressMessageBuilder::<Ipv6Addr>::new()
                    .index(self.index)
                    .address(ip, address.prefix)
                    .build(),
            };
            match self.netlink.address().del(message).execute().await {
                Ok(()) => {}
                Err(e) if netlink_errno(&e) == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => return Err(netlink_error(self.describe("remove", address), e)),
            }
        }
        Ok(())
    }

    /// Whether every address is on the interface now (a process started by a binary
    /// upgrade on the active node finds them there and starts active).
    pub async fn held(&self) -> io::Result<bool> {
        Ok(self.present().await?.len() == self.addresses.len())
    }

    /// Those of the virtual addresses that are on the interface now.
    pub async fn present(&self) -> io::Result<Vec<VirtualAddress>> {
        let present = self.on_interface().await?;
        Ok(self
            .addresses
            .iter()
            .filter(|a| present.contains(a))
            .cloned()
            .collect())
    }

    /// Every address the interface has now, virtual or not.
    async fn on_interface(&self) -> io::Result<Vec<VirtualAddress>> {
        let messages: Vec<AddressMessage> = self
            .netlink
            .address()
            .get()
            .set_link_index_filter(self.index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| {
                netlink_error(format!("interface `{}`: list addresses", self.interface), e)
            })?;
        Ok(messages
            .iter()
            .filter_map(|message| {
                // IFA_LOCAL is the interface's own address where it differs from IFA_ADDRESS
                // (the peer, on point-to-point links); IPv6 usually has only IFA_ADDRESS.
                let local = message.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let address = message.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                Some(VirtualAddress {
                    ip: local.or(address)?,
                    prefix: message.header.prefix_len,
                })
            })
            .collect())
    }

    fn describe(&self, action: &str, address: &VirtualAddress) -> String {
        format!(
            "interface `{}`: {action} {}/{}",
            self.interface, address.ip, address.prefix
        )
    }
}

impl Drop for VirtualAddresses {
    fn drop(&mut self) {
        if let Some(repeats) = self.repeats.lock().unwrap().take() {
            repeats.abort();
        }
        self.connection.abort();
    }
}

/// The raw sockets and the prebuilt frames that announce the addresses.
struct Announcer {
    interface: String,
    index: u32,
    /// An `AF_PACKET` socket and one gratuitous ARP request and reply per IPv4 address.
    arp: Option<(OwnedFd, Vec<[u8; ARP_FRAME_LEN]>)>,
    /// A raw ICMPv6 socket and one neighbour advertisement per IPv6 address.
    neighbour: Option<(Socket, Vec<[u8; ADVERTISEMENT_LEN]>)>,
}

impl Announcer {
    /// Without an Ethernet address (a tunnel, the loopback) there is no neighbour cache to
    /// update and nothing is announced.
    fn open(
        interface: &str,
        index: u32,
        mac: Option<[u8; 6]>,
        addresses: &[VirtualAddress],
    ) -> io::Result<Announcer> {
        let mut announcer = Announcer {
            interface: interface.to_string(),
            index,
            arp: None,
            neighbour: None,
        };
        let Some(mac) = mac else {
            return Ok(announcer);
        };
        let frames: Vec<_> = addresses
            .iter()
            .filter_map(|a| match a.ip {
                IpAddr::V4(ip) => Some([
                    gratuitous_arp(mac, ip, ArpOperation::Request),
                    gratuitous_arp(mac, ip, ArpOperation::Reply),
                ]),
                IpAddr::V6(_) => None,
            })
            .flatten()
            .collect();
        if !frames.is_empty() {
            // Protocol 0: the socket only sends, and receives no copy of the segment's ARP.
            // SAFETY: a plain socket(2) call; the descriptor is owned at once.
            let fd =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                let e = io::Error::last_os_error();
                return Err(os_error(
                    format!(
                        "interface `{interface}`: cannot open a packet socket for gratuitous ARP: {e}"
                    ),
                    &e,
                    NET_RAW,
                ));
            }
            // SAFETY: `fd` is a fresh descriptor owned by nothing else.
            announcer.arp = Some((unsafe { OwnedFd::from_raw_fd(fd) }, frames));
        }
        let advertisements: Vec<_> = addresses
            .iter()
            .filter_map(|a| match a.ip {
                IpAddr::V6(ip) => Some(neighbour_advertisement(mac, ip)),
                IpAddr::V4(_) => None,
            })
            .collect();
        if !advertisements.is_empty() {
            let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
                .and_then(|socket| {
                    // Receivers drop neighbour discovery that crossed a router (RFC 4861 7.1.2).
                    socket.set_multicast_hops_v6(255)?;
                    socket.set_multicast_if_v6(index)?;
                    block_all_incoming(&socket)?;
                    Ok(socket)
                })
                .map_err(|e| {
                    os_error(
                        format!("interface `{interface}`: cannot open an ICMPv6 socket for neighbour advertisements: {e}"),
                        &e,
                        NET_RAW,
                    )
                })?;
            announcer.neighbour = Some((socket, advertisements));
        }
        Ok(announcer)
    }

    fn send(&self) -> io::Result<()> {
        if let Some((socket, frames)) = &self.arp {
            // SAFETY: sockaddr_ll is plain data; zero is a valid value for every field.
            let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            to.sll_family = libc::AF_PACKET as u16;
            to.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
            to.sll_ifindex = self.index as i32;
            to.sll_halen = 6;
            to.sll_addr[..6].copy_from_slice(&BROADCAST);
            for frame in frames {
                // SAFETY: the frame and the address are live for the call, lengths are theirs.
                let sent = unsafe {
                    libc::sendto(
                        socket.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&to as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    )
                };
                if sent < 0 {
                    let e = io::Error::last_os_error();
                    return Err(os_error(
                        format!(
                            "interface `{}`: cannot send a gratuitous ARP: {e}",
                            self.interface
                        ),
                        &e,
                        NET_RAW,
                    ));
                }
            }
        }
        if let Some((socket, advertisements)) = &self.neighbour {
            let all_nodes = SockAddr::from(SocketAddrV6::new(
                Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
                0,
                0,
                self.index,
            ));
            for advertisement in advertisements {
                socket.send_to(advertisement, &all_nodes).map_err(|e| {
                    os_error(
                        format!(
                            "interface `{}`: cannot send a neighbour advertisement: {e}",
                            self.interface
                        ),
                        &e,
                        NET_RAW,
                    )
                })?;
            }
        }
        Ok(())
    }
}

/// A raw ICMPv6 socket gets a copy of every ICMPv6 packet that arrives; this one only
/// sends, so it filters them all out (`ICMP6_FILTER_SETBLOCKALL`) rather than keep a
/// receive buffer full.
fn block_all_incoming(socket: &Socket) -> io::Result<()> {
    const ICMP6_FILTER: libc::c_int = 1;
    let block_all = [u32::MAX; 8];
    // SAFETY: the option value is a live icmp6_filter (256 bits) of the size given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_ICMPV6,
            ICMP6_FILTER,
            block_all.as_ptr().cast(),
            std::mem::size_of_val(&block_all) as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

const BROADCAST: [u8; 6] = [0xff; 6];
const ARP_FRAME_LEN: usize = 42;
const ADVERTISEMENT_LEN: usize = 32;

#[derive(Clone, Copy)]
enum ArpOperation {
    Request = 1,
    Reply = 2,
}

/// An Ethernet frame to everyone carrying an ARP packet that says `ip` is at `mac`: sender
/// and target address both `ip`. A request leaves the target hardware address zero (RFC
/// 5227's announcement); a reply repeats the sender's, which Linux needs to take it as
/// gratuitous.
fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr, operation: ArpOperation) -> [u8; ARP_FRAME_LEN] {
    let mut frame = [0u8; ARP_FRAME_LEN];
    frame[0..6].copy_from_slice(&BROADCAST);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&(libc::ETH_P_ARP as u16).to_be_bytes());
    let arp = &mut frame[14..];
    arp[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    arp[2..4].copy_from_slice(&(libc::ETH_P_IP as u16).to_be_bytes());
    arp[4] = 6;
    arp[5] = 4;
    arp[6..8].copy_from_slice(&(operation as u16).to_be_bytes());
    arp[8..14].copy_from_slice(&mac);
    arp[14..18].copy_from_slice(&ip.octets());
    if let ArpOperation::Reply = operation {
        arp[18..24].copy_from_slice(&mac);
    }
    arp[24..28].copy_from_slice(&ip.octets());
    frame
}

/// The ICMPv6 body of an unsolicited neighbour advertisement (RFC 4861 4.4) that `ip` is at
/// `mac`: override set so caches replace what they had, solicited clear as it answers no
/// one, and the target link-layer address option. The kernel fills in the checksum.
fn neighbour_advertisement(mac: [u8; 6], ip: Ipv6Addr) -> [u8; ADVERTISEMENT_LEN] {
    const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
    const OVERRIDE: u8 = 0x20;
    const TARGET_LINK_LAYER_ADDRESS: u8 = 2;
    let mut packet = [0u8; ADVERTISEMENT_LEN];
    packet[0] = NEIGHBOUR_ADVERTISEMENT;
    packet[4] = OVERRIDE;
    packet[8..24].copy_from_slice(&ip.octets());
    packet[24] = TARGET_LINK_LAYER_ADDRESS;
    packet[25] = 1; // option length in units of 8 bytes
    packet[26..32].copy_from_slice(&mac);
    packet
}

/// The errno a netlink request failed with, if the kernel answered with one.
fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| code.get().abs()),
        _ => None,
    }
}

fn netlink_error(what: String, e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(message) => {
            let e = message.to_io();
            os_error(format!("{what}: {e}"), &e, NET_ADMIN)
        }
        other => io::Error::other(format!("{what}: {other}")),
    }
}

/// Netlink changes to addresses need this privilege.
const NET_ADMIN: &str = "CAP_NET_ADMIN";
/// Raw and packet sockets need this one.
const NET_RAW: &str = "CAP_NET_RAW";

/// `message` as an error of `e`'s kind, naming the missing `capability` on EPERM.
fn os_error(message: String, e: &io::Error, capability: &str) -> io::Error {
    match e.raw_os_error() {
        Some(libc::EPERM) => io::Error::new(e.kind(), format!("{message} (needs {capability})")),
        _ => io::Error::new(e.kind(), message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];

    #[test]
    fn gratuitous_arp_request_bytes() {
        let frame = gratuitous_arp(MAC, Ipv4Addr::new(198, 18, 0, 100), ArpOperation::Request);
        #[rustfmt::skip]
        let expected: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // destination: broadcast
            0x02, 0x00, 0x5e, 0x10, 0x20, 0x30, // source: the interface
            0x08, 0x06,                         // ARP
            0x00, 0x01, 0x08, 0x00, 6, 4,       // Ethernet, IPv4, address lengths
            0x00, 0x01,                         // request
            0x02, 0x00, 0x5e, 0x10, 0x20, 0x30, 198, 18, 0, 100, // sender
            0, 0, 0, 0, 0, 0,                   198, 18, 0, 100, // target
        ];
        assert_eq!(frame, expected);
    }

    #[test]
    fn gratuitous_arp_reply_names_itself_as_target() {
        let frame = gratuitous_arp(MAC, Ipv4Addr::new(10, 1, 2, 3), ArpOperation::Reply);
        assert_eq!(&frame[20..22], &[0x00, 0x02]);
        assert_eq!(&frame[22..28], &MAC);
        assert_eq!(&frame[28..32], &[10, 1, 2, 3]);
        assert_eq!(&frame[32..38], &MAC);
        assert_eq!(&frame[38..42], &[10, 1, 2, 3]);
    }

    #[test]
    fn neighbour_advertisement_bytes() {
        let ip: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let packet = neighbour_advertisement(MAC, ip);
        #[rustfmt::skip]
        let expected: [u8; 32] = [
            136, 0, 0, 0,                       // type, code, checksum (the kernel's)
            0x20, 0, 0, 0,                      // override only
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00, // target
            2, 1, 0x02, 0x00, 0x5e, 0x10, 0x20, 0x30, // target link-layer address option
        ];
        assert_eq!(packet, expected);
    }

    #[test]
    fn permission_errors_name_the_capability() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        let add = os_error(
            "interface `eth0`: add 10.0.0.1/24".into(),
            &eperm,
            NET_ADMIN,
        );
        assert_eq!(
            add.to_string(),
            "interface `eth0`: add 10.0.0.1/24 (needs CAP_NET_ADMIN)"
        );
        assert_eq!(add.kind(), io::ErrorKind::PermissionDenied);
        let other = os_error(
            "x".into(),
            &io::Error::from_raw_os_error(libc::ENODEV),
            NET_RAW,
        );
        assert_eq!(other.to_string(), "x");
    }
}
