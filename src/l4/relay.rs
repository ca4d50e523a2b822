//! The byte relay of an L4 TCP connection: both directions of one client–server pair in one
//! future, a FIN or a reset passed on as it came, an idle timeout, and no buffer held while a
//! tunnel is idle.
//!
//! Bytes move through a chunk (a 64 KiB buffer, or a pipe for `splice(2)`) borrowed from a
//! per-thread spare list for one read and its write; a direction keeps the chunk only while
//! the other side has not yet taken all of it. So an idle tunnel holds no chunk and no pipe
//! (measured: 1.5 KiB of memory and its two sockets), a busy one at most one chunk per
//! direction (which is also what bounds it when a reader is slow: nothing more is read until
//! the chunk is written), and a worker keeps at most `SPARES_KEPT` spares of each kind.
//!
//! The copy strategies were measured against each other (`benches/relay.rs`, figures in
//! `notes/relay.md`): [`relay`] copies small reads through a buffer and splices large ones;
//! [`relay_with`] lets the bench and the tests pick one way for all.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::server::worker;

/// How a relayed connection ended.
#[derive(Debug)]
pub enum End {
    /// Both sides closed (each FIN passed on to the other).
    Closed,
    /// The client reset the connection; the server was reset too.
    ClientReset,
    /// The server reset it; the client was reset too.
    ServerReset,
    /// Nothing moved either way for `idle_timeout`; both closed.
    Idle,
    /// The client's first bytes were refused by `check_first`; both reset.
    Refused,
    /// Cut by [`cut_tunnels`] as the process exits; both reset.
    Shutdown,
    /// Another error on either side (the error as text, which side).
    Failed(String),
}

/// What a check on the client's first bytes makes of them (see [`relay`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBytes {
    /// Reset both sides; nothing reaches the server.
    Refuse,
    /// Relay them and everything after, unchecked.
    Pass,
    /// Hold them and look again once more have come.
    NeedMore,
}

/// A check on the client's first bytes; see [`relay`].
pub type FirstCheck = fn(&[u8]) -> FirstBytes;

pub struct Relayed {
    /// Bytes from the client passed to the server, and from the server to the client.
    pub from_client: u64,
    pub from_server: u64,
    pub end: End,
}

/// How bytes get from one socket to the other.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// `recv` into a user-space buffer, `send` from it.
    Buffered,
    /// `splice(2)` from the socket into a pipe and from the pipe into the other socket: the
    /// bytes never reach user space.
    Splice,
    /// Each read done the way the last one's size favours: buffered after a read of less
    /// than `SPLICE_AT_LEAST`, spliced after a larger one. Small messages then take the
    /// fewest syscalls (a short `recv` tells that the socket is drained, a splice cannot),
    /// and bulk is not copied.
    Adaptive,
}

/// The strategy [`relay`] uses. Measured on loopback (`notes/relay.md`): as cheap as the
/// buffered copy on small messages (splice alone costs 18% more CPU there), and 23–32% less
/// CPU per byte than it on 100 KiB and 10 MiB transfers (splice alone: 20–22% less).
const CHOSEN: Strategy = Strategy::Adaptive;

/// The most a buffered read takes in; also the most a direction holds in a buffer while its
/// reader is slow.
const CHUNK: usize = 64 * 1024;

/// The size asked for each pipe, and the most a splice read takes in. Four times the default
/// pipe: fewer syscalls per byte (measured: 7–29% more bytes per CPU-second on bulk). While a slow
/// reader holds a pipe full, it holds references to pages the kernel had already received,
/// not copies. If the kernel refuses the size (a user's pipe quota), the pipe stays smaller
/// and splices move less at a time.
const PIPE_SIZE: usize = 256 * 1024;

/// Below this a splice read costs more than a buffered one (see `Strategy::Adaptive`).
const SPLICE_AT_LEAST: usize = 16 * 1024;

/// Spare buffers (and spare pipes) a worker thread keeps for the next read; beyond that a
/// freed one is given back to the allocator (or closed).
const SPARES_KEPT: usize = 16;

/// Far enough to be "never" for an idle timeout, and safe to add to an `Instant`.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Set once [`cut_tunnels`] was called: the process is about to exit.
static CUTTING: AtomicBool = AtomicBool::new(false);

/// Shards of the tunnels open, by worker, so that opening one touches no lock or cache line
/// another worker's tunnels touch.
static OPEN: [TunnelShard; 16] = [const { TunnelShard::new() }; 16];

#[repr(align(64))]
struct TunnelShard {
    /// Wakes this shard's relays to be cut.
    cut: Notify,
    /// Tunnels open (until their [`Tunnel`] is dropped, after they are logged).
    open: AtomicUsize,
}

impl TunnelShard {
    const fn new() -> Self {
        TunnelShard {
            cut: Notify::const_new(),
            open: AtomicUsize::new(0),
        }
    }
}

/// One open tunnel, counted until dropped, for [`cut_tunnels`] to wait for.
pub struct Tunnel {
    shard: &'static TunnelShard,
}

impl Tunnel {
    /// Counts a tunnel as open on this worker; hold it until the tunnel is logged.
    pub fn open() -> Tunnel {
        let shard = &OPEN[worker() % OPEN.len()];
        shard.open.fetch_add(1, Ordering::Relaxed);
        Tunnel { shard }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.shard.open.fetch_sub(1, Ordering::Release);
    }
}

/// Resets every tunnel still open (both peers see a reset, not a clean end that would let
/// them take a cut stream for a whole one), and waits at most `within` for them to end and be
/// logged. For the end of `shutdown_grace`, just before the process exits.
pub async fn cut_tunnels(within: Duration) {
    CUTTING.store(true, Ordering::SeqCst);
    for shard in &OPEN {
        shard.cut.notify_waiters();
    }
    let deadline = Instant::now() + within;
    while OPEN
        .iter()
        .map(|s| s.open.load(Ordering::Acquire))
        .sum::<usize>()
        > 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Relays bytes both ways between `client` and `server` until both directions are done, one
/// side resets, or nothing moves for `idle_timeout`. `check_first`, if given, sees the
/// first bytes read from the client (before they go anywhere) and refuses the connection,
/// lets it pass, or asks for more (used to refuse a PROXY protocol header from an untrusted
/// client, however it is cut into segments).
///
/// While the check asks for more, what was read is held (not sent on) and the next read is
/// appended to it; the check should ask only while the bytes are a strict prefix of a short
/// signature, since a client that sends such a prefix and waits for an answer gets none
/// until the idle timeout. Reads made while undecided do not count as activity, so that is
/// as long as it can be held up. If the client closes while undecided, what it sent goes on.
/// The server's bytes flow meanwhile (for protocols in which the server speaks first).
///
/// A write to a socket whose peer has gone may raise SIGPIPE when splicing; Rust programs
/// ignore SIGPIPE unless they ask otherwise (buffered writes pass `MSG_NOSIGNAL` anyway).
pub async fn relay(
    client: TcpStream,
    server: TcpStream,
    idle_timeout: Duration,
    check_first: Option<FirstCheck>,
) -> Relayed {
    relay_with(CHOSEN, client, server, idle_timeout, check_first).await
}

/// [`relay`] with the copy strategy chosen by the caller; for the bench and the tests.
#[doc(hidden)]
pub async fn relay_with(
    strategy: Strategy,
    client: TcpStream,
    server: TcpStream,
    idle_timeout: Duration,
    check_first: Option<FirstCheck>,
) -> Relayed {
    // Each write carries what one read brought; with Nagle on, a small one could wait behind
    // an unacknowledged one (40 ms, against a delayed ACK) where the sender meant none.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut from_client = Direction::new(strategy, Side::Client, check_first);
    let mut from_server = Direction::new(strategy, Side::Server, None);
    let idle_timeout = idle_timeout.min(NEVER);
    let mut last_activity = Instant::now();
    // One timer for the whole tunnel, moved only when it fires: a busy tunnel does not touch
    // the timer wheel on every read, it only notes the time once per wake-up.
    let idle = tokio::time::sleep_until(last_activity + idle_timeout);
    tokio::pin!(idle);
    // Polled once, to leave the task's waker with the shard's `Notify` (a lock, once per
    // tunnel); later wake-ups look only at `CUTTING`, an atomic, so that the hot path takes
    // no lock.
    let cut = OPEN[worker() % OPEN.len()].cut.notified();
    tokio::pin!(cut);
    cut.as_mut().enable();
    let mut cut_waiting = true;

    // Once a side's FIN is passed on, nothing reads from it, so a reset it sends later would
    // only be seen when the other direction next writes to it: watched for instead (boxed:
    // only half-closed tunnels need it).
    let mut client_reset: Option<ResetWatch<'_>> = None;
    let mut server_reset: Option<ResetWatch<'_>> = None;

    let stop = poll_fn(|cx| {
        if cut_waiting {
            cut_waiting = cut.as_mut().poll(cx).is_pending();
        }
        if !cut_waiting || CUTTING.load(Ordering::Relaxed) {
            return Poll::Ready(Stop::Shutdown);
        }
        let up = from_client.poll(cx, &client, &server);
        if let Poll::Ready(Err(stop)) = up {
            return Poll::Ready(stop);
        }
        let down = from_server.poll(cx, &server, &client);
        if let Poll::Ready(Err(stop)) = down {
            return Poll::Ready(stop);
        }
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(Stop::Closed);
        }
        if from_client.done
            && let Poll::Ready(stop) = watch_reset(cx, &mut client_reset, &client, Side::Client)
        {
            return Poll::Ready(stop);
        }
        if from_server.done
            && let Poll::Ready(stop) = watch_reset(cx, &mut server_reset, &server, Side::Server)
        {
            return Poll::Ready(stop);
        }
        if std::mem::take(&mut from_client.moved_any) | std::mem::take(&mut from_server.moved_any) {
            last_activity = Instant::now();
        }
        loop {
            ready!(idle.as_mut().poll(cx));
            let deadline = last_activity + idle_timeout;
            if Instant::now() >= deadline {
                return Poll::Ready(Stop::Idle);
            }
            idle.as_mut().reset(deadline);
        }
    })
    .await;

    let end = match stop {
        Stop::Closed => End::Closed,
        Stop::Idle => End::Idle,
        Stop::Refused => {
            reset(&client);
            reset(&server);
            End::Refused
        }
        Stop::Shutdown => {
            reset(&client);
            reset(&server);
            End::Shutdown
        }
        Stop::Io(side, error) if is_reset(&error) => match side {
            Side::Client => {
                reset(&server);
                End::ClientReset
            }
            Side::Server => {
                reset(&client);
                End::ServerReset
            }
        },
        Stop::Io(side, error) => {
            // The connection broke some other way: neither peer should take it for a clean end.
            reset(&client);
            reset(&server);
            End::Failed(format!("{}: {error}", side.name()))
        }
    };
    Relayed {
        from_client: from_client.written,
        from_server: from_server.written,
        end,
    }
}

type ResetWatch<'a> =
    std::pin::Pin<Box<dyn Future<Output = io::Result<tokio::io::Ready>> + Send + 'a>>;

/// Ready with the error once `stream` (whose FIN was passed on) reports one, a reset say.
fn watch_reset<'a>(
    cx: &mut Context<'_>,
    watch: &mut Option<ResetWatch<'a>>,
    stream: &'a TcpStream,
    side: Side,
) -> Poll<Stop> {
    // Bounded: each turn either ends, or clears the readiness it saw (so the next waits).
    for _ in 0..4 {
        let ready = watch.get_or_insert_with(|| Box::pin(stream.ready(Interest::ERROR)));
        if let Err(e) = ready!(ready.as_mut().poll(cx)) {
            return Poll::Ready(Stop::Io(side, e));
        }
        *watch = None;
        let error = stream.try_io(Interest::ERROR, || match stream.take_error()? {
            Some(error) => Ok(error),
            None => Err(io::ErrorKind::WouldBlock.into()),
        });
        match error {
            Ok(error) => return Poll::Ready(Stop::Io(side, error)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Stop::Io(side, e)),
        }
    }
    // Readiness that keeps coming without an error: look again on the next wake-up.
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Makes the coming close of `stream` send RST instead of FIN.
fn reset(stream: &TcpStream) {
    // Failing leaves a FIN, the best that can be done then.
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

fn is_reset(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            // shutdown(2) of a socket whose peer already reset it
            | io::ErrorKind::NotConnected
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

enum Stop {
    Closed,
    Idle,
    Refused,
    Shutdown,
    Io(Side, io::Error),
}

/// Bytes read from one side and not yet all written to the other.
enum Held {
    Nothing,
    Buffer {
        buffer: Box<[u8]>,
        start: usize,
        end: usize,
    },
    Pipe {
        pipe: Pipe,
        len: usize,
    },
}

/// One direction of the tunnel: reads from `source`, writes to the other side.
struct Direction {
    strategy: Strategy,
    source: Side,
    /// Until the check has decided; while it has not, `held` is what was read so far.
    check_first: Option<FirstCheck>,
    held: Held,
    /// Whether the next read splices: always with `Splice`, never with `Buffered`, as the
    /// last read's size says with `Adaptive`.
    splicing: bool,
    /// The source sent FIN (a read returned 0).
    source_done: bool,
    /// The FIN was passed on: nothing more to do this way.
    done: bool,
    /// Something was read or written since the relay last looked.
    moved_any: bool,
    written: u64,
}

impl Direction {
    fn new(strategy: Strategy, source: Side, check_first: Option<FirstCheck>) -> Self {
        Direction {
            strategy,
            source,
            check_first,
            held: Held::Nothing,
            splicing: strategy == Strategy::Splice,
            source_done: false,
            done: false,
            moved_any: false,
            written: 0,
        }
    }

    /// Moves bytes from `source` to `sink` until one of them would block (pending) or this
    /// direction is done (ready). Each readiness poll counts against tokio's cooperative
    /// budget, so a fast stream cannot keep the worker from its other connections.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        source: &TcpStream,
        sink: &TcpStream,
    ) -> Poll<Result<(), Stop>> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        let sink_side = self.source.other();
        loop {
            if !matches!(self.held, Held::Nothing) && self.check_first.is_none() {
                ready!(sink.poll_write_ready(cx)).map_err(|e| Stop::Io(sink_side, e))?;
                match self.write(sink) {
                    Ok(n) => {
                        self.written += n as u64;
                        self.moved_any = true;
                    }
                    Err(e) if retry(&e) => {}
                    Err(e) => return Poll::Ready(Err(Stop::Io(sink_side, e))),
                }
            } else if self.source_done {
                if !matches!(self.held, Held::Nothing) {
                    // Closed before the check could decide: what came is no header.
                    self.check_first = None;
                    continue;
                }
                SockRef::from(sink)
                    .shutdown(Shutdown::Write)
                    .map_err(|e| Stop::Io(sink_side, e))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            } else {
                ready!(source.poll_read_ready(cx)).map_err(|e| Stop::Io(self.source, e))?;
                match self.read(source) {
                    Ok(0) => self.source_done = true,
                    // Bytes held for the check are not activity yet (see `relay`).
                    Ok(_) => self.moved_any |= self.check_first.is_none(),
                    Err(e) if retry(&e) => {}
                    Err(e) => return Poll::Ready(Err(Stop::Io(self.source, e))),
                }
                if let Some(check) = self.check_first
                    && let Held::Buffer { buffer, start, end } = &self.held
                {
                    match check(&buffer[*start..*end]) {
                        FirstBytes::Refuse => return Poll::Ready(Err(Stop::Refused)),
                        FirstBytes::Pass => self.check_first = None,
                        // A check that would hold a whole chunk is not guarding a signature.
                        FirstBytes::NeedMore if *end == buffer.len() => {
                            return Poll::Ready(Err(Stop::Refused));
                        }
                        FirstBytes::NeedMore => {}
                    }
                }
            }
        }
    }

    /// Reads once from `source` into a chunk taken from the spares (left in `held` if
    /// anything was read). Returns the count, 0 at FIN.
    fn read(&mut self, source: &TcpStream) -> io::Result<usize> {
        // Only while the check asks for more: a few bytes held, and room after them.
        if let Held::Buffer { buffer, end, .. } = &mut self.held {
            let read = read_some(source, &mut buffer[*end..])?;
            *end += read;
            return Ok(read);
        }
        // A read with a check to make is buffered whatever the strategy: the check must see
        // the bytes.
        if self.splicing && self.check_first.is_none() {
            // Without a pipe (out of descriptors) this read falls back to a buffer.
            if let Ok(pipe) = take_pipe() {
                let read = source.try_io(Interest::READABLE, || {
                    splice(source.as_fd(), pipe.write.as_fd(), PIPE_SIZE)
                });
                match read {
                    Ok(len) if len > 0 => {
                        self.held = Held::Pipe { pipe, len };
                        if self.strategy == Strategy::Adaptive && len < SPLICE_AT_LEAST {
                            self.splicing = false;
                        }
                    }
                    _ => give_pipe(pipe),
                }
                return read;
            }
        }
        let mut buffer = take_buffer();
        let read = read_some(source, &mut buffer);
        match read {
            Ok(len) if len > 0 => {
                self.held = Held::Buffer {
                    buffer,
                    start: 0,
                    end: len,
                };
                if self.strategy == Strategy::Adaptive && len >= SPLICE_AT_LEAST {
                    self.splicing = true;
                }
            }
            _ => give_buffer(buffer),
        }
        read
    }

    /// Writes what `held` holds to `sink`, once; gives the chunk back to the spares when all
    /// of it is written.
    fn write(&mut self, sink: &TcpStream) -> io::Result<usize> {
        match &mut self.held {
            Held::Nothing => Ok(0),
            Held::Buffer { buffer, start, end } => {
                let n = write_some(sink, &buffer[*start..*end])?;
                *start += n;
                if start == end
                    && let Held::Buffer { buffer, .. } =
                        std::mem::replace(&mut self.held, Held::Nothing)
                {
                    give_buffer(buffer);
                }
                Ok(n)
            }
            Held::Pipe { pipe, len } => {
                let n = sink.try_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_fd(), sink.as_fd(), *len)
                })?;
                if n == 0 {
                    // The pipe is empty though it should hold `len` bytes: stop rather than
                    // spin on a write that can never progress.
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "relay pipe lost its bytes",
                    ));
                }
                *len -= n;
                if *len == 0
                    && let Held::Pipe { pipe, .. } =
                        std::mem::replace(&mut self.held, Held::Nothing)
                {
                    give_pipe(pipe);
                }
                Ok(n)
            }
        }
    }
}

/// An error after which the loop polls readiness again rather than giving up.
fn retry(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

fn read_some(source: &TcpStream, buffer: &mut [u8]) -> io::Result<usize> {
    crate::transport::recv_into(source, buffer)
}

fn write_some(sink: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    crate::transport::send(sink, &[io::IoSlice::new(bytes)])
}

/// A pipe for `splice(2)`: both ends non-blocking. It costs two descriptors and, while it
/// holds bytes, references to their pages (no copy of them).
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let _ = nix::fcntl::fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
        Ok(Pipe { read, write })
    }
}

/// Moves up to `len` bytes from `from` to `to`, one of which must be a pipe, without copying
/// them through user space. Non-blocking on the pipe; the socket is non-blocking already.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed, so open for the whole call; null offsets are
    // what pipes and sockets require (they have no position), and no memory is passed.
    let moved = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if moved < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(moved as usize)
    }
}

thread_local! {
    static SPARE_BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    static SPARE_PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer() -> Box<[u8]> {
    SPARE_BUFFERS
        .try_with(|spares| spares.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| vec![0; CHUNK].into_boxed_slice())
}

fn give_buffer(buffer: Box<[u8]>) {
    let _ = SPARE_BUFFERS.try_with(|spares| {
        let mut spares = spares.borrow_mut();
        if spares.len() < SPARES_KEPT {
            spares.push(buffer);
        }
    });
}

fn take_pipe() -> io::Result<Pipe> {
    match SPARE_PIPES.try_with(|spares| spares.borrow_mut().pop()) {
        Ok(Some(pipe)) => Ok(pipe),
        _ => Pipe::new(),
    }
}

/// Keeps an empty pipe for the next read (a pipe with bytes left in it is never given back).
fn give_pipe(pipe: Pipe) {
    let _ = SPARE_PIPES.try_with(|spares| {
        let mut spares = spares.borrow_mut();
        if spares.len() < SPARES_KEPT {
            spares.push(pipe);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{ProptestConfig, any, proptest};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpSocket};
    use tokio::task::JoinHandle;
    use tokio::time::timeout;

    const ALL: [Strategy; 3] = [Strategy::Buffered, Strategy::Splice, Strategy::Adaptive];
    /// Generous: two noisy cores.
    const WAIT: Duration = Duration::from_secs(20);

    /// A connected pair of sockets on loopback; `buffer`, if given, fixes both socket buffer
    /// sizes of both ends (which turns off the kernel's autotuning).
    async fn pair(buffer: Option<u32>) -> (TcpStream, TcpStream) {
        let listen = TcpSocket::new_v4().unwrap();
        let connect = TcpSocket::new_v4().unwrap();
        if let Some(size) = buffer {
            for socket in [&listen, &connect] {
                socket.set_recv_buffer_size(size).unwrap();
                socket.set_send_buffer_size(size).unwrap();
            }
        }
        listen.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener: TcpListener = listen.listen(16).unwrap();
        let address = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(connect.connect(address), listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    struct Tunnel {
        client: TcpStream,
        server: TcpStream,
        relay: JoinHandle<Relayed>,
    }

    async fn tunnel(
        strategy: Strategy,
        idle_timeout: Duration,
        check_first: Option<FirstCheck>,
        buffer: Option<u32>,
    ) -> Tunnel {
        let (client, relay_client) = pair(buffer).await;
        let (relay_server, server) = pair(buffer).await;
        let relay = tokio::spawn(relay_with(
            strategy,
            relay_client,
            relay_server,
            idle_timeout,
            check_first,
        ));
        Tunnel {
            client,
            server,
            relay,
        }
    }

    async fn finished(relay: JoinHandle<Relayed>) -> Relayed {
        timeout(WAIT, relay).await.expect("relay ended").unwrap()
    }

    async fn read_all(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        timeout(WAIT, stream.read_to_end(&mut bytes))
            .await
            .expect("read ended")?;
        Ok(bytes)
    }

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut bytes = vec![0; len];
        rng.fill(&mut bytes);
        bytes
    }

    #[tokio::test]
    async fn client_half_close_lets_the_server_answer() {
        for strategy in ALL {
            let Tunnel {
                mut client,
                mut server,
                relay,
            } = tunnel(strategy, WAIT, None, None).await;
            client.write_all(b"request").await.unwrap();
            client.shutdown().await.unwrap();
            assert_eq!(read_all(&mut server).await.unwrap(), b"request");

            // The server reads FIN and only then answers, at length, and closes.
            let answer = noise(1, 300_000);
            server.write_all(&answer).await.unwrap();
            drop(server);
            assert!(
                read_all(&mut client).await.unwrap() == answer,
                "{strategy:?}"
            );

            let relayed = finished(relay).await;
            assert!(matches!(relayed.end, End::Closed), "{:?}", relayed.end);
            assert_eq!((relayed.from_client, relayed.from_server), (7, 300_000));
        }
    }

    #[tokio::test]
    async fn server_half_close_lets_the_client_go_on() {
        for strategy in ALL {
            let Tunnel {
                mut client,
                mut server,
                relay,
            } = tunnel(strategy, WAIT, None, None).await;
            server.write_all(b"greeting").await.unwrap();
            server.shutdown().await.unwrap();
            assert_eq!(read_all(&mut client).await.unwrap(), b"greeting");

            let upload = noise(2, 300_000);
            client.write_all(&upload).await.unwrap();
            client.shutdown().await.unwrap();
            assert!(
                read_all(&mut server).await.unwrap() == upload,
                "{strategy:?}"
            );

            let relayed = finished(relay).await;
            assert!(matches!(relayed.end, End::Closed), "{:?}", relayed.end);
            assert_eq!((relayed.from_client, relayed.from_server), (300_000, 8));
        }
    }

    /// `reset_by` sends a byte through, then closes with SO_LINGER 0; the peer on the other
    /// side must see a reset, not FIN.
    async fn reset_passes_on(strategy: Strategy, client_resets: bool) -> Relayed {
        let Tunnel {
            client,
            server,
            relay,
        } = tunnel(strategy, WAIT, None, None).await;
        let (resetter, mut other) = if client_resets {
            (client, server)
        } else {
            (server, client)
        };
        resetter.try_write(b"x").unwrap();
        let mut byte = [0; 1];
        timeout(WAIT, other.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        SockRef::from(&resetter)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(resetter);
        let error = read_all(&mut other).await.expect_err("a reset, not FIN");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{strategy:?}");
        finished(relay).await
    }

    #[tokio::test]
    async fn client_reset_resets_the_server() {
        for strategy in ALL {
            let relayed = reset_passes_on(strategy, true).await;
            assert!(matches!(relayed.end, End::ClientReset), "{:?}", relayed.end);
            assert_eq!(relayed.from_client, 1);
        }
    }

    #[tokio::test]
    async fn server_reset_resets_the_client() {
        for strategy in ALL {
            let relayed = reset_passes_on(strategy, false).await;
            assert!(matches!(relayed.end, End::ServerReset), "{:?}", relayed.end);
            assert_eq!(relayed.from_server, 1);
        }
    }

    #[tokio::test]
    async fn a_reset_after_a_half_close_is_passed_on_at_once() {
        for strategy in ALL {
            for client_resets in [true, false] {
                let Tunnel {
                    client,
                    server,
                    relay,
                } = tunnel(strategy, WAIT, None, None).await;
                let (mut resetter, mut other) = if client_resets {
                    (client, server)
                } else {
                    (server, client)
                };
                // A FIN, passed on; the other side says nothing back.
                resetter.shutdown().await.unwrap();
                assert_eq!(read_all(&mut other).await.unwrap(), b"");
                SockRef::from(&resetter)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(resetter);
                // Reads give 0 since the FIN, so the reset shows as the socket's error.
                let ready = timeout(Duration::from_secs(5), other.ready(Interest::ERROR)).await;
                ready.expect("the reset was not passed on").unwrap();
                let error = other.take_error().unwrap().expect("a reset");
                // Linux reports a reset on a socket that had its FIN as EPIPE (CLOSE_WAIT).
                assert!(
                    matches!(
                        error.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ),
                    "{strategy:?}: {error}"
                );
                let relayed = finished(relay).await;
                let expected = if client_resets {
                    "ClientReset"
                } else {
                    "ServerReset"
                };
                assert_eq!(format!("{:?}", relayed.end), expected, "{strategy:?}");
            }
        }
    }

    #[tokio::test]
    async fn write_to_a_reset_peer_resets_the_other() {
        // The client closes for good (FIN) while the server still talks: the client's kernel
        // answers the next bytes with RST, which the relay passes on to the server.
        for strategy in ALL {
            let Tunnel {
                client,
                mut server,
                relay,
            } = tunnel(strategy, WAIT, None, None).await;
            drop(client);
            assert_eq!(read_all(&mut server).await.unwrap(), b"");
            let mut failed = None;
            for _ in 0..200 {
                if let Err(error) = server.write_all(&[7; 1024]).await {
                    failed = Some(error);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let error = failed.expect("the server's writes fail once the reset is passed on");
            assert!(is_reset(&error), "{error}");
            let relayed = finished(relay).await;
            assert!(matches!(relayed.end, End::ClientReset), "{:?}", relayed.end);
        }
    }

    #[tokio::test]
    async fn idle_tunnel_is_closed_after_the_timeout_from_its_last_byte() {
        for strategy in ALL {
            let idle = Duration::from_millis(300);
            let Tunnel {
                mut client,
                mut server,
                relay,
            } = tunnel(strategy, idle, None, None).await;
            // Activity for twice the timeout keeps it open.
            let mut byte = [0; 1];
            for _ in 0..4 {
                tokio::time::sleep(idle / 2).await;
                client.write_all(b"k").await.unwrap();
                timeout(WAIT, server.read_exact(&mut byte))
                    .await
                    .unwrap()
                    .unwrap();
            }
            let last = std::time::Instant::now();
            let relayed = finished(relay).await;
            let waited = last.elapsed();
            assert!(matches!(relayed.end, End::Idle), "{:?}", relayed.end);
            assert!(waited >= idle / 2, "closed {waited:?} after the last byte");
            assert_eq!(relayed.from_client, 4);
            // Both are closed cleanly.
            assert_eq!(read_all(&mut client).await.unwrap(), b"");
            assert_eq!(read_all(&mut server).await.unwrap(), b"");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_transfers_both_ways_at_once_arrive_intact() {
        const SIZE: usize = 4 << 20;
        for strategy in ALL {
            let Tunnel {
                client,
                server,
                relay,
            } = tunnel(strategy, WAIT, None, None).await;
            let (up, down) = (noise(3, SIZE), noise(4, SIZE));
            let exchange = |mut stream: TcpStream, out: Vec<u8>| {
                tokio::spawn(async move {
                    let (mut reader, mut writer) = stream.split();
                    let mut received = Vec::with_capacity(SIZE);
                    let send = async {
                        writer.write_all(&out).await?;
                        writer.shutdown().await
                    };
                    let (sent, read) = tokio::join!(send, reader.read_to_end(&mut received));
                    sent.and(read).map(|_| received)
                })
            };
            let at_server = exchange(server, down.clone());
            let at_client = exchange(client, up.clone());
            let at_server = timeout(WAIT, at_server).await.unwrap().unwrap().unwrap();
            let at_client = timeout(WAIT, at_client).await.unwrap().unwrap().unwrap();
            assert!(at_server == up, "{strategy:?}: client → server differs");
            assert!(at_client == down, "{strategy:?}: server → client differs");
            let relayed = finished(relay).await;
            assert!(matches!(relayed.end, End::Closed), "{:?}", relayed.end);
            assert_eq!(relayed.from_client, SIZE as u64);
            assert_eq!(relayed.from_server, SIZE as u64);
        }
    }

    #[tokio::test]
    async fn a_reader_that_stops_stops_the_writer() {
        const BUFFER: u32 = 64 * 1024;
        const CAP: usize = 64 << 20;
        for strategy in ALL {
            let Tunnel {
                mut client,
                mut server,
                relay,
            } = tunnel(strategy, WAIT, None, Some(BUFFER)).await;
            // The server reads nothing; the client writes until nothing has gone for a while.
            let block = noise(5, 16 * 1024);
            let mut written = 0;
            while written < CAP {
                let from = written % block.len();
                match timeout(Duration::from_millis(500), client.write(&block[from..])).await {
                    Ok(n) => written += n.unwrap(),
                    Err(_) => break,
                }
            }
            // Four socket buffers (the kernel doubles each size it is given) and one buffer or
            // pipe in the relay make at most 0.75 MiB (measured: 0.50 to 0.53 MiB); adding
            // half again for kernel slack is still far below what an unbounded relay would
            // swallow.
            let bound = 3 * (8 * (BUFFER as usize) + CHUNK.max(PIPE_SIZE)) / 2;
            assert!(written <= bound, "{strategy:?}: {written} bytes taken in");
            assert!(!relay.is_finished());

            // Now the server reads, and all of it arrives.
            client.shutdown().await.unwrap();
            let received = read_all(&mut server).await.unwrap();
            assert_eq!(received.len(), written, "{strategy:?}");
            // The client wrote `block` over and over, so that is what must arrive.
            assert!(received.chunks(block.len()).all(|c| c == &block[..c.len()]));
            drop(server);
            let relayed = finished(relay).await;
            assert!(matches!(relayed.end, End::Closed), "{:?}", relayed.end);
        }
    }

    /// Refuses what begins like a PROXY protocol v1 header, asks for more while unsure.
    fn refuse_proxy_header(first: &[u8]) -> FirstBytes {
        const SIGNATURE: &[u8] = b"PROXY ";
        if first.starts_with(SIGNATURE) {
            FirstBytes::Refuse
        } else if SIGNATURE.starts_with(first) {
            FirstBytes::NeedMore
        } else {
            FirstBytes::Pass
        }
    }

    #[tokio::test]
    async fn a_signature_cut_into_pieces_is_held_then_refused() {
        for strategy in ALL {
            let Tunnel {
                mut client,
                mut server,
                relay,
            } = tunnel(strategy, WAIT, Some(refuse_proxy_header), None).await;
            for piece in [&b"PR"[..], b"OX", b"Y TCP4 6.6.6.6 10.0.0.2 1000 80\r\n"] {
                client.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let relayed = finished(relay).await;
            assert!(matches!(relayed.end, End::Refused), "{:?}", relayed.end);
            assert_eq!(relayed.from_client, 0);
            let error = read_all(&mut server).await.expect_err("reset");
            assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{strategy:?}");
        }
    }

    #[tokio::test]
    async fn a_prefix_of_the_signature_that_turns_out_otherwise_passes_whole() {
        for strategy in ALL {
            let Tunnel {
                mut client,
                mut server,
                relay,
            } = tunnel(strategy, WAIT, Some(refuse_proxy_header), None).await;
            client.write_all(b"P").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(b"ING\r\n").await.unwrap();
            let mut ping = [0; 6];
            timeout(WAIT, server.read_exact(&mut ping))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&ping, b"PING\r\n", "{strategy:?}");
            // A prefix then FIN: it can no longer become a header, so it goes on.
            client.write_all(b"x").await.unwrap();
            client.shutdown().await.unwrap();
            assert_eq!(read_all(&mut server).await.unwrap(), b"x");
            drop(server);
            let relayed = finished(relay).await;
            assert!(matches!(relayed.end, End::Closed), "{:?}", relayed.end);
            assert_eq!(relayed.from_client, 7);

            let Tunnel {
                mut client,
                mut server,
                relay,
            } = tunnel(strategy, WAIT, Some(refuse_proxy_header), None).await;
            client.write_all(b"PROX").await.unwrap();
            client.shutdown().await.unwrap();
            assert_eq!(
                read_all(&mut server).await.unwrap(),
                b"PROX",
                "{strategy:?}"
            );
            drop(server);
            let relayed = finished(relay).await;
            assert!(matches!(relayed.end, End::Closed), "{:?}", relayed.end);
        }
    }

    #[tokio::test]
    async fn refused_first_bytes_reset_both_and_reach_no_one() {
        for strategy in ALL {
            let Tunnel {
                mut client,
                mut server,
                relay,
            } = tunnel(strategy, WAIT, Some(refuse_proxy_header), None).await;
            client
                .write_all(b"PROXY TCP4 10.0.0.1 10.0.0.2 1000 80\r\nGET / HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            let relayed = finished(relay).await;
            assert!(matches!(relayed.end, End::Refused), "{:?}", relayed.end);
            assert_eq!(relayed.from_client, 0);
            let error = read_all(&mut server).await.expect_err("reset");
            assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
            let error = read_all(&mut client).await.expect_err("reset");
            assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        }
    }

    #[tokio::test]
    async fn accepted_first_bytes_pass_and_the_server_may_speak_first() {
        for strategy in ALL {
            let Tunnel {
                mut client,
                mut server,
                relay,
            } = tunnel(strategy, WAIT, Some(refuse_proxy_header), None).await;
            // A server-first protocol: the check on the client's bytes holds nothing up.
            server.write_all(b"220 ready\r\n").await.unwrap();
            let mut greeting = [0; 11];
            timeout(WAIT, client.read_exact(&mut greeting))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&greeting, b"220 ready\r\n");
            let upload = noise(6, 200_000);
            client.write_all(&upload).await.unwrap();
            client.shutdown().await.unwrap();
            assert!(
                read_all(&mut server).await.unwrap() == upload,
                "{strategy:?}"
            );
            drop(server);
            assert_eq!(read_all(&mut client).await.unwrap(), b"");
            let relayed = finished(relay).await;
            assert!(matches!(relayed.end, End::Closed), "{:?}", relayed.end);
        }
    }

    /// Writes `data` in pieces of the given sizes (cycled), with a yield between pieces so
    /// they tend to arrive as separate segments, then shuts down.
    async fn write_in_pieces(
        stream: &mut tokio::net::tcp::WriteHalf<'_>,
        data: &[u8],
        pieces: &[usize],
    ) {
        let mut at = 0;
        for &piece in pieces.iter().cycle() {
            if at == data.len() {
                break;
            }
            let end = (at + piece).min(data.len());
            stream.write_all(&data[at..end]).await.unwrap();
            at = end;
            tokio::task::yield_now().await;
        }
        stream.shutdown().await.unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn bytes_arrive_identical_however_they_are_cut(
            up_len in 0usize..300_000,
            down_len in 0usize..300_000,
            up_pieces in proptest::collection::vec(1usize..100_000, 1..8),
            down_pieces in proptest::collection::vec(1usize..100_000, 1..8),
            seed in any::<u64>(),
            strategy in 0..ALL.len(),
        ) {
            let strategy = ALL[strategy];
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let Tunnel { mut client, mut server, relay } =
                    tunnel(strategy, WAIT, None, None).await;
                let (up, down) = (noise(seed, up_len), noise(seed ^ 1, down_len));
                let (mut client_read, mut client_write) = client.split();
                let (mut server_read, mut server_write) = server.split();
                let (mut at_server, mut at_client) = (Vec::new(), Vec::new());
                let everything = async {
                    tokio::join!(
                        write_in_pieces(&mut client_write, &up, &up_pieces),
                        write_in_pieces(&mut server_write, &down, &down_pieces),
                        client_read.read_to_end(&mut at_client),
                        server_read.read_to_end(&mut at_server),
                    )
                };
                let (_, _, got_down, got_up) = timeout(WAIT, everything).await.unwrap();
                got_down.unwrap();
                got_up.unwrap();
                assert!(at_server == up && at_client == down);
                let relayed = finished(relay).await;
                assert!(matches!(relayed.end, End::Closed));
                assert_eq!((relayed.from_client, relayed.from_server), (up_len as u64, down_len as u64));
            });
        }
    }
}
