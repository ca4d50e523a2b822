//! Reading and writing on a shared `&Stream` (plain TCP or TLS) through its readiness API,
//! so one task can move bytes both ways on two connections at once without splitting them.

use std::io;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::time::Sleep;

use super::body;
use crate::transport::Stream;

/// Room the first read of a message head asks for: most heads fit, and a connection
/// waiting for its head holds no more than this. A longer head doubles the room.
const HEAD_READ: usize = 2 * 1024;
/// Bodies read in larger steps.
const BODY_READ: usize = 64 * 1024;
/// Body pieces at least this large are written straight from the read buffer, not copied.
const DIRECT_WRITE: usize = 16 * 1024;
/// Buffered output is written once this much has gathered.
const FLUSH_AT: usize = 64 * 1024;

/// Reads what is available into `buf`, waiting up to `idle` for anything to arrive.
/// Returns 0 at end of stream.
pub async fn read_some(stream: &Stream, buf: &mut BytesMut, idle: Duration) -> io::Result<usize> {
    read_with_room(stream, buf, HEAD_READ.max(buf.len()), idle).await
}

/// A connection's one timer for its waits, set anew for each. A timeout made per wait is
/// inserted into tokio's timer wheel and taken out again every time (~350 instructions
/// each way by callgrind); a timer kept armed is moved to a later deadline with an atomic
/// update (the wheel meets the new deadline only when the old one comes up), and only a
/// move to an earlier deadline goes through the wheel.
#[derive(Default)]
pub struct WaitTimer(Option<Pin<Box<Sleep>>>);

impl WaitTimer {
    /// Lets go of the task the timer would wake, for a connection put aside (pooled): a
    /// timer still armed would otherwise keep that task's memory alive, and wake it, when
    /// its deadline comes.
    pub fn forget_task(&mut self) {
        if let Some(sleep) = &mut self.0 {
            let _ = sleep
                .as_mut()
                .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        }
    }

    fn set(&mut self, deadline: Instant) -> Pin<&mut Sleep> {
        let deadline = tokio::time::Instant::from_std(deadline);
        match &mut self.0 {
            Some(sleep) => sleep.as_mut().reset(deadline),
            None => self.0 = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        match &mut self.0 {
            Some(sleep) => sleep.as_mut(),
            None => unreachable!("set just now"),
        }
    }
}

impl std::fmt::Debug for WaitTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WaitTimer")
    }
}

/// Like [`read_some`], waiting up to `idle` on the connection's `timer`; the clock is read
/// only if the read has to wait.
pub async fn read_some_for(
    stream: &Stream,
    buf: &mut BytesMut,
    idle: Duration,
    timer: &mut WaitTimer,
) -> io::Result<usize> {
    read_timed(stream, buf, Err(idle), timer).await
}

/// Like [`read_some`], waiting until `deadline` on the connection's `timer`: a caller
/// holding a deadline reads the clock once for all its reads, and no timer is made per wait.
pub async fn read_some_until(
    stream: &Stream,
    buf: &mut BytesMut,
    deadline: Instant,
    timer: &mut WaitTimer,
) -> io::Result<usize> {
    read_timed(stream, buf, Ok(deadline), timer).await
}

/// Reads, waiting until the deadline (`Ok`) or for the span from the first wait (`Err`).
async fn read_timed(
    stream: &Stream,
    buf: &mut BytesMut,
    mut deadline: Result<Instant, Duration>,
    timer: &mut WaitTimer,
) -> io::Result<usize> {
    make_room(buf, HEAD_READ.max(buf.len()));
    loop {
        match stream.try_read_buf(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let at = match deadline {
                    Ok(at) => at,
                    Err(idle) => Instant::now() + idle,
                };
                deadline = Ok(at);
                let expired = timer.set(at);
                tokio::select! {
                    biased;
                    ready = stream.readable() => ready?,
                    _ = expired => return Err(timed_out()),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Like [`read_some`], with room for a large piece of body.
pub async fn read_body(stream: &Stream, buf: &mut BytesMut, idle: Duration) -> io::Result<usize> {
    read_with_room(stream, buf, BODY_READ, idle).await
}

async fn read_with_room(
    stream: &Stream,
    buf: &mut BytesMut,
    room: usize,
    idle: Duration,
) -> io::Result<usize> {
    make_room(buf, room);
    loop {
        match stream.try_read_buf(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(stream.readable(), idle).await?
            }
            Err(e) => return Err(e),
        }
    }
}

/// Grows `buf` by `room` unless a quarter of that is free already.
fn make_room(buf: &mut BytesMut, room: usize) {
    if buf.capacity() - buf.len() < room / 4 {
        buf.reserve(room);
    }
}

/// Waits up to `idle` for the stream to have something to read (or to be closed), without
/// reading it, so no buffer has to be held meanwhile.
pub async fn wait_readable(stream: &Stream, idle: Duration) -> io::Result<()> {
    wait(stream.readable(), idle).await
}

/// Writes all of `data`, waiting up to `idle` each time the peer does not take more.
pub async fn write_all(stream: &Stream, mut data: &[u8], idle: Duration) -> io::Result<()> {
    while !data.is_empty() {
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(stream.writable(), idle).await?
            }
            Err(e) => return Err(e),
        }
    }
    flush(stream, idle).await
}

/// Sends what the stream still holds of earlier writes (TLS records the socket did not
/// take yet), so that "written" means on its way to the peer.
async fn flush(stream: &Stream, idle: Duration) -> io::Result<()> {
    loop {
        match stream.try_flush() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(stream.writable(), idle).await?
            }
            done => return done,
        }
    }
}

/// Writes `first` then `second` with as few system calls as the peer allows.
pub async fn write_all_pair(
    stream: &Stream,
    mut first: &[u8],
    mut second: &[u8],
    idle: Duration,
) -> io::Result<()> {
    while !first.is_empty() {
        let slices = [io::IoSlice::new(first), io::IoSlice::new(second)];
        match stream.try_write_vectored(&slices) {
            Ok(n) if n >= first.len() => {
                second = &second[n - first.len()..];
                first = &[];
            }
            Ok(n) => first = &first[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(stream.writable(), idle).await?
            }
            Err(e) => return Err(e),
        }
    }
    write_all(stream, second, idle).await
}

/// Passes one piece of body on in the outgoing framing: gathered in `out` when small,
/// written straight from the read buffer together with what `out` holds when large.
pub async fn pass_body(
    to: &Stream,
    out: &mut Vec<u8>,
    data: &[u8],
    chunked: bool,
    idle: Duration,
) -> io::Result<()> {
    if chunked {
        body::write_chunk_header(out, data.len());
    }
    if data.len() >= DIRECT_WRITE {
        write_all_pair(to, out, data, idle).await?;
        out.clear();
    } else {
        out.extend_from_slice(data);
    }
    if chunked {
        out.extend_from_slice(body::CHUNK_TRAILER);
    }
    if out.len() >= FLUSH_AT {
        write_all(to, out, idle).await?;
        out.clear();
    }
    Ok(())
}

async fn wait(ready: impl Future<Output = io::Result<()>>, idle: Duration) -> io::Result<()> {
    match tokio::time::timeout(idle, ready).await {
        Ok(result) => result,
        Err(_) => Err(timed_out()),
    }
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "no progress within the idle timeout",
    )
}
