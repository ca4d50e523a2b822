//! The balancer's own redundancy on a real (virtual) segment: network namespaces made by
//! each test, joined by a bridge. First the virtual addresses alone (put on, taken off,
//! announced so that a client's neighbour cache moves); then an active/standby pair of real
//! Fulcrum processes under a steady load of new connections, with the active node's cable
//! pulled, a planned switch-over, and forged heartbeats. Needs root, as CI runs it.

mod support;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use fulcrum::config::VirtualAddress;
use fulcrum::ha::address::VirtualAddresses;
use support::netns::Topology;

const VIP4: &str = "198.18.0.100";
const VIP6: &str = "2001:db8::100";

fn virtual_addresses() -> Vec<VirtualAddress> {
    vec![
        VirtualAddress {
            ip: VIP4.parse().unwrap(),
            prefix: 24,
        },
        VirtualAddress {
            ip: VIP6.parse().unwrap(),
            prefix: 64,
        },
    ]
}

/// A client and two nodes, dual-stack.
fn segment() -> Topology {
    Topology::new(&[
        ("client", &["198.18.0.2/24", "2001:db8::2/64"]),
        ("lb1", &["198.18.0.11/24", "2001:db8::11/64"]),
        ("lb2", &["198.18.0.12/24", "2001:db8::12/64"]),
    ])
}

/// Polls (up to 2 s) until the client's neighbour cache maps `address` to `mac`; returns
/// what it holds at the end.
fn client_neighbour_becomes(net: &Topology, address: &str, mac: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let held = net.neighbour("client", address);
        if held.as_deref() == Some(mac) || Instant::now() > deadline {
            return held;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn claimed_addresses_are_on_the_interface_and_clients_move_to_the_claimer() {
    let net = segment();
    net.run("lb1", || async {
        let addresses = VirtualAddresses::open("eth0", &virtual_addresses())
            .await
            .unwrap();
        assert!(!addresses.held().await.unwrap());
        addresses.claim().await.unwrap();
        addresses.claim().await.expect("claiming twice is fine");
        assert!(addresses.held().await.unwrap());
    });
    let on_lb1 = net.addresses("lb1");
    assert!(on_lb1.contains("198.18.0.100/24"), "{on_lb1}");
    let vip6 = on_lb1.lines().find(|l| l.contains("2001:db8::100/64"));
    assert!(
        vip6.is_some_and(|line| !line.contains("tentative")),
        "usable at once: {on_lb1}"
    );

    // The client reaches both addresses (nothing listens on port 9: refused), so its
    // neighbour cache learns lb1 for them.
    net.run("client", || async {
        for vip in [VIP4, VIP6] {
            let to = SocketAddr::new(vip.parse().unwrap(), 9);
            let connect = tokio::net::TcpStream::connect(to);
            let outcome = tokio::time::timeout(Duration::from_secs(3), connect)
                .await
                .unwrap_or_else(|_| panic!("{to} did not answer"));
            let e = outcome.expect_err("nothing listens on port 9");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{to}: {e}");
        }
    });
    let lb1 = net.mac("lb1");
    assert_eq!(net.neighbour("client", VIP4).as_deref(), Some(&*lb1));
    assert_eq!(net.neighbour("client", VIP6).as_deref(), Some(&*lb1));

    net.run("lb1", || async {
        let addresses = VirtualAddresses::open("eth0", &virtual_addresses())
            .await
            .unwrap();
        assert!(addresses.held().await.unwrap(), "a new process finds them");
        addresses.release().await.unwrap();
        addresses.release().await.expect("releasing twice is fine");
        assert!(!addresses.held().await.unwrap());
    });
    let on_lb1 = net.addresses("lb1");
    assert!(!on_lb1.contains("198.18.0.100"), "{on_lb1}");
    assert!(!on_lb1.contains("2001:db8::100"), "{on_lb1}");

    // lb2 claims: its announcements alone move the client's entries, which still name lb1.
    net.run("lb2", || async {
        let addresses = VirtualAddresses::open("eth0", &virtual_addresses())
            .await
            .unwrap();
        addresses.claim().await.unwrap();
    });
    let lb2 = net.mac("lb2");
    assert_ne!(lb1, lb2);
    assert_eq!(
        client_neighbour_becomes(&net, VIP4, &lb2),
        Some(lb2.clone())
    );
    assert_eq!(
        client_neighbour_becomes(&net, VIP6, &lb2),
        Some(lb2.clone())
    );
}

#[test]
fn announcements_repeat_after_a_claim_and_stop_at_a_release() {
    let net = segment();
    let lb2 = net.mac("lb2");
    let capture_for = Duration::from_millis(2800);
    let (frames, claimed_at, released_at) = std::thread::scope(|scope| {
        let capture = scope.spawn(|| net.within("client", || capture_arp(capture_for)));
        // The capture socket opens first.
        std::thread::sleep(Duration::from_millis(200));
        net.run("lb2", || async {
            let addresses = VirtualAddresses::open("eth0", &virtual_addresses())
                .await
                .unwrap();
            let claimed_at = Instant::now();
            addresses.claim().await.unwrap();
            tokio::time::sleep(Duration::from_millis(1300)).await;
            // A second claim, let go before its repeats are due: none may follow.
            addresses.claim().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            addresses.release().await.unwrap();
            let released_at = Instant::now();
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let frames = capture.join().unwrap();
            (frames, claimed_at, released_at)
        })
    });
    let announcing: Vec<(Instant, [u8; 42])> = frames
        .into_iter()
        .filter(|(_, frame)| format_mac(&frame[6..12]) == lb2 && frame[28..32] == [198, 18, 0, 100])
        .collect();
    let after = |at: Instant| {
        announcing
            .iter()
            .map(|(when, _)| when.saturating_duration_since(at))
            .filter(|d| !d.is_zero())
            .collect::<Vec<_>>()
    };
    // First claim: a request and a reply at once, and again at 50 ms, 250 ms and 1 s.
    let first: Vec<Duration> = after(claimed_at)
        .into_iter()
        .filter(|d| *d < Duration::from_millis(1290))
        .collect();
    assert_eq!(first.len(), 8, "frames at {first:?}");
    assert!(first[7] > Duration::from_millis(900), "frames at {first:?}");
    for (_, frame) in &announcing {
        // Sender and target address both the VIP: gratuitous.
        assert_eq!(frame[28..32], frame[38..42]);
    }
    let late = after(released_at);
    assert!(late.is_empty(), "announced after the release: {late:?}");
}

/// ARP frames seen on the current namespace's interfaces for `length`, with when.
fn capture_arp(length: Duration) -> Vec<(Instant, [u8; 42])> {
    // SAFETY: plain socket calls on a descriptor owned at once; the buffers outlive them.
    let socket = unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ARP as u16).to_be()),
        );
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        OwnedFd::from_raw_fd(fd)
    };
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: the option value is a live timeval of the size given.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let end = Instant::now() + length;
    let mut frames = Vec::new();
    while Instant::now() < end {
        let mut frame = [0u8; 42];
        // SAFETY: the buffer is live and as long as said.
        let n = unsafe { libc::recv(socket.as_raw_fd(), frame.as_mut_ptr().cast(), 42, 0) };
        if n == 42 {
            frames.push((Instant::now(), frame));
        }
    }
    frames
}

fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn a_missing_interface_is_named() {
    let net = segment();
    let e = net
        .run("lb1", || async {
            VirtualAddresses::open("nosuch0", &virtual_addresses()).await
        })
        .err()
        .expect("no such interface");
    assert!(e.to_string().contains("`nosuch0`"), "{e}");
}
