//! The connection under HTTP, on either side of the proxy: plain TCP, or TLS over it. Both
//! are used through a shared reference in tokio's readiness style (`try_read`, `try_write`,
//! `readable`, `writable`), which lets one task send on a connection while it receives on
//! it; and both are `AsyncRead + AsyncWrite` for the HTTP/2 server and for tunnels.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::stream::TlsStream;

pub enum Stream {
    Plain(TcpStream),
    // Boxed: the session state is large, and a plain connection should not pay for it.
    Tls(Box<TlsStream>),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Stream::Plain(_) => "Plain",
            Stream::Tls(_) => "Tls",
        };
        f.debug_tuple(kind).field(self.tcp()).finish()
    }
}

impl From<TcpStream> for Stream {
    fn from(tcp: TcpStream) -> Self {
        Stream::Plain(tcp)
    }
}

impl From<TlsStream> for Stream {
    fn from(tls: TlsStream) -> Self {
        Stream::Tls(Box::new(tls))
    }
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.tcp(),
        }
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.tcp().set_nodelay(on)
    }

    /// Reads what is available into `buf`'s spare room (TLS: whole records' plaintext,
    /// growing `buf` if need be). 0 at the end of the stream; `WouldBlock` if nothing is
    /// waiting.
    pub fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => {
                if buf.capacity() == buf.len() {
                    buf.reserve(64);
                }
                let n = recv(tcp, buf.spare_capacity_mut())?;
                // SAFETY: `recv` initialised the first `n` bytes of the spare room.
                unsafe { buf.set_len(buf.len() + n) };
                Ok(n)
            }
            Stream::Tls(tls) => {
                let room = (buf.capacity() - buf.len()).max(1);
                let mut left = room;
                tls.try_read_with(&mut |chunk| {
                    // The first chunk is taken whole, so a read always makes progress.
                    let take = if left == room {
                        chunk.len()
                    } else {
                        chunk.len().min(left)
                    };
                    buf.extend_from_slice(&chunk[..take]);
                    left = left.saturating_sub(take);
                    take
                })
            }
        }
    }

    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => send(tcp, &[io::IoSlice::new(data)]),
            Stream::Tls(tls) => tls.try_write(data),
        }
    }

    pub fn try_write_vectored(&self, data: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => send(tcp, data),
            Stream::Tls(tls) => tls.try_write_vectored(data),
        }
    }

    /// Sends what a write left buffered (TLS); `WouldBlock` if the socket does not take it
    /// all. Plain TCP buffers nothing.
    pub fn try_flush(&self) -> io::Result<()> {
        match self {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(tls) => tls.try_flush(),
        }
    }

    /// Waits until a read would return something (data, or the end).
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.readable().await,
            Stream::Tls(tls) => tls.readable().await,
        }
    }

    pub async fn writable(&self) -> io::Result<()> {
        self.tcp().writable().await
    }

    /// Whether a pooled connection has been closed or sent unasked bytes while idle,
    /// checked without waiting.
    pub fn is_stale(&self) -> bool {
        match self {
            Stream::Plain(tcp) => has_arrivals(tcp),
            Stream::Tls(tls) => tls.is_stale(),
        }
    }

    /// Stops sending: TLS says `close_notify` first; then the TCP write side is shut, so
    /// the peer reads the end while this side can still read what it sends.
    pub fn shutdown_write(&self) -> io::Result<()> {
        if let Stream::Tls(tls) = self {
            tls.close_notify();
        }
        socket2::SockRef::from(self.tcp()).shutdown(std::net::Shutdown::Write)
    }

    fn poll_read_into(&self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let Stream::Tls(tls) = self else {
            unreachable!("plain TCP reads through TcpStream's own poll_read");
        };
        loop {
            let read = tls.try_read_with(&mut |chunk| {
                let take = chunk.len().min(out.remaining());
                out.put_slice(&chunk[..take]);
                take
            });
            match read {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(tls.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
                Ok(_) => return Poll::Ready(Ok(())),
            }
        }
    }

    fn poll_until_written<T>(
        &self,
        cx: &mut Context<'_>,
        mut attempt: impl FnMut(&Self) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            match attempt(self) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.tcp().poll_write_ready(cx))?;
                }
                done => return Poll::Ready(done),
            }
        }
    }
}

/// One `recv` into `buf` without waiting. A short read also clears the socket's read
/// readiness, as tokio's own `poll_read` does but its `try_read` does not: the kernel handed
/// over all it had, so another `recv` before the next readiness event could only fail with
/// `EAGAIN` — a system call per message on every connection of a request/response exchange.
/// (Data arriving after the read raises a new edge-triggered event, which sets readiness
/// again; tokio clears only the readiness this read observed. The exception is TCP urgent
/// data, where `recv` stops short at the mark: nothing Fulcrum proxies uses it, and tokio's
/// own reads share the limit.)
pub fn recv(tcp: &TcpStream, buf: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    let wanted = buf.len();
    transfer(tcp, Interest::READABLE, wanted, || {
        SockRef::from(tcp).recv(buf)
    })
}

/// One non-blocking transfer of up to `wanted` bytes under tokio's readiness for
/// `interest`. A count short of `wanted` is returned as it is, with the readiness cleared:
/// `try_io` clears it on `WouldBlock`, so the short count goes out through that error.
fn transfer(
    tcp: &TcpStream,
    interest: Interest,
    wanted: usize,
    mut op: impl FnMut() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut done = 0;
    let result = tcp.try_io(interest, || {
        done = op()?;
        if done > 0 && done < wanted {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(done)
        }
    });
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && done > 0 => Ok(done),
        other => other,
    }
}

/// `UIO_MAXIOV` on Linux.
const MAX_SLICES: usize = 1024;

/// One `sendmsg` of `data` without waiting; a short write clears write readiness (the
/// socket buffer is full), sparing the `EAGAIN` the next attempt would meet. `MSG_NOSIGNAL`:
/// a peer that has gone is an error to handle, not a signal.
pub fn send(tcp: &TcpStream, data: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // `sendmsg` refuses more slices than this (`writev` in std truncates); a count over the
    // slices actually passed keeps "short" meaning "the socket buffer is full".
    let data = &data[..data.len().min(MAX_SLICES)];
    let wanted: usize = data.iter().map(|d| d.len()).sum();
    transfer(tcp, Interest::WRITABLE, wanted, || {
        let socket = SockRef::from(tcp);
        // One piece goes by `send`: `sendmsg` would also copy a message header and an
        // iovec array in from user space.
        match data {
            [one] => socket.send_with_flags(one, libc::MSG_NOSIGNAL),
            _ => socket.send_vectored_with_flags(data, libc::MSG_NOSIGNAL),
        }
    })
}

/// Whether bytes, the end of the stream or an error wait on `tcp`, asked of the socket
/// itself (a peek) rather than of tokio's readiness: [`recv`] may have cleared readiness
/// while a close arrived that the event loop has not seen yet, and finding such a close on
/// a pooled connection is what this is for.
pub fn has_arrivals(tcp: &TcpStream) -> bool {
    let mut probe = [MaybeUninit::uninit(); 1];
    match SockRef::from(tcp).recv_with_flags(&mut probe, libc::MSG_PEEK) {
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        Ok(_) => true,
    }
}

/// [`recv`] into an initialised buffer.
pub fn recv_into(tcp: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `recv` only writes initialised bytes, so the slice stays initialised.
    recv(tcp, unsafe {
        &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>])
    })
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            tls => tls.poll_read_into(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, data),
            tls => tls.poll_until_written(cx, |s| s.try_write(data)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, data),
            tls => tls.poll_until_written(cx, |s| s.try_write_vectored(data)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(_) => Poll::Ready(Ok(())),
            tls => tls.poll_until_written(cx, Stream::try_flush),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            tls => {
                if let Stream::Tls(session) = tls {
                    session.close_notify();
                }
                ready!(tls.poll_until_written(cx, Stream::try_flush))?;
                Poll::Ready(socket2::SockRef::from(tls.tcp()).shutdown(std::net::Shutdown::Write))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// A short read leaves no readiness behind (the next read costs no system call), and
    /// bytes sent after it are still seen: their arrival sets readiness again.
    #[tokio::test]
    async fn a_short_read_clears_readiness_and_later_bytes_still_arrive() {
        let (mut writer, reader) = pair().await;
        writer.write_all(b"first").await.unwrap();
        reader.readable().await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(recv_into(&reader, &mut buf).unwrap(), 5);
        // Nothing asked of the kernel: the socket is not ready as far as tokio knows.
        let err = reader.try_io(Interest::READABLE, || Ok(())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        writer.write_all(b"second").await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), reader.readable())
            .await
            .expect("readiness comes back with new bytes")
            .unwrap();
        assert_eq!(recv_into(&reader, &mut buf).unwrap(), 6);
        assert_eq!(&buf[..6], b"second");
        drop(writer);
        tokio::time::timeout(Duration::from_secs(10), reader.readable())
            .await
            .expect("the close is seen")
            .unwrap();
        assert_eq!(recv_into(&reader, &mut buf).unwrap(), 0);
    }

    /// A read that fills the buffer keeps readiness: more may be waiting, and is read.
    #[tokio::test]
    async fn a_full_read_keeps_readiness() {
        let (mut writer, reader) = pair().await;
        writer.write_all(b"0123456789").await.unwrap();
        reader.readable().await.unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(recv_into(&reader, &mut buf).unwrap(), 4);
        assert_eq!(recv_into(&reader, &mut buf).unwrap(), 4);
        assert_eq!(recv_into(&reader, &mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"89");
    }

    /// A short write (the socket buffer full) clears write readiness, and the writer is
    /// woken once the peer reads.
    #[tokio::test]
    async fn a_short_write_clears_readiness_and_the_writer_wakes_when_the_peer_reads() {
        let (writer, mut reader) = pair().await;
        let chunk = vec![7u8; 256 * 1024];
        let mut sent = 0;
        loop {
            match send(&writer, &[io::IoSlice::new(&chunk)]) {
                Ok(n) if n == chunk.len() => sent += n,
                Ok(n) => {
                    sent += n;
                    break;
                }
                // Full at a chunk's edge: the kernel's own EAGAIN cleared readiness.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let err = writer.try_io(Interest::WRITABLE, || Ok(())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            while got < sent {
                got += tokio::io::AsyncReadExt::read(&mut reader, &mut buf)
                    .await
                    .unwrap();
            }
            reader
        });
        tokio::time::timeout(Duration::from_secs(10), writer.writable())
            .await
            .expect("the writer is woken once the peer reads")
            .unwrap();
        assert!(send(&writer, &[io::IoSlice::new(b"more")]).unwrap() > 0);
        drop(drain.await.unwrap());
    }

    /// A pooled connection's close is found even when readiness was cleared before it came
    /// and the event loop has not looked since.
    #[tokio::test]
    async fn has_arrivals_sees_a_close_readiness_does_not_show_yet() {
        let (mut writer, reader) = pair().await;
        writer.write_all(b"response").await.unwrap();
        reader.readable().await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(recv_into(&reader, &mut buf).unwrap(), 8);
        assert!(!has_arrivals(&reader));
        drop(writer);
        // No await in between: the event loop has not run since the close.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !has_arrivals(&reader) {
            assert!(
                std::time::Instant::now() < deadline,
                "the close never showed"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(Stream::Plain(reader).is_stale());
    }
}
