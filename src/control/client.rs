//! The control socket's client side, for the commands that act on a running Fulcrum.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::protocol::{self, Reply, Request};

/// Replies are short; anything longer is not a Fulcrum answering.
const MAX_REPLY_BYTES: u64 = 1 << 20;

#[derive(Debug)]
pub enum AskError {
    /// No process listens on the socket: the file is missing, or left by one that is gone.
    NotRunning { socket: PathBuf },
    /// Something answered, or could not be reached, in a way that says more than that.
    Failed(String),
}

/// Sends `request` on the control socket at `socket` and waits up to `within` for the reply.
pub async fn ask(socket: &Path, request: &Request, within: Duration) -> Result<Reply, AskError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        AskError::Failed(format!("control socket {}: {what}: {e}", socket.display()))
    };
    let mut stream = match UnixStream::connect(socket).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(AskError::NotRunning {
                socket: socket.to_path_buf(),
            });
        }
        Err(e) => return Err(failed("cannot connect", &e)),
    };
    // Only a process of this user (or root) is told what to do and believed: a socket
    // another user put in the path's place is not a Fulcrum of ours.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match stream.peer_cred() {
        Ok(peer) if peer.uid() == me || peer.uid() == 0 => {}
        Ok(peer) => {
            return Err(failed(
                "refused",
                &format_args!("it is served by another user's process (uid {})", peer.uid()),
            ));
        }
        Err(e) => return Err(failed("cannot tell who serves it", &e)),
    }
    let exchange = async {
        stream.write_all(&protocol::encode(request)).await?;
        let mut line = Vec::new();
        BufReader::new((&mut stream).take(MAX_REPLY_BYTES))
            .read_until(b'\n', &mut line)
            .await?;
        Ok::<_, io::Error>(line)
    };
    let line = match tokio::time::timeout(within, exchange).await {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => return Err(failed("the exchange broke", &e)),
        Err(_) => {
            return Err(failed(
                "no reply",
                &format_args!("nothing within {within:?}; the process's log may say why"),
            ));
        }
    };
    if line.is_empty() {
        return Err(failed("no reply", &"the connection closed without one"));
    }
    protocol::decode_reply(&line).map_err(AskError::Failed)
}
