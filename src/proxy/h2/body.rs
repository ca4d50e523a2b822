//! The response body sent to the client: an upstream's body streamed through, or a short
//! body Fulcrum wrote itself. It hands the upstream connection back to its pool once the
//! body has been read to its end, and closes the access-log record.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;

use crate::proxy::AccessRecord;
use crate::upstream::{InFlight, RequestBody, Server};

pub struct ResponseBody {
    inner: Inner,
    /// The connection the response came on, to be pooled again only if the body ends.
    connection: Option<(SendRequest<RequestBody>, Arc<Server>)>,
    /// Counts the request as in flight to its server until the body ends.
    in_flight: Option<InFlight>,
    /// `None` when the access log is off.
    log: Option<AccessRecord>,
}

enum Inner {
    Upstream(Incoming),
    Local(Option<Bytes>),
}

impl ResponseBody {
    pub fn upstream(
        body: Incoming,
        connection: Option<(SendRequest<RequestBody>, Arc<Server>)>,
        in_flight: Option<InFlight>,
        log: Option<AccessRecord>,
    ) -> Self {
        ResponseBody {
            inner: Inner::Upstream(body),
            connection,
            in_flight,
            log,
        }
    }

    pub fn local(text: Bytes, log: Option<AccessRecord>) -> Self {
        ResponseBody {
            inner: Inner::Local(Some(text)),
            connection: None,
            in_flight: None,
            log,
        }
    }

    /// The upstream's body has been read to its end: its connection may carry the next request.
    fn finish(&mut self) {
        if let Some((sender, server)) = self.connection.take() {
            server.pool.put(sender);
        }
        self.in_flight = None;
        if let Some(log) = self.log.as_mut() {
            log.complete = true;
        }
        // Emitting now rather than at drop keeps the log line's duration honest.
        self.log = None;
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Inner::Upstream(body) => Pin::new(body).poll_frame(cx),
            Inner::Local(text) => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(log), Some(data)) = (this.log.as_mut(), frame.data_ref()) {
                    log.bytes += data.len() as u64;
                }
                if this.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(e))) => {
                if let Some(log) = this.log.as_mut() {
                    log.reason = Some(format!("upstream response body failed: {e}").into());
                }
                this.connection = None;
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(body) => body.is_end_stream(),
            Inner::Local(text) => text.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(body) => body.size_hint(),
            Inner::Local(text) => SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64)),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body with nothing in it (HEAD, 204, 304) may be dropped unpolled; its connection
        // is still clean.
        if self.is_end_stream() {
            self.finish();
        }
    }
}
