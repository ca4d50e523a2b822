//! Body framing: decoding a body framed by `Content-Length`, `chunked` or the end of the
//! connection, strictly, and writing one out in either framing.

use std::io::Write as _;

use bytes::{Buf, BytesMut};

/// How a message's body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    Length(u64),
    Chunked,
    /// The body runs until the sender closes the connection (responses only).
    UntilClose,
}

impl Framing {
    /// Whether any body bytes follow the head.
    pub fn has_body(self) -> bool {
        !matches!(self, Framing::Empty | Framing::Length(0))
    }
}

/// Reads a body out of a connection's read buffer, one piece at a time.
#[derive(Debug)]
pub struct Decoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    /// Expecting a chunk-size line.
    ChunkSize,
    /// Inside a chunk's data, with this many bytes left.
    ChunkData(u64),
    /// Expecting the CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: trailer lines until an empty line, with the bytes of the
    /// section read so far (the whole section is bounded, not just each line).
    Trailers(usize),
    UntilClose,
    Done,
}

/// What one step of decoding yields.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The first `n` bytes of the buffer are body data: use them, then `advance(n)`.
    Data(usize),
    /// The buffer holds no complete piece; read more.
    NeedMore,
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("invalid chunk size line")]
    ChunkSize,
    #[error("chunk not followed by CRLF")]
    ChunkEnd,
    #[error("invalid trailer section")]
    Trailers,
}

/// Longest chunk-size line accepted, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section accepted, all lines together; trailers are read and dropped.
const MAX_TRAILERS: usize = 16 * 1024;

impl Decoder {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        };
        Decoder { state }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the body ends only when the connection does.
    pub fn until_close(&self) -> bool {
        self.state == State::UntilClose
    }

    /// Finds the next piece of body at the front of `buf`, consuming framing bytes as it
    /// goes. Data is left in place for the caller to copy out and consume, so decoding never
    /// allocates.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End),
                State::Length(left) | State::ChunkData(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = (buf.len() as u64).min(left) as usize;
                    let left = left - n as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), _) => State::Length(left),
                        (_, 0) => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    return Ok(Decoded::Data(n));
                }
                State::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.len()));
                }
                State::ChunkSize => {
                    let Some(line_end) = line_end(buf, MAX_CHUNK_LINE, BodyError::ChunkSize)?
                    else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = chunk_size(&buf[..line_end - 2])?;
                    buf.advance(line_end);
                    self.state = if size == 0 {
                        State::Trailers(0)
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BodyError::ChunkEnd);
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers(seen) => {
                    let room = MAX_TRAILERS - seen;
                    let Some(line_end) = line_end(buf, room, BodyError::Trailers)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let empty = line_end == 2;
                    buf.advance(line_end);
                    self.state = if empty {
                        State::Done
                    } else {
                        State::Trailers(seen + line_end)
                    };
                }
            }
        }
    }
}

/// The length of the first CRLF-terminated line in `buf`, CRLF included; a bare LF, or no
/// line end within `max` bytes, is `error`.
fn line_end(buf: &[u8], max: usize, error: BodyError) -> Result<Option<usize>, BodyError> {
    match memchr::memchr(b'\n', &buf[..buf.len().min(max)]) {
        Some(i) if i > 0 && buf[i - 1] == b'\r' => Ok(Some(i + 1)),
        Some(_) => Err(error),
        None if buf.len() >= max => Err(error),
        None => Ok(None),
    }
}

/// Parses `1*HEXDIG [ BWS ";" chunk-ext ]`, refusing anything else and any size over 2^63.
fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(BodyError::ChunkSize);
    }
    let rest = &line[digits..];
    let rest_ok = rest.is_empty() || {
        let ext = rest.trim_ascii_start();
        ext.first() == Some(&b';')
            && ext
                .iter()
                .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
    };
    if !rest_ok {
        return Err(BodyError::ChunkSize);
    }
    let size = line[..digits].iter().fold(0u64, |n, &b| {
        (n << 4) | u64::from((b as char).to_digit(16).unwrap_or(0))
    });
    if size > i64::MAX as u64 {
        return Err(BodyError::ChunkSize);
    }
    Ok(size)
}

/// Appends the framing that goes before a chunk of `len` bytes.
pub fn write_chunk_header(out: &mut Vec<u8>, len: usize) {
    let _ = write!(out, "{len:x}\r\n");
}

pub const CHUNK_TRAILER: &[u8] = b"\r\n";
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(framing: Framing, input: &[u8], step: usize) -> Result<Vec<u8>, BodyError> {
        let mut d = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(n) => {
                    out.extend_from_slice(&buf[..n]);
                    buf.advance(n);
                }
                Decoded::End => return Ok(out),
                Decoded::NeedMore if fed < input.len() => {
                    let n = step.min(input.len() - fed);
                    buf.extend_from_slice(&input[fed..fed + n]);
                    fed += n;
                }
                Decoded::NeedMore => return Ok(out),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let input = b"5\r\nhello\r\n6;name=val\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n";
        assert_eq!(
            decode_all(Framing::Chunked, input, 1000).unwrap(),
            b"hello world"
        );
        assert_eq!(
            decode_all(Framing::Chunked, input, 1).unwrap(),
            b"hello world"
        );
    }

    #[test]
    fn the_whole_trailer_section_is_bounded_not_just_each_line() {
        let mut endless = b"1\r\na\r\n0\r\n".to_vec();
        for i in 0..2_000 {
            endless.extend_from_slice(format!("X-T{i}: 1\r\n").as_bytes());
        }
        assert_eq!(
            decode_all(Framing::Chunked, &endless, 512),
            Err(BodyError::Trailers)
        );
        // Under the bound, however many lines, the section is read and dropped.
        let mut many = b"1\r\na\r\n0\r\n".to_vec();
        for i in 0..500 {
            many.extend_from_slice(format!("X-T{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(many.len() < MAX_TRAILERS);
        assert_eq!(decode_all(Framing::Chunked, &many, 512).unwrap(), b"a");
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"zz\r\nhello\r\n"[..],
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"ffffffffffffffffff\r\n",
            b"-5\r\n",
            b"5 x\r\n",
            b"\r\n",
        ] {
            assert!(
                decode_all(Framing::Chunked, bad, 1000).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        let mut d = Decoder::new(Framing::Length(5));
        let mut buf = BytesMut::from(&b"helloGET / HTTP/1.1"[..]);
        assert_eq!(d.decode(&mut buf).unwrap(), Decoded::Data(5));
        buf.advance(5);
        assert_eq!(d.decode(&mut buf).unwrap(), Decoded::End);
        assert_eq!(&buf[..], b"GET / HTTP/1.1");
    }

    proptest! {
        #[test]
        fn chunked_roundtrip_at_any_read_size(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..8), step in 1usize..64) {
            let mut wire = Vec::new();
            for c in &chunks {
                write_chunk_header(&mut wire, c.len());
                wire.extend_from_slice(c);
                wire.extend_from_slice(CHUNK_TRAILER);
            }
            wire.extend_from_slice(LAST_CHUNK);
            let body = decode_all(Framing::Chunked, &wire, step).unwrap();
            prop_assert_eq!(body, chunks.concat());
        }
    }
}
