//! A raw HTTP/2 client that writes frames byte by byte, for requests a conforming client
//! library refuses to send (connection-specific headers, CR/LF in values, floods).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK integer with an `n`-bit prefix under `first`'s high bits.
fn integer(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of literal fields, never indexed, no Huffman coding: whatever bytes are
/// given go on the wire as they are.
pub fn header_block(fields: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x10);
        integer(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        integer(&mut out, 0, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

/// The pseudo-headers of a request to `path`, then `extra` fields.
pub fn request_block(method: &str, path: &str, extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut fields: Vec<(&str, &[u8])> = vec![
        (":method", method.as_bytes()),
        (":scheme", b"http"),
        (":path", path.as_bytes()),
        (":authority", b"example.com"),
    ];
    fields.extend_from_slice(extra);
    header_block(&fields)
}

pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// The server closed the connection (or reset it).
    pub closed: bool,
}

impl Conn {
    /// Connects and sends the preface with empty SETTINGS.
    pub async fn open(addr: SocketAddr) -> Conn {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        Conn {
            stream,
            buf: Vec::new(),
            closed: false,
        }
    }

    /// Sends bytes; a failed write means the server closed the connection.
    pub async fn send(&mut self, bytes: &[u8]) {
        if self.stream.write_all(bytes).await.is_err() {
            self.closed = true;
        }
    }

    /// The next frame from the server, or `None` when it closed or `limit` passed.
    pub async fn next(&mut self, limit: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.buf.len() >= 9 {
                let len = (usize::from(self.buf[0]) << 16)
                    | (usize::from(self.buf[1]) << 8)
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let stream =
                        u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]])
                            & 0x7fff_ffff;
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                Ok(_) => {
                    self.closed = true;
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    /// Reads frames until one for `stream` ends it (its response HEADERS with END_STREAM,
    /// its DATA with END_STREAM, or RST_STREAM), a GOAWAY arrives, or the connection closes.
    /// Returns the frames seen for the stream and whether the stream was refused.
    pub async fn outcome(&mut self, stream: u32) -> Outcome {
        let mut status = None;
        while let Some(f) = self.next(Duration::from_secs(10)).await {
            match f.kind {
                GOAWAY => {
                    return Outcome::GoAway(u32::from_be_bytes([
                        f.payload[4],
                        f.payload[5],
                        f.payload[6],
                        f.payload[7],
                    ]));
                }
                RST_STREAM if f.stream == stream => return Outcome::Reset,
                HEADERS if f.stream == stream => {
                    // A static-table index for :status (0x88 = 200, …) or a literal.
                    status = Some(f.payload.first().copied().unwrap_or(0));
                    if f.flags & END_STREAM != 0 {
                        return Outcome::Answered(status);
                    }
                }
                DATA if f.stream == stream && f.flags & END_STREAM != 0 => {
                    return Outcome::Answered(status);
                }
                _ => {}
            }
        }
        if self.closed {
            Outcome::Closed
        } else {
            Outcome::Silent
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The stream got a response; the first byte of its header block.
    Answered(Option<u8>),
    Reset,
    GoAway(u32),
    Closed,
    /// Nothing for ten seconds, and the connection still open.
    Silent,
}

/// HPACK's first byte for `:status: 200` (static table index 8, indexed).
pub const STATUS_200: u8 = 0x88;
