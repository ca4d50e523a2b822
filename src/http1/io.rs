//! Reading and writing on a shared `&TcpStream` through its readiness API, so one task can
//! move bytes both ways on two connections at once without splitting or locking them.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;

/// How much room a read asks for at least.
const READ_RESERVE: usize = 16 * 1024;

/// Reads what is available into `buf`, waiting up to `idle` for anything to arrive.
/// Returns 0 at end of stream.
pub async fn read_some(
    stream: &TcpStream,
    buf: &mut BytesMut,
    idle: Duration,
) -> io::Result<usize> {
    if buf.capacity() - buf.len() < READ_RESERVE / 4 {
        buf.reserve(READ_RESERVE);
    }
    loop {
        match stream.try_read_buf(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(stream.readable(), idle).await?
            }
            Err(e) => return Err(e),
        }
    }
}

/// Writes all of `data`, waiting up to `idle` each time the peer does not take more.
pub async fn write_all(stream: &TcpStream, mut data: &[u8], idle: Duration) -> io::Result<()> {
    while !data.is_empty() {
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait(stream.writable(), idle).await?
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn wait(ready: impl Future<Output = io::Result<()>>, idle: Duration) -> io::Result<()> {
    match tokio::time::timeout(idle, ready).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no progress within the idle timeout",
        )),
    }
}

/// Whether a pooled connection has been closed or sent unasked bytes while idle, checked
/// without waiting.
pub fn is_stale(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    match stream.try_read(&mut probe) {
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        Ok(_) => true,
    }
}
