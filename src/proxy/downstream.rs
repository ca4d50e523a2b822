//! What the phases need from a client protocol, and nothing more: the request body to read
//! and the response to write. HTTP/1.1 (`http::h1`) and HTTP/2 (`http::h2`) each implement
//! these once; a new protocol or transport is one more implementation, not another copy of
//! the phases.

use std::borrow::Cow;
use std::io;

use bytes::BytesMut;
use http::StatusCode;
use http::header::HeaderValue;

use super::rewrite::ResponseFacts;
use crate::http1::body::BodyError;

/// One step of a request body as the client sent it, framing removed.
pub enum Piece<'a> {
    Data(&'a [u8]),
    End,
}

/// Why the client's request body could not be read.
#[derive(Debug)]
pub enum ClientBodyError {
    /// Framing that breaks the rules (HTTP/1.1 chunked syntax, HTTP/2 length mismatch).
    Malformed(Cow<'static, str>),
    /// The client closed, reset the stream or stalled for its idle timeout.
    Gone,
}

impl From<BodyError> for ClientBodyError {
    fn from(e: BodyError) -> Self {
        ClientBodyError::Malformed(Cow::Owned(e.to_string()))
    }
}

/// The client's request body, read in pieces without copying where the protocol allows.
pub trait RequestBody {
    /// The next piece already received, or `None` when more must be read first
    /// ([`fill`](Self::fill)). A `Data` piece stays until [`consume`](Self::consume)d.
    fn next(&mut self) -> Result<Option<Piece<'_>>, ClientBodyError>;
    /// The first `n` bytes of the current piece have been passed on.
    fn consume(&mut self, n: usize);
    /// Waits for more of the body, up to the client's idle timeout.
    fn fill(&mut self) -> impl Future<Output = Result<(), ClientBodyError>> + Send;
}

/// The upstream's final response head, parsed, as a writer needs it.
pub struct UpstreamHead<'a, 'h, 'b> {
    pub parsed: &'a httparse::Response<'h, 'b>,
    pub facts: &'a ResponseFacts,
    /// A sticky-session cookie of Fulcrum's own to add.
    pub set_cookie: Option<&'a HeaderValue>,
    /// The whole request body was passed on before the response began.
    pub request_done: bool,
}

/// An answer Fulcrum gives itself (an error page, a refusal).
pub struct OwnAnswer<'a> {
    pub status: StatusCode,
    pub body: &'a str,
    /// The request was `HEAD`: the answer has headers only.
    pub head_request: bool,
    /// Part of the request is still unread, so the client's connection cannot carry
    /// another request (HTTP/1.1); HTTP/2 ends just the stream.
    pub unread: bool,
    /// Add `Retry-After`: the refusal is about load, and passes.
    pub retry_after: bool,
    /// Where the client should go instead (a redirect's `Location`).
    pub location: Option<&'a str>,
}

/// Whether a response head from a server carries its own `Strict-Transport-Security`,
/// which then stands instead of the listener's `hsts`.
pub fn has_hsts(head: &UpstreamHead<'_, '_, '_>) -> bool {
    head.parsed
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("strict-transport-security"))
}

/// The response to the client, written as it comes. A writer on a listener with `hsts`
/// adds `Strict-Transport-Security` to every response, Fulcrum's own answers included.
pub trait ResponseWriter {
    /// Prepares the client's response head from the upstream's. Returns whether the client
    /// connection may carry another request once this response is complete. Nothing is
    /// sent until the first [`data`](Self::data), [`flush`](Self::flush) or
    /// [`end`](Self::end).
    fn head(&mut self, head: &UpstreamHead<'_, '_, '_>) -> bool;
    /// Sends the first `n` bytes of `buf` as body and removes them from it.
    fn data(&mut self, buf: &mut BytesMut, n: usize)
    -> impl Future<Output = io::Result<()>> + Send;
    /// Sends what is buffered: the upstream has nothing more to read at the moment.
    fn flush(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// The body is complete.
    fn end(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Writes Fulcrum's own answer in place of a response. Returns whether the client
    /// connection may carry another request.
    fn answer(&mut self, answer: &OwnAnswer<'_>) -> impl Future<Output = bool> + Send;
    /// Tells a client that sent `Expect: 100-continue` to go on with its body.
    fn send_continue(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Resolves if the client gives up on the request (an HTTP/2 stream reset), so that
    /// the wait for a slow upstream stops too.
    fn abandoned(&mut self) -> impl Future<Output = ()> + Send;
}
