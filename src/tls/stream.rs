//! TLS over a TCP connection, read and written through a shared reference in the same
//! readiness style as a plain `TcpStream` (`try_read`, `try_write`, `readable`), so the
//! HTTP/1.1 code can send one way while it receives the other on the same connection.
//!
//! The rustls state sits behind a mutex that is never contended: a connection's two
//! directions are driven by one task, and the lock is only held for a non-blocking step.

use std::io::{self, BufRead, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use tokio::net::TcpStream;

/// A TLS session over `tcp`, past its handshake.
pub struct TlsStream {
    tcp: TcpStream,
    tls: Mutex<rustls::Connection>,
    closing: AtomicBool,
}

/// The socket as rustls reads and writes it: without waiting, so `WouldBlock` comes back to
/// the caller (and clears tokio's readiness for the socket, as a wait must).
pub(super) struct Socket<'a>(pub(super) &'a TcpStream);

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        crate::transport::recv_into(self.0, buf)
    }
}

impl Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        crate::transport::send(self.0, &[io::IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        crate::transport::send(self.0, bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What plaintext is waiting, once everything the socket had was taken in.
enum Waiting {
    Data,
    /// The peer closed (with or without `close_notify`) or broke the session: a read
    /// returns at once.
    End,
    Nothing,
}

impl TlsStream {
    pub fn new(tcp: TcpStream, tls: impl Into<rustls::Connection>) -> Self {
        TlsStream {
            tcp,
            tls: Mutex::new(tls.into()),
            closing: AtomicBool::new(false),
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    fn lock(&self) -> MutexGuard<'_, rustls::Connection> {
        // A panic while holding it leaves nothing half-done that matters more than the
        // connection, which its task's end closes anyway.
        self.tls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `with` on the rustls state (the negotiated protocol, peer certificates...).
    pub fn session<T>(&self, with: impl FnOnce(&rustls::Connection) -> T) -> T {
        with(&self.lock())
    }

    /// Hands plaintext to `take`, which returns how much it took (it is offered chunks
    /// until it takes less than a whole one). Returns the bytes taken, 0 at the end of the
    /// session, or `WouldBlock` when none are waiting.
    pub fn try_read_with(&self, take: &mut dyn FnMut(&[u8]) -> usize) -> io::Result<usize> {
        let mut tls = self.lock();
        loop {
            let mut total = 0;
            loop {
                let mut reader = tls.reader();
                match reader.fill_buf() {
                    Ok([]) => return Ok(total),
                    Ok(chunk) => {
                        let len = chunk.len();
                        let took = take(chunk);
                        reader.consume(took);
                        total += took;
                        if took < len {
                            return Ok(total);
                        }
                    }
                    Err(_) if total > 0 => return Ok(total),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // The socket closed without `close_notify` (`UnexpectedEof`): an error,
                    // not an end, so that a body delimited by the close is not taken as
                    // complete when it may have been cut.
                    Err(e) => return Err(e),
                }
            }
            self.receive(&mut tls)?;
        }
    }

    /// Takes what the socket has into the session and processes it; `WouldBlock` once the
    /// socket is empty.
    fn receive(&self, tls: &mut rustls::Connection) -> io::Result<()> {
        let read = tls.read_tls(&mut Socket(&self.tcp))?;
        if let Err(e) = tls.process_new_packets() {
            // The alert rustls queued tells the peer why, if it can still be sent.
            let _ = tls.write_tls(&mut Socket(&self.tcp));
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        if read > 0 && tls.wants_write() {
            // A key update or similar wants an answer; what the socket does not take now
            // goes out with the next write.
            let _ = self.send_pending(tls);
        }
        Ok(())
    }

    fn waiting(&self) -> io::Result<Waiting> {
        let mut tls = self.lock();
        loop {
            match tls.reader().fill_buf() {
                Ok([]) => return Ok(Waiting::End),
                Ok(_) => return Ok(Waiting::Data),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Ok(Waiting::End),
            }
            match self.receive(&mut tls) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Waiting::Nothing),
                Err(_) => return Ok(Waiting::End),
            }
        }
    }

    /// Waits until plaintext (or the end of the session) can be read. Session messages
    /// that carry no data, such as tickets a server sends after the handshake, do not
    /// count: they are taken in and the wait goes on.
    pub async fn readable(&self) -> io::Result<()> {
        loop {
            if !matches!(self.waiting()?, Waiting::Nothing) {
                return Ok(());
            }
            self.tcp.readable().await?;
        }
    }

    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if !matches!(self.waiting()?, Waiting::Nothing) {
                return Poll::Ready(Ok(()));
            }
            ready!(self.tcp.poll_read_ready(cx))?;
        }
    }

    /// Whether a pooled connection was closed or sent something unasked while idle.
    /// Anything the socket holds counts (a late session ticket costs a new connection): the
    /// session's own reads go by tokio's readiness, which may not show a close yet.
    pub fn is_stale(&self) -> bool {
        if crate::transport::has_arrivals(&self.tcp) {
            return true;
        }
        !matches!(self.lock().reader().fill_buf(), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    fn send_pending(&self, tls: &mut rustls::Connection) -> io::Result<()> {
        while tls.wants_write() {
            tls.write_tls(&mut Socket(&self.tcp))?;
        }
        Ok(())
    }

    /// Encrypts what of `data` the session takes and sends what the socket takes; the rest
    /// of the encrypted bytes go with the next write or [`TlsStream::try_flush`]. Returns
    /// `WouldBlock` while earlier bytes are still waiting for the socket.
    pub fn try_write_vectored(&self, data: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut tls = self.lock();
        self.send_pending(&mut tls)?;
        let taken = tls.writer().write_vectored(data)?;
        if taken == 0 && data.iter().any(|d| !d.is_empty()) {
            return Err(io::ErrorKind::WriteZero.into());
        }
        match self.send_pending(&mut tls) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(taken),
        }
    }

    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        self.try_write_vectored(&[io::IoSlice::new(data)])
    }

    /// Sends every encrypted byte still waiting; `WouldBlock` if the socket does not take
    /// them all.
    pub fn try_flush(&self) -> io::Result<()> {
        self.send_pending(&mut self.lock())
    }

    /// Ends the session with `close_notify` (once, however often asked), as much of it as
    /// the socket takes now.
    pub fn close_notify(&self) {
        let mut tls = self.lock();
        if !self.closing.swap(true, Ordering::Relaxed) {
            tls.send_close_notify();
        }
        let _ = self.send_pending(&mut tls);
    }
}

/// A session ends with `close_notify` however its connection ends, so the peer can tell the
/// end from a cut (HTTP/1.0 bodies and responses with `Connection: close` end this way).
impl Drop for TlsStream {
    fn drop(&mut self) {
        self.close_notify();
    }
}
