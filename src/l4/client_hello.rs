//! (temporary, replaced by the "hello" helper's module at the merge) Reading a TLS
//! ClientHello's SNI and ALPN without answering it.

use std::time::{Duration, Instant};

/// What a ClientHello asks for, as routing reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    pub server_name: Option<String>,
    pub alpn: Vec<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("not a TLS ClientHello")]
    NotTls,
    #[error("malformed TLS ClientHello: {0}")]
    Malformed(&'static str),
    #[error("TLS ClientHello too long")]
    TooLong,
    #[error("no whole TLS ClientHello in time")]
    TimedOut,
    #[error("the client closed before a whole TLS ClientHello")]
    Closed,
    #[error("{0}")]
    Io(std::io::Error),
}

const MAX_HELLO: usize = 64 * 1024;

pub fn parse(bytes: &[u8]) -> Result<Option<ClientHello>, HelloError> {
    let mut handshake = Vec::new();
    let mut at = 0;
    loop {
        if bytes.len() < at + 5 {
            if at < bytes.len() && bytes[at] != 22 {
                return Err(HelloError::NotTls);
            }
            return Ok(None);
        }
        let record = &bytes[at..];
        if record[0] != 22 {
            return Err(HelloError::NotTls);
        }
        if record[1] != 3 || !(1..=4).contains(&record[2]) {
            return Err(HelloError::NotTls);
        }
        let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
        if record.len() < 5 + len {
            return Ok(None);
        }
        handshake.extend_from_slice(&record[5..5 + len]);
        at += 5 + len;
        if handshake.len() >= 4 {
            if handshake[0] != 1 {
                return Err(HelloError::Malformed(
                    "first handshake message is not a ClientHello",
                ));
            }
            let body_len = (usize::from(handshake[1]) << 16)
                | (usize::from(handshake[2]) << 8)
                | usize::from(handshake[3]);
            if body_len > MAX_HELLO {
                return Err(HelloError::TooLong);
            }
            if handshake.len() >= 4 + body_len {
                return body(&handshake[4..4 + body_len]).map(Some);
            }
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<usize, HelloError> {
        Ok(usize::from(self.take(1)?[0]))
    }
    fn u16(&mut self) -> Result<usize, HelloError> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn body(bytes: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader(bytes);
    r.take(2 + 32)?;
    r.vec8()?;
    r.vec16()?;
    r.vec8()?;
    let mut hello = ClientHello::default();
    if r.0.is_empty() {
        return Ok(hello);
    }
    let mut extensions = Reader(r.vec16()?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let mut data = Reader(extensions.vec16()?);
        match kind {
            0 => {
                let mut list = Reader(data.vec16()?);
                while !list.0.is_empty() {
                    let name_type = list.u8()?;
                    let name = list.vec16()?;
                    if name_type == 0 {
                        let name = std::str::from_utf8(name)
                            .map_err(|_| HelloError::Malformed("server name is not text"))?;
                        hello.server_name = Some(name.to_ascii_lowercase());
                    }
                }
            }
            16 => {
                let mut list = Reader(data.vec16()?);
                while !list.0.is_empty() {
                    hello.alpn.push(list.vec8()?.to_vec());
                }
            }
            _ => {}
        }
    }
    Ok(hello)
}

pub async fn read(
    stream: &tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    within: Duration,
) -> Result<ClientHello, HelloError> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(hello) = parse(buf)? {
            return Ok(hello);
        }
        if buf.len() > MAX_HELLO + 1024 {
            return Err(HelloError::TooLong);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.readable()).await {
            Err(_) => return Err(HelloError::TimedOut),
            Ok(Err(e)) => return Err(HelloError::Io(e)),
            Ok(Ok(())) => {}
        }
        let mut chunk = [0u8; 4096];
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err(HelloError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(HelloError::Io(e)),
        }
    }
}
