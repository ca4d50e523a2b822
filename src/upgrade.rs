//! Binary upgrade without a refused connection: the running process starts the new binary
//! and hands it its listening sockets (the same kernel sockets, through a Unix socket with
//! `SCM_RIGHTS`), waits until it serves, and only then stops accepting and drains.
//!
//! The exchange, on a `SOCK_SEQPACKET` pair whose child end is the new process's fd 3
//! (named by `FULCRUM_UPGRADE_FD`): the old process sends a JSON manifest, then the
//! descriptors in batches in the manifest's order (each listener's sockets, TCP or UDP as
//! the manifest says, the admin
//! listener's, the control socket); the new process answers `ready` once its accept loops
//! run. A new process that exits, closes its end or stays silent past the deadline has
//! failed, and the old one serves on.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use crate::config::ListenerConfig;
use crate::server::{HandedListener, Server, SocketKind};

/// The environment variable naming the descriptor a new process reads its sockets from.
pub const UPGRADE_FD: &str = "FULCRUM_UPGRADE_FD";
/// The descriptor number the new process finds the exchange on.
const CHILD_FD: RawFd = 3;
/// How long the new process has to load its config and serve.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// Descriptors per message, well under the kernel's limit of 253.
const FDS_PER_MESSAGE: usize = 64;
/// The largest manifest read (a few hundred bytes per listener).
const MANIFEST_MAX: usize = 1 << 20;
const READY: &[u8] = b"ready";
const EXITED: &str = "the new process exited before it was ready";

/// What comes before the descriptors: what each is, in the order they follow.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Manifest {
    listeners: Vec<ManifestListener>,
    /// The admin listener's configured bind, if its socket follows the listeners'.
    admin: Option<SocketAddr>,
    /// The control socket follows last.
    control: bool,
    /// The sticky-session key.
    sticky_key: [u8; 16],
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct ManifestListener {
    name: String,
    bind: SocketAddr,
    /// Absent from the manifest of a process that predates UDP listeners: TCP.
    #[serde(default)]
    kind: SocketKind,
    sockets: usize,
}

impl Manifest {
    fn descriptors(&self) -> usize {
        self.listeners.iter().map(|l| l.sockets).sum::<usize>()
            + usize::from(self.admin.is_some())
            + usize::from(self.control)
    }
}

/// Starts `binary` as `binary run -c <config>` with the listening sockets handed over
/// through a Unix socket (SCM_RIGHTS), and waits until it serves. Ok(new pid): the caller
/// then shuts this process down gracefully (`Server::shutdown(grace)`). Err(why): the new
/// process did not come up (bad config, bad binary, crashed, not ready within a deadline);
/// this process serves on.
pub async fn hand_over(
    server: &Server,
    binary: &Path,
    config: &Path,
    control: Option<&UnixListener>,
) -> Result<u32, String> {
    let handover = server
        .handover()
        .map_err(|e| format!("cannot copy the listening sockets: {e}"))?;
    let control = control
        .map(|c| c.try_clone())
        .transpose()
        .map_err(|e| format!("cannot copy the control socket: {e}"))?;
    let manifest = Manifest {
        listeners: handover
            .listeners
            .iter()
            .map(|l| ManifestListener {
                name: l.name.clone(),
                bind: l.bind,
                kind: l.kind,
                sockets: l.sockets.len(),
            })
            .collect(),
        admin: handover.admin.as_ref().map(|(bind, _)| *bind),
        control: control.is_some(),
        sticky_key: handover.sticky_key,
    };
    let mut fds: Vec<RawFd> = handover
        .listeners
        .iter()
        .flat_map(|l| l.sockets.iter().map(|s| s.as_raw_fd()))
        .collect();
    fds.extend(handover.admin.as_ref().map(|(_, s)| s.as_raw_fd()));
    fds.extend(control.as_ref().map(|c| c.as_raw_fd()));

    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("cannot make the handover socket pair: {e}"))?;
    let child_end = theirs.as_raw_fd();
    let mut command = std::process::Command::new(binary);
    command
        .arg("run")
        .arg("-c")
        .arg(config)
        .env(UPGRADE_FD, CHILD_FD.to_string())
        .stdin(std::process::Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl) are made.
    unsafe {
        command.pre_exec(move || {
            let rc = if child_end == CHILD_FD {
                libc::fcntl(CHILD_FD, libc::F_SETFD, 0)
            } else {
                libc::dup2(child_end, CHILD_FD)
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    // Only the child holds its end now: its exit closes the pair.
    drop(theirs);
    let pid = child.id();
    tracing::info!(pid, binary = %binary.display(), "upgrade: new process started; handing over the listening sockets");
    let outcome = async {
        send(&ours, &manifest, &fds).map_err(|e| format!("cannot hand the sockets over: {e}"))?;
        tokio::time::timeout(READY_WITHIN, wait_ready(ours))
            .await
            .map_err(|_| format!("the new process was not ready within {READY_WITHIN:?}"))?
    }
    .await;
    match outcome {
        Ok(()) => Ok(pid),
        Err(why) => {
            let _ = child.kill();
            let status = child.wait().ok();
            Err(match status {
                Some(status) if !status.success() && status.code().is_some() => {
                    format!("{why} (the new process {pid} exited: {status})")
                }
                _ => format!("{why} (new process {pid})"),
            })
        }
    }
}

/// Sends `manifest`, then the descriptors `fds` in batches.
fn send(socket: &OwnedFd, manifest: &Manifest, fds: &[RawFd]) -> io::Result<()> {
    let text = serde_json::to_vec(manifest).map_err(io::Error::other)?;
    sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(&text)],
        &[],
        MsgFlags::empty(),
        None,
    )?;
    for batch in fds.chunks(FDS_PER_MESSAGE) {
        sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(b"F")],
            &[ControlMessage::ScmRights(batch)],
            MsgFlags::empty(),
            None,
        )?;
    }
    Ok(())
}

/// Resolves once the new process says `ready`; fails if it closes the pair (exits) first.
async fn wait_ready(socket: OwnedFd) -> Result<(), String> {
    let nonblocking = nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&socket, nix::fcntl::FcntlArg::F_SETFL(nonblocking))
        .map_err(|e| format!("handover socket: {e}"))?;
    // SAFETY: the descriptor is owned by the `AsyncFd` and neither replaced nor closed
    // while registered.
    let socket =
        unsafe { AsyncFd::register(socket) }.map_err(|e| format!("handover socket: {e}"))?;
    loop {
        let mut guard = socket
            .readable()
            .await
            .map_err(|e| format!("handover socket: {e}"))?;
        let mut buf = [0u8; 16];
        let received = guard.try_io(|fd| {
            nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(io::Error::from)
        });
        match received {
            // Reset: it exited without reading everything it was sent.
            Ok(Ok(0)) => return Err(EXITED.to_string()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(EXITED.to_string());
            }
            Ok(Ok(n)) if &buf[..n] == READY => return Ok(()),
            Ok(Ok(n)) => {
                return Err(format!(
                    "the new process said {:?} instead of ready",
                    String::from_utf8_lossy(&buf[..n])
                ));
            }
            Ok(Err(e)) => return Err(format!("handover socket: {e}")),
            Err(_would_block) => continue,
        }
    }
}

/// The sockets a process started by [`hand_over`] took over.
pub struct Inherited {
    listeners: Vec<HandedListener>,
    admin: Option<(SocketAddr, std::net::TcpListener)>,
    control: Option<UnixListener>,
    /// The old process's sticky-session key (without a configured secret).
    pub(crate) sticky_key: [u8; 16],
    /// Where `ready` is written.
    channel: OwnedFd,
}

impl std::fmt::Debug for Inherited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inherited")
            .field(
                "listeners",
                &self
                    .listeners
                    .iter()
                    .map(|l| (&l.name, l.bind, l.kind, l.sockets.len()))
                    .collect::<Vec<_>>(),
            )
            .field("admin", &self.admin.as_ref().map(|(bind, _)| bind))
            .field("control", &self.control.is_some())
            .finish()
    }
}

impl Inherited {
    /// The control socket, for the caller to answer on (the same path, no gap).
    pub fn take_control(&mut self) -> Option<UnixListener> {
        self.control.take()
    }

    /// The sockets of the old process's listener of the same name, configured bind and
    /// kind (TCP or UDP), if it had one.
    pub(crate) fn take_listener(&mut self, l: &ListenerConfig) -> Option<Vec<OwnedFd>> {
        let kind = SocketKind::of(l);
        let at = self
            .listeners
            .iter()
            .position(|h| h.name == l.name && h.bind == l.bind && h.kind == kind)?;
        Some(self.listeners.swap_remove(at).sockets)
    }

    /// The old admin listener's socket, if it was configured with the same `bind`.
    pub(crate) fn take_admin(&mut self, bind: Option<SocketAddr>) -> Option<std::net::TcpListener> {
        match &self.admin {
            Some((old, _)) if Some(*old) == bind => self.admin.take().map(|(_, s)| s),
            _ => None,
        }
    }

    /// Tells the old process that this one serves; the sockets no listener took close.
    pub(crate) fn ready(self) -> io::Result<()> {
        nix::sys::socket::send(self.channel.as_raw_fd(), READY, MsgFlags::empty())?;
        Ok(())
    }
}

/// In a process started by `hand_over`: the sockets handed to it (None if it was started
/// normally).
pub fn inherited() -> io::Result<Option<Inherited>> {
    let Ok(fd) = std::env::var(UPGRADE_FD) else {
        return Ok(None);
    };
    let fd: RawFd = fd
        .parse()
        .map_err(|_| io::Error::other(format!("{UPGRADE_FD}={fd}: not a descriptor number")))?;
    // SAFETY: the parent made `fd` our end of the pair; nothing else in this process owns
    // it, and it is read from once.
    let channel = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not passed on to a process this one starts in its turn.
    nix::fcntl::fcntl(
        &channel,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    let (manifest, mut fds) = receive(&channel)?;
    let mut fds = fds.drain(..);
    let mut listeners = Vec::new();
    for l in manifest.listeners {
        let sockets = (&mut fds).take(l.sockets).collect();
        listeners.push(HandedListener {
            name: l.name,
            bind: l.bind,
            kind: l.kind,
            sockets,
        });
    }
    let admin = match manifest.admin {
        Some(bind) => fds.next().map(|fd| (bind, std::net::TcpListener::from(fd))),
        None => None,
    };
    let control = if manifest.control {
        fds.next().map(UnixListener::from)
    } else {
        None
    };
    Ok(Some(Inherited {
        listeners,
        admin,
        control,
        sticky_key: manifest.sticky_key,
        channel,
    }))
}

/// Reads the manifest and every descriptor it announces.
fn receive(channel: &OwnedFd) -> io::Result<(Manifest, Vec<OwnedFd>)> {
    let mut text = vec![0u8; MANIFEST_MAX];
    let n = nix::sys::socket::recv(channel.as_raw_fd(), &mut text, MsgFlags::empty())?;
    let manifest: Manifest = serde_json::from_slice(&text[..n])
        .map_err(|e| io::Error::other(format!("the handover manifest: {e}")))?;
    let wanted = manifest.descriptors();
    let mut fds = Vec::with_capacity(wanted);
    while fds.len() < wanted {
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        let msg = recvmsg::<()>(
            channel.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        if msg.bytes == 0 {
            return Err(io::Error::other(
                "the old process closed the handover before sending every socket",
            ));
        }
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: descriptors the kernel just installed in this process for us.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
    }
    Ok((manifest, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_counts_every_descriptor_that_follows() {
        let manifest = Manifest {
            listeners: vec![
                ManifestListener {
                    name: "web".into(),
                    bind: "127.0.0.1:80".parse().unwrap(),
                    kind: SocketKind::Tcp,
                    sockets: 4,
                },
                ManifestListener {
                    name: "dns".into(),
                    bind: "127.0.0.1:53".parse().unwrap(),
                    kind: SocketKind::Udp,
                    sockets: 2,
                },
            ],
            admin: Some("127.0.0.1:9901".parse().unwrap()),
            control: true,
            sticky_key: [7; 16],
        };
        assert_eq!(manifest.descriptors(), 8);
        let text = serde_json::to_vec(&manifest).unwrap();
        assert_eq!(serde_json::from_slice::<Manifest>(&text).unwrap(), manifest);
    }

    /// Sends one socket of listener `name` over a fresh pair, closes the sender's copy, and
    /// returns what the receiving side adopts.
    fn send_one(name: &str, bind: SocketAddr, kind: SocketKind, fd: RawFd) -> OwnedFd {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let manifest = Manifest {
            listeners: vec![ManifestListener {
                name: name.into(),
                bind,
                kind,
                sockets: 1,
            }],
            admin: None,
            control: false,
            sticky_key: [1; 16],
        };
        send(&ours, &manifest, &[fd]).unwrap();
        let (received, fds) = receive(&theirs).unwrap();
        assert_eq!(received, manifest);
        fds.into_iter().next().unwrap()
    }

    #[test]
    fn sockets_cross_the_pair_as_the_same_kernel_sockets() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fd = send_one("web", addr, SocketKind::Tcp, listener.as_raw_fd());
        drop(listener);
        let adopted = std::net::TcpListener::from(fd);
        assert_eq!(adopted.local_addr().unwrap(), addr);
        // Still listening, though the sender's copy is closed.
        let _client = std::net::TcpStream::connect(addr).unwrap();
        adopted.accept().unwrap();
    }

    #[test]
    fn a_manifest_from_a_process_without_udp_listeners_hands_tcp_sockets() {
        let text = r#"{"listeners":[{"name":"web","bind":"127.0.0.1:80","sockets":2}],
            "admin":null,"control":false,"sticky_key":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]}"#;
        let manifest: Manifest = serde_json::from_str(text).unwrap();
        assert_eq!(manifest.listeners[0].kind, SocketKind::Tcp);
        let text = serde_json::to_string(&ManifestListener {
            name: "dns".into(),
            bind: "127.0.0.1:53".parse().unwrap(),
            kind: SocketKind::Udp,
            sockets: 1,
        })
        .unwrap();
        assert!(text.contains(r#""kind":"udp""#), "{text}");
    }

    #[test]
    fn a_udp_socket_crosses_the_pair_and_still_receives() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let fd = send_one("dns", addr, SocketKind::Udp, socket.as_raw_fd());
        drop(socket);
        let adopted = std::net::UdpSocket::from(fd);
        adopted
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"query", addr).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = adopted.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"query");
        assert_eq!(from, client.local_addr().unwrap());
    }
}
