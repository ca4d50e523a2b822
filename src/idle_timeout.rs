//! An I/O wrapper that fails a connection on which no byte has moved, either way, for a set
//! time. It bounds idle keep-alive connections and stalled transfers on both sides.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

pin_project_lite::pin_project! {
    pub struct IdleTimeout<T> {
        #[pin]
        inner: T,
        timeout: Duration,
        last_activity: Instant,
        // Re-armed lazily: only when it fires is it checked against `last_activity`, so busy
        // connections do not touch the timer wheel on every read. Boxed to keep the wrapper
        // `Unpin`, as hyper needs.
        timer: Pin<Box<Sleep>>,
    }
}

impl<T> IdleTimeout<T> {
    pub fn new(inner: T, timeout: Duration) -> Self {
        let now = Instant::now();
        IdleTimeout {
            inner,
            timeout,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(now + timeout)),
        }
    }
}

impl<T> IdleTimeout<T> {
    fn poll_idle(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Error> {
        let this = self.project();
        loop {
            ready!(this.timer.as_mut().poll(cx));
            let deadline = *this.last_activity + *this.timeout;
            if Instant::now() >= deadline {
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle for too long",
                ));
            }
            this.timer.as_mut().reset(deadline);
        }
    }
}

impl<T: AsyncRead> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.as_mut().project();
        match this.inner.poll_read(cx, buf) {
            Poll::Ready(result) => {
                *this.last_activity = Instant::now();
                Poll::Ready(result)
            }
            Poll::Pending => self.poll_idle(cx).map(Err),
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.as_mut().project();
        match this.inner.poll_write(cx, buf) {
            Poll::Ready(result) => {
                *this.last_activity = Instant::now();
                Poll::Ready(result)
            }
            Poll::Pending => self.poll_idle(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.as_mut().project();
        match this.inner.poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => {
                *this.last_activity = Instant::now();
                Poll::Ready(result)
            }
            Poll::Pending => self.poll_idle(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
