//! The connection under HTTP, on either side of the proxy: plain TCP, or TLS over it. Both
//! are used through a shared reference in tokio's readiness style (`try_read`, `try_write`,
//! `readable`, `writable`), which lets one task send on a connection while it receives on
//! it; and both are `AsyncRead + AsyncWrite` for the HTTP/2 server and for tunnels.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
            Stream::Plain(tcp) => tcp.try_read_buf(buf),
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
            Stream::Plain(tcp) => tcp.try_write(data),
            Stream::Tls(tls) => tls.try_write(data),
        }
    }

    pub fn try_write_vectored(&self, data: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.try_write_vectored(data),
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
            Stream::Plain(tcp) => {
                let mut probe = [0u8; 1];
                match tcp.try_read(&mut probe) {
                    Err(e) => e.kind() != io::ErrorKind::WouldBlock,
                    Ok(_) => true,
                }
            }
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
