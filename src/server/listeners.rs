//! The listeners a server runs: each listener's sockets (one per worker, `SO_REUSEPORT`),
//! its accept loops (or, for a UDP listener, receive loops) on every worker, its connection
//! (or flow) limit and its own stop, so that a reload can add, remove or change one
//! listener without touching the others; and the pause of a planned HA switchover, which
//! takes no new connections without refusing any while the open ones finish.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, watch};

use crate::config::{ListenerConfig, ListenerMode};
use crate::l4::udp::{self, UdpStats};
use crate::listener::{self, Listener};
use crate::runtime::Shared;

/// Which kind of socket a listener has, as a handover names it: a new process never takes
/// a TCP socket for a UDP listener or the other way round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketKind {
    /// Listening TCP sockets (HTTP and `mode = "tcp"` listeners); what a process that
    /// predates UDP listeners hands over.
    #[default]
    Tcp,
    /// UDP sockets (`mode = "udp"` listeners).
    Udp,
}

impl SocketKind {
    pub fn of(l: &ListenerConfig) -> SocketKind {
        match l.mode {
            ListenerMode::Udp(_) => SocketKind::Udp,
            _ => SocketKind::Tcp,
        }
    }
}

/// A listener's sockets, one (at least) per worker.
pub(super) enum Sockets {
    Tcp(Vec<std::net::TcpListener>),
    Udp(Vec<std::net::UdpSocket>),
}

impl Sockets {
    fn kind(&self) -> SocketKind {
        match self {
            Sockets::Tcp(_) => SocketKind::Tcp,
            Sockets::Udp(_) => SocketKind::Udp,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Sockets::Tcp(s) => s[0].local_addr(),
            Sockets::Udp(s) => s[0].local_addr(),
        }
    }

    /// Duplicates of the descriptors, for a new process.
    fn duplicates(&self) -> io::Result<Vec<OwnedFd>> {
        match self {
            Sockets::Tcp(s) => s.iter().map(|s| s.as_fd().try_clone_to_owned()).collect(),
            Sockets::Udp(s) => s.iter().map(|s| s.as_fd().try_clone_to_owned()).collect(),
        }
    }
}

/// The listeners running, and those removed whose connections are still finishing.
#[derive(Default)]
pub(super) struct ListenerSet {
    pub running: Vec<Running>,
    pub draining: Vec<Draining>,
    /// Set from [`ListenerSet::pause`] to [`ListenerSet::resume`], so that a listener a
    /// reload starts in between is paused too.
    pub paused: bool,
}

impl ListenerSet {
    /// Takes no new connection on any listener, without refusing one, and asks the open
    /// connections to finish and close (see [`Running::pause`]).
    pub fn pause(&mut self) {
        self.paused = true;
        for running in &self.running {
            running.pause();
        }
    }

    /// Undoes [`ListenerSet::pause`]: new connections are taken and kept alive again.
    pub fn resume(&mut self) {
        self.paused = false;
        for running in &self.running {
            running.resume();
        }
    }

    /// Connections open (or accepted by the kernel and not yet by a loop) on every
    /// listener, running or removed.
    pub fn open_connections(&self) -> usize {
        let running: usize = self.running.iter().map(Running::open_connections).sum();
        let draining: usize = self.draining.iter().map(Draining::open_connections).sum();
        running + draining
    }

    /// Takes out the running listeners whose slot is not in `slots`.
    pub fn retire_all_but(&mut self, slots: &[usize]) -> Vec<Running> {
        let (kept, removed) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|r| slots.contains(&r.slot));
        self.running = kept;
        removed
    }
}

/// A listener's sockets, bound (or handed over) and not yet accepting.
pub(super) struct Opened {
    pub name: String,
    /// As configured (port 0 stays 0), which a handover matches on.
    bind: SocketAddr,
    pub slot: usize,
    /// `max_connections`, or a UDP listener's `max_flows`.
    max_connections: usize,
    /// At least one per worker.
    sockets: Sockets,
}

/// Binds listener `l` with a socket for each of `workers`, taking `handed` sockets (from
/// the process this one took over from, of the listener's kind) first. A listener that
/// cannot be bound fails with its name, and the sockets bound for it so far are closed.
pub(super) fn open(
    l: &ListenerConfig,
    slot: usize,
    client_header: Duration,
    workers: usize,
    handed: Option<Vec<OwnedFd>>,
) -> io::Result<Opened> {
    let named = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("listener `{}` cannot bind {}: {e}", l.name, l.bind),
        )
    };
    let handed = handed.filter(|h| !h.is_empty());
    if let Some(handed) = &handed {
        check_kind(handed, SocketKind::of(l)).map_err(named)?;
    }
    let (sockets, limit) = match &l.mode {
        ListenerMode::Udp(mode) => {
            let sockets = match handed {
                // As they are, with no copies for extra workers: two loops reading one
                // socket would each start a flow for the same client. (A socket bound
                // beside them would move clients to other sockets, and so other flows.)
                Some(handed) => {
                    if handed.len() < workers {
                        tracing::info!(listener = %l.name, sockets = handed.len(), workers, "udp listener handed over with fewer sockets than workers: it receives on that many until a restart");
                    }
                    handed
                        .into_iter()
                        .map(std::net::UdpSocket::from)
                        .map(|s| s.set_nonblocking(true).map(|()| s))
                        .collect::<io::Result<_>>()?
                }
                None => bind_each_udp(l.bind, workers).map_err(named)?,
            };
            (Sockets::Udp(sockets), mode.max_flows)
        }
        _ => {
            let defer = l.defer_accept.then_some(client_header);
            let sockets = match handed {
                Some(handed) => {
                    let sockets: Vec<std::net::TcpListener> = copies_for(handed, workers)?
                        .into_iter()
                        .map(std::net::TcpListener::from)
                        .collect();
                    for socket in &sockets {
                        socket.set_nonblocking(true)?;
                        // The new config's, whatever the old process had.
                        set_defer_accept(&socket2::SockRef::from(socket), defer)?;
                        // Handed over in the middle of a switchover's pause: this process
                        // takes connections, whatever the old one is doing.
                        take_new_connections(socket)?;
                    }
                    sockets
                }
                None => bind_each(l.bind, defer, workers).map_err(named)?,
            };
            (Sockets::Tcp(sockets), l.max_connections)
        }
    };
    let addr = sockets.local_addr()?;
    match sockets.kind() {
        SocketKind::Tcp => tracing::info!(listener = %l.name, %addr, "listening"),
        SocketKind::Udp => tracing::info!(listener = %l.name, %addr, "listening (udp)"),
    }
    Ok(Opened {
        name: l.name.clone(),
        bind: l.bind,
        slot,
        max_connections: limit,
        sockets,
    })
}

/// The handed TCP sockets, with copies for workers beyond those of the old process: a
/// socket bound beside them would get its share of new connections at once, before this
/// process is ready, and reset them all if it then failed to start.
fn copies_for(mut sockets: Vec<OwnedFd>, workers: usize) -> io::Result<Vec<OwnedFd>> {
    let handed_count = sockets.len();
    for i in 0..workers.saturating_sub(handed_count) {
        let copy = sockets[i % handed_count].try_clone()?;
        sockets.push(copy);
    }
    Ok(sockets)
}

/// Fails unless every handed socket is of the kind the listener needs, whatever the
/// handover said.
fn check_kind(sockets: &[OwnedFd], kind: SocketKind) -> io::Result<()> {
    let wanted = match kind {
        SocketKind::Tcp => socket2::Type::STREAM,
        SocketKind::Udp => socket2::Type::DGRAM,
    };
    for socket in sockets {
        if socket2::SockRef::from(socket).r#type()? != wanted {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a socket handed over for it is not a {kind:?} socket"),
            ));
        }
    }
    Ok(())
}

impl Opened {
    /// Starts an accept loop (a receive loop, for UDP) for each socket, spread over
    /// `workers` (a worker takes several when there are more sockets than workers), each
    /// once `ready` is true.
    pub fn start(
        self,
        workers: &[Handle],
        shared: &Arc<Shared>,
        ready: Option<watch::Receiver<bool>>,
    ) -> Running {
        let permits = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        let connections = Arc::new(Semaphore::new(permits as usize));
        let (stop, _) = watch::channel(false);
        let finish = Arc::new(watch::channel(false).0);
        let addr = self.sockets.local_addr().unwrap_or(self.bind);
        let copies = match self.sockets.duplicates() {
            Ok(copies) => copies,
            Err(e) => {
                tracing::warn!(listener = %self.name, error = %e, "cannot keep copies of the sockets for a handover");
                Vec::new()
            }
        };
        let adoptable = udp::Adoptable::default();
        let (sockets, udp_stats) = match self.sockets {
            Sockets::Tcp(sockets) => {
                let sockets = sockets.into_iter().map(|s| {
                    let (stop, connections, finish) =
                        (stop.subscribe(), connections.clone(), finish.clone());
                    let slot = self.slot;
                    Box::new(move |shared: Arc<Shared>| -> LoopFuture {
                        Box::pin(async move {
                            let socket = match TcpListener::from_std(s) {
                                Ok(socket) => socket,
                                Err(e) => {
                                    tracing::error!(error = %e, "a bound listener cannot register with its worker");
                                    return;
                                }
                            };
                            let listener = Listener {
                                socket,
                                slot,
                                connections,
                                finish,
                            };
                            listener::accept_loop(listener, shared, stop).await
                        })
                    }) as StartLoop
                });
                (sockets.collect::<Vec<_>>(), None)
            }
            Sockets::Udp(sockets) => {
                let stats = Arc::new(UdpStats::new(self.name.clone(), addr, workers.len()));
                let loops = sockets.into_iter().map(|s| {
                    let adoptable = adoptable.clone();
                    let (stop, flows, paused, stats) = (
                        stop.subscribe(),
                        connections.clone(),
                        finish.subscribe(),
                        stats.clone(),
                    );
                    let slot = self.slot;
                    Box::new(move |shared: Arc<Shared>| -> LoopFuture {
                        Box::pin(async move {
                            let socket = match tokio::net::UdpSocket::from_std(s) {
                                Ok(socket) => socket,
                                Err(e) => {
                                    tracing::error!(error = %e, "a bound udp listener cannot register with its worker");
                                    return;
                                }
                            };
                            let listener = udp::UdpListener {
                                socket,
                                slot,
                                flows,
                                stats,
                                paused,
                                adoptable,
                            };
                            udp::receive_loop(listener, shared, stop).await
                        })
                    }) as StartLoop
                });
                (loops.collect::<Vec<_>>(), Some(stats))
            }
        };
        let loops = sockets.len();
        for (i, start) in sockets.into_iter().enumerate() {
            let mut ready = ready.clone();
            let shared = shared.clone();
            workers[i % workers.len()].spawn(async move {
                if let Some(ready) = ready.as_mut() {
                    let _ = ready.wait_for(|&r| r).await;
                }
                start(shared).await
            });
        }
        Running {
            name: self.name,
            bind: self.bind,
            slot: self.slot,
            addr,
            // A UDP listener's permits are held by flows alone.
            accept_loops: if udp_stats.is_some() { 0 } else { loops },
            kind: if udp_stats.is_some() {
                SocketKind::Udp
            } else {
                SocketKind::Tcp
            },
            sockets: copies,
            adoptable: udp_stats.as_ref().map(|_| adoptable),
            udp: udp_stats,
            connections,
            permits,
            stop,
            finish,
        }
    }
}

/// A socket's loop, to start on its worker.
type LoopFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
type StartLoop = Box<dyn FnOnce(Arc<Shared>) -> LoopFuture + Send>;

/// A listener accepting (or receiving datagrams) on every worker.
pub(super) struct Running {
    pub name: String,
    bind: SocketAddr,
    pub slot: usize,
    /// Where it is bound.
    pub addr: SocketAddr,
    kind: SocketKind,
    /// Copies of the sockets its loops accept on, which a handover passes on.
    sockets: Vec<OwnedFd>,
    /// A UDP listener's sockets, for a listener added on its address once it is removed.
    adoptable: Option<udp::Adoptable>,
    /// What a UDP listener counts.
    pub udp: Option<Arc<UdpStats>>,
    /// One permit per open connection (and per accept loop waiting for one), or per UDP
    /// flow.
    connections: Arc<Semaphore>,
    /// The permits `connections` has in all: `max_connections` (`max_flows`).
    permits: u32,
    accept_loops: usize,
    /// Stops its accept loops.
    stop: watch::Sender<bool>,
    /// Asks its connections to finish and close: on its removal and shutdown, with `stop`;
    /// during a switchover's pause, alone. Every connection but a tunnel holds a receiver.
    /// On a UDP listener, it holds off new flows during the pause.
    finish: Arc<watch::Sender<bool>>,
}

impl Running {
    /// What the admin API shows of it (a UDP listener's connections are its flows).
    pub fn info(&self) -> crate::admin::ListenerInfo {
        crate::admin::ListenerInfo {
            addr: self.addr,
            connections: self.connections.clone(),
            permits: self.permits,
            accept_loops: self.accept_loops,
        }
    }

    /// Applies a new `max_connections` (`max_flows`): a raise at once; a cut takes back
    /// free permits now and the rest as connections close, so no open connection is cut.
    pub fn set_max_connections(&mut self, max: usize) {
        let new = u32::try_from(max).unwrap_or(u32::MAX);
        if new > self.permits {
            self.connections.add_permits((new - self.permits) as usize);
        } else if new < self.permits {
            let cut = (self.permits - new) as usize;
            let now = self.connections.forget_permits(cut);
            if now < cut {
                let connections = self.connections.clone();
                let rest = u32::try_from(cut - now).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    if let Ok(permits) = connections.acquire_many(rest).await {
                        permits.forget();
                    }
                });
            }
        }
        self.permits = new;
    }

    /// Applies a new `defer_accept` to its sockets, which accept on without a gap.
    pub fn set_defer_accept(&self, defer: Option<Duration>) -> io::Result<()> {
        if self.kind == SocketKind::Tcp {
            for socket in &self.sockets {
                set_defer_accept(&socket2::SockRef::from(socket), defer)?;
            }
        }
        Ok(())
    }

    /// Duplicates of its sockets, with what a new process matches them on.
    pub fn hand_over(&self) -> io::Result<HandedListener> {
        Ok(HandedListener {
            name: self.name.clone(),
            bind: self.bind,
            kind: self.kind,
            sockets: self
                .sockets
                .iter()
                .map(|s| s.try_clone())
                .collect::<io::Result<_>>()?,
        })
    }

    /// Stops accepting (its sockets close once the accept loops have seen the stop) and
    /// tells its connections to finish and close. A UDP listener's flows finish the
    /// exchange under way, within a few seconds (see `crate::l4::udp`).
    pub fn close(self) -> Draining {
        let _ = self.stop.send(true);
        // Stored even with no connection open to receive it.
        self.finish.send_replace(true);
        Draining {
            connections: self.connections,
            permits: self.permits,
            counted: self.kind == SocketKind::Tcp,
            bind: self.bind,
            adoptable: self.adoptable,
        }
    }

    /// Takes no new connection, without refusing one: the kernel drops every SYN for its
    /// sockets, so a connecting client sends it again about a second later (by when a
    /// switchover has moved the address), while handshakes under way complete and the
    /// accept loops go on taking what the kernel accepted. Open connections are asked to
    /// finish what is in flight and close, as on shutdown. A UDP listener drops the
    /// datagrams that would start a flow (the client's retry finds the new active node) and
    /// relays those of its flows.
    pub fn pause(&self) {
        if self.kind == SocketKind::Tcp {
            for socket in &self.sockets {
                if let Err(e) = drop_new_connections(socket) {
                    tracing::warn!(listener = %self.name, error = %e, "cannot pause a socket: it takes new connections on");
                }
            }
        }
        self.finish.send_replace(true);
    }

    /// Undoes [`Running::pause`].
    pub fn resume(&self) {
        if self.kind == SocketKind::Tcp {
            for socket in &self.sockets {
                if let Err(e) = take_new_connections(socket) {
                    tracing::error!(listener = %self.name, error = %e, "cannot resume a paused socket: it drops new connections");
                }
            }
        }
        self.finish.send_replace(false);
    }

    /// Its open connections (tunnels aside: a WebSocket runs until either side ends it),
    /// and those in the kernel's accept queue that a loop has yet to take. UDP flows are
    /// not counted: nothing asks them to end, and a switchover's drain waiting for them
    /// would keep new clients out for their idle timeout.
    pub fn open_connections(&self) -> usize {
        if self.kind == SocketKind::Udp {
            return 0;
        }
        let queued: usize = self.sockets.iter().map(accept_queue).sum();
        self.finish.receiver_count() + queued
    }
}

/// A listener no longer accepting, whose connections are finishing.
pub(super) struct Draining {
    connections: Arc<Semaphore>,
    permits: u32,
    /// Whether a switchover's drain waits for its connections (not for UDP flows).
    counted: bool,
    /// As configured.
    bind: SocketAddr,
    adoptable: Option<udp::Adoptable>,
}

impl Draining {
    /// A removed UDP listener's sockets on `bind` (with a port given), if they are still
    /// open, for a UDP listener added there: binding beside them would fail. Its loops
    /// have stopped receiving; its flows' replies still go out through them.
    pub fn adopt_udp(&mut self, bind: SocketAddr) -> Option<Vec<OwnedFd>> {
        if bind.port() == 0 || bind != self.bind {
            return None;
        }
        let sockets = udp::adopt(self.adoptable.as_ref()?);
        // Taken once: the listener that adopts them is the one to hand them on.
        self.adoptable = None;
        (!sockets.is_empty()).then_some(sockets)
    }

    /// Its connections still open (its accept loops, stopped, hold no permit).
    pub fn open_connections(&self) -> usize {
        if !self.counted {
            return 0;
        }
        (self.permits as usize).saturating_sub(self.connections.available_permits())
    }

    pub fn is_done(&self) -> bool {
        self.connections.available_permits() >= self.permits as usize
    }

    /// Resolves once every connection has closed.
    pub async fn closed(&self) {
        let _ = self.connections.acquire_many(self.permits).await;
    }
}

/// What a running process hands a new one (`crate::upgrade`): every listening socket,
/// the admin listener's, and the sticky-session key.
pub struct Handover {
    pub listeners: Vec<HandedListener>,
    /// The admin listener's configured bind and socket.
    pub admin: Option<(SocketAddr, std::net::TcpListener)>,
    pub sticky_key: [u8; 16],
}

/// A listener's sockets, with the name, configured bind and kind the new process matches
/// on.
pub struct HandedListener {
    pub name: String,
    pub bind: SocketAddr,
    pub kind: SocketKind,
    pub sockets: Vec<OwnedFd>,
}

/// `count` listening sockets on `addr` (its port chosen once if it is 0), one per worker.
///
/// `SO_REUSEPORT` would also let another process bind the same address and silently take
/// a share of its connections, so the address is first bound without it, which fails if
/// anything listens there already, and let go just before the worker sockets take it.
fn bind_each(
    addr: SocketAddr,
    defer_accept: Option<Duration>,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let probe = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    probe.set_reuse_address(true)?;
    // Bound, never listening: no connection can land on it.
    probe.bind(&addr.into())?;
    let addr = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("a bound socket without an address"))?;
    drop(probe);
    (0..count.max(1))
        .map(|_| bind(addr, defer_accept))
        .collect()
}

/// `count` UDP sockets on `addr` (its port chosen once if it is 0), one per worker, as
/// [`bind_each`] binds TCP ones: a probe without `SO_REUSEPORT` first makes sure nothing
/// else has the address. (A TCP listener on the same address and port is no obstacle.)
fn bind_each_udp(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    let probe = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        None,
    )?;
    probe.bind(&addr.into())?;
    let addr = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("a bound socket without an address"))?;
    drop(probe);
    (0..count.max(1))
        .map(|_| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::DGRAM,
                None,
            )?;
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            // Room for bursts of datagrams between two turns of the loop; the kernel caps
            // it at net.core.rmem_max, and a smaller buffer still works.
            let _ = socket.set_recv_buffer_size(UDP_RECEIVE_BUFFER);
            socket.bind(&addr.into())?;
            Ok(socket.into())
        })
        .collect()
}

const UDP_RECEIVE_BUFFER: usize = 1 << 20;

/// A listening socket. With `defer_accept`, the kernel hands over a connection only once its
/// first bytes have arrived (or `defer_accept` has passed): a connecting client that sends
/// nothing costs no wakeup, and the first read finds the request there.
fn bind(addr: SocketAddr, defer_accept: Option<Duration>) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    // Lets a restarted Fulcrum bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    if defer_accept.is_some() {
        set_defer_accept(&socket, defer_accept)?;
    }
    socket.listen(4096)?;
    Ok(socket.into())
}

#[cfg(target_os = "linux")]
fn set_defer_accept(socket: &socket2::Socket, wait: Option<Duration>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // 0 turns it off.
    let seconds = wait.map_or(0, |wait| {
        libc::c_int::try_from(wait.as_secs().max(1)).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: a valid socket descriptor, and a pointer to a c_int with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&seconds as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_defer_accept(_socket: &socket2::Socket, _wait: Option<Duration>) -> io::Result<()> {
    Ok(())
}

/// A classic BPF program for a listening TCP socket, which sees each packet from its TCP
/// header on: a SYN is dropped, anything else (the last ACK of a handshake under way) goes
/// through. Dropped, not refused: the client sends its SYN again, a refused one would fail.
#[cfg(target_os = "linux")]
const DROP_SYN: [socket2::SockFilter; 4] = {
    use socket2::SockFilter;
    const TCP_FLAGS_OFFSET: u32 = 13;
    const SYN: u32 = 0x02;
    [
        // A = the flags byte.
        SockFilter::new(
            (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16,
            0,
            0,
            TCP_FLAGS_OFFSET,
        ),
        // SYN set: on to the next instruction, else skip it.
        SockFilter::new(
            (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16,
            0,
            1,
            SYN,
        ),
        SockFilter::new((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, 0),
        SockFilter::new((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, u32::MAX),
    ]
};

/// Has the kernel drop new connections' SYNs for `socket` (the socket, not this copy of
/// its descriptor), until [`take_new_connections`].
#[cfg(target_os = "linux")]
fn drop_new_connections(socket: &impl AsFd) -> io::Result<()> {
    socket2::SockRef::from(socket).attach_filter(&DROP_SYN)
}

/// Takes the filter of [`drop_new_connections`] off `socket` (none there is fine).
#[cfg(target_os = "linux")]
fn take_new_connections(socket: &impl AsFd) -> io::Result<()> {
    match socket2::SockRef::from(socket).detach_filter() {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        result => result,
    }
}

/// How many connections the kernel has accepted for `socket` that no `accept` took yet
/// (0 if it cannot tell).
#[cfg(target_os = "linux")]
fn accept_queue(socket: &impl AsFd) -> usize {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain C struct, for which zero bytes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket descriptor, and a buffer of `len` bytes the call may fill.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // For a listening socket, Linux reports its accept queue's length as `tcpi_unacked`.
    if rc == 0 {
        info.tcpi_unacked as usize
    } else {
        0
    }
}

#[cfg(not(target_os = "linux"))]
fn drop_new_connections(_socket: &impl AsFd) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "socket filters need Linux",
    ))
}

#[cfg(not(target_os = "linux"))]
fn take_new_connections(_socket: &impl AsFd) -> io::Result<()> {
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn accept_queue(_socket: &impl AsFd) -> usize {
    0
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    const WAIT: Duration = Duration::from_secs(5);

    fn listening(defer_accept: Option<Duration>) -> (std::net::TcpListener, SocketAddr) {
        listening_on("127.0.0.1:0", defer_accept)
    }

    fn listening_on(
        addr: &str,
        defer_accept: Option<Duration>,
    ) -> (std::net::TcpListener, SocketAddr) {
        let socket = bind(addr.parse().unwrap(), defer_accept).unwrap();
        let addr = socket.local_addr().unwrap();
        (socket, addr)
    }

    /// Accepts one connection within `WAIT`, however the socket is set.
    fn accept_one(socket: &std::net::TcpListener) -> std::net::TcpStream {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            match socket.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    stream.set_read_timeout(Some(WAIT)).unwrap();
                    return stream;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "nothing to accept");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(300))?;
        stream.set_read_timeout(Some(WAIT))?;
        Ok(stream)
    }

    fn echo_once(client: &mut TcpStream, server: &mut TcpStream, text: &[u8]) {
        client.write_all(text).unwrap();
        let mut buf = vec![0u8; text.len()];
        server.read_exact(&mut buf).unwrap();
        server.write_all(&buf).unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(buf, text);
    }

    #[test]
    fn a_paused_socket_neither_accepts_nor_refuses_a_new_connection_and_serves_the_old_ones() {
        let (socket, addr) = listening(None);
        let mut before = connect(addr).unwrap();
        let mut accepted_before = accept_one(&socket);
        let mut queued = connect(addr).unwrap();

        drop_new_connections(&socket).unwrap();
        let started = std::time::Instant::now();
        let error = connect(addr).expect_err("a paused socket took a new connection");
        assert_eq!(
            error.kind(),
            io::ErrorKind::TimedOut,
            "dropped, not refused: {error}"
        );
        assert!(started.elapsed() >= Duration::from_millis(250));
        // Accepted before the pause, and accepted from the queue during it: both served.
        echo_once(&mut before, &mut accepted_before, b"before");
        let mut accepted_queued = accept_one(&socket);
        echo_once(&mut queued, &mut accepted_queued, b"queued");

        take_new_connections(&socket).unwrap();
        let mut after = connect(addr).expect("a resumed socket takes connections");
        let mut accepted_after = accept_one(&socket);
        echo_once(&mut after, &mut accepted_after, b"after");
        // Resuming twice is fine.
        take_new_connections(&socket).unwrap();
    }

    #[test]
    fn over_ipv6_too_a_paused_socket_drops_new_connections_and_lets_handshakes_complete() {
        let (socket, addr) = listening_on("[::1]:0", Some(Duration::from_secs(5)));
        let mut under_way = connect(addr).unwrap();
        drop_new_connections(&socket).unwrap();
        let error = connect(addr).expect_err("a paused socket took a new connection");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
        under_way.write_all(b"request").unwrap();
        let mut accepted = accept_one(&socket);
        let mut buf = [0u8; 7];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"request");
        echo_once(&mut under_way, &mut accepted, b"served");
        take_new_connections(&socket).unwrap();
        connect(addr).expect("a resumed socket takes connections");
    }

    #[test]
    fn a_handshake_under_way_at_the_pause_completes() {
        // With TCP_DEFER_ACCEPT the kernel keeps a connection half-open until its first
        // bytes arrive: the pause falls between the client's SYN and its last ACK.
        let (socket, addr) = listening(Some(Duration::from_secs(5)));
        let mut client = connect(addr).unwrap();
        assert_eq!(accept_queue(&socket), 0, "not accepted before its bytes");
        drop_new_connections(&socket).unwrap();
        client.write_all(b"request").unwrap();
        let mut server = accept_one(&socket);
        let mut buf = [0u8; 7];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"request");
        server.write_all(b"answer").unwrap();
        let mut buf = [0u8; 6];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"answer");
    }

    #[test]
    fn the_accept_queue_counts_connections_no_loop_took_yet() {
        let (socket, addr) = listening(None);
        assert_eq!(accept_queue(&socket), 0);
        let _clients: Vec<TcpStream> = (0..3).map(|_| connect(addr).unwrap()).collect();
        let deadline = std::time::Instant::now() + WAIT;
        while accept_queue(&socket) < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "{}",
                accept_queue(&socket)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let _accepted = accept_one(&socket);
        assert_eq!(accept_queue(&socket), 2);
    }
}
