//! The request body as sent upstream: the client's body streamed through, with the
//! configured size limit enforced on bodies whose size was not declared up front.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

pub struct RequestBody {
    inner: Incoming,
    /// Bytes still allowed before the body is refused as too large.
    allowance: u64,
    limit: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("request body is larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("reading the request body from the client failed: {0}")]
    Client(#[source] hyper::Error),
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: u64) -> Self {
        RequestBody {
            inner,
            allowance: limit,
            limit,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.allowance {
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge(this.limit))));
                    }
                    this.allowance -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(RequestBodyError::Client(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
