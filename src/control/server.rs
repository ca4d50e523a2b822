//! The control socket's server side: binding it (one process per config file), answering
//! each connection's one request, and removing the socket file on exit if it is still ours.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use super::protocol::{self, Reply, Request, Status};

/// Connections served at once: commands come from an operator or a script, one at a time;
/// more are closed when accepted.
pub const MAX_CONNECTIONS: usize = 8;
/// A request is a line of a few dozen bytes (an upgrade's binary path at most a few KiB).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long a client may take to send its request line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reply may take to be written before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request may wait for the run loop: an upgrade waits for the new process to
/// be ready, which may take a while on a loaded machine.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long stopping waits for replies still being written.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the run loop takes requests from: each with where its reply goes.
pub type Requests = mpsc::Sender<(Request, oneshot::Sender<Reply>)>;

/// Binds the control socket at `path` (mode 0600; a missing directory is made, mode 0700).
/// A live process on it refuses the bind; a socket file left by a process that died is
/// replaced.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    let cannot = |e: &dyn std::fmt::Display| {
        format!(
            "cannot bind the control socket {}: {e}; set [control] socket to a path this user may create",
            path.display()
        )
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| cannot(&e))?;
        }
        // In a directory anyone may write to, anyone could put a socket of their own in
        // this one's place for commands to talk to (/tmp's sticky bit prevents that); the
        // same goes for a directory another user made (say /tmp/fulcrum-UID, made first by
        // someone else) and may write to.
        let meta = std::fs::metadata(dir).map_err(|e| cannot(&e))?;
        let mode = meta.mode();
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            return Err(cannot(&format_args!(
                "its directory {} may be written by any user",
                dir.display()
            )));
        }
        let me = effective_uid();
        if meta.uid() != me && meta.uid() != 0 && mode & 0o1000 == 0 {
            return Err(cannot(&format_args!(
                "its directory {} belongs to another user (uid {})",
                dir.display(),
                meta.uid()
            )));
        }
    }
    let listener = match UnixListener::bind(path) {
        Ok(listener) => listener,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            replace_stale(path)?;
            UnixListener::bind(path).map_err(|e| cannot(&e))?
        }
        Err(e) => return Err(cannot(&e)),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| listener.set_nonblocking(true))
        .map_err(|e| cannot(&e))?;
    Ok(listener)
}

/// This process's effective user id.
fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Removes the socket file at `path` if nothing answers on it; refuses if a process does,
/// or if the file is not a socket.
fn replace_stale(path: &Path) -> Result<(), String> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(stream) => {
            let who = running_pid(stream).map_or(String::new(), |pid| format!(" (process {pid})"));
            Err(format!(
                "another Fulcrum{who} runs with this config: its control socket {} answers; stop it or set [control] socket",
                path.display()
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            let is_socket = std::fs::symlink_metadata(path)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if !is_socket {
                return Err(format!(
                    "the control socket path {} is taken by something that is not a socket; remove it or set [control] socket",
                    path.display()
                ));
            }
            tracing::info!(path = %path.display(), "control socket left by a process that is gone: replaced");
            std::fs::remove_file(path).map_err(|e| {
                format!(
                    "cannot remove the stale control socket {}: {e}",
                    path.display()
                )
            })
        }
        Err(e) => Err(format!(
            "the control socket {} exists and cannot be tried ({e}); stop what holds it or set [control] socket",
            path.display()
        )),
    }
}

/// The pid of the process answering on `stream`, if it answers a status request soon.
fn running_pid(mut stream: std::os::unix::net::UnixStream) -> Option<u32> {
    use std::io::{BufRead, Read, Write};
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .ok()?;
    stream.write_all(&protocol::encode(&Request::Status)).ok()?;
    let mut line = Vec::new();
    std::io::BufReader::new(stream.take(MAX_REQUEST_BYTES as u64))
        .read_until(b'\n', &mut line)
        .ok()?;
    Some(protocol::decode_reply(&line).ok()?.status?.pid)
}

/// A control socket being served.
pub struct Control {
    path: PathBuf,
    /// The socket file's device and inode when serving started: another process that binds
    /// the path later (after this one was taken for dead) owns the file, and it stays.
    identity: Option<(u64, u64)>,
    /// Set once the socket went to a new process in a binary upgrade, which serves it on:
    /// the file stays.
    handed_over: bool,
    /// The listening socket, kept to hand over in a binary upgrade.
    listener: UnixListener,
    stop: watch::Sender<bool>,
    /// Permits held by the connections being answered.
    connections: Arc<Semaphore>,
}

/// Serves the control socket `listener`, bound at `path` (by [`bind`], or by the process
/// this one took over from), on the current runtime: `status` is answered here, every
/// other request goes to `requests`.
pub fn serve(
    listener: UnixListener,
    path: &Path,
    status: Status,
    requests: Requests,
) -> io::Result<Control> {
    let kept = listener.try_clone()?;
    listener.set_nonblocking(true)?;
    let accepting = tokio::net::UnixListener::from_std(listener)?;
    let identity = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let (stop, stopping) = watch::channel(false);
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(accept_loop(
        accepting,
        Arc::new(status),
        requests,
        connections.clone(),
        stopping,
    ));
    tracing::info!(path = %path.display(), "control socket");
    Ok(Control {
        path: path.to_path_buf(),
        identity,
        handed_over: false,
        listener: kept,
        stop,
        connections,
    })
}

impl Control {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket, to hand to a new process in a binary upgrade.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Marks the socket as served by a new process from now on, so that [`Control::stop`]
    /// leaves its file in place.
    pub fn handed_over(&mut self) {
        self.handed_over = true;
    }

    /// Stops accepting, waits a little for replies being written, and removes the socket
    /// file if it is still this process's.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let all = u32::try_from(MAX_CONNECTIONS).expect("a handful of connections");
        let _ = tokio::time::timeout(STOP_TIMEOUT, self.connections.acquire_many(all)).await;
        if self.handed_over {
            return;
        }
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if now.is_some()
            && now == self.identity
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the control socket");
        }
    }
}

async fn accept_loop(
    listener: tokio::net::UnixListener,
    status: Arc<Status>,
    requests: Requests,
    connections: Arc<Semaphore>,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            _ = crate::server::stopping(&mut stopping) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // As on the admin listener: closing at once what is over the limit keeps clients
        // that hold every slot from making the next command wait.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!("control socket at its connection limit: connection closed");
            continue;
        };
        let (status, requests, stopping) = (status.clone(), requests.clone(), stopping.clone());
        tokio::spawn(async move {
            answer(stream, &status, &requests, stopping).await;
            drop(permit);
        });
    }
}

/// Reads one request from `stream`, answers it, and closes.
async fn answer(
    stream: UnixStream,
    status: &Status,
    requests: &Requests,
    mut stopping: watch::Receiver<bool>,
) {
    if let Some(refused) = stranger(&stream) {
        write_reply(stream, &Reply::error(refused)).await;
        return;
    }
    let (read, write) = stream.into_split();
    let request = tokio::select! {
        request = read_request(read) => request,
        _ = crate::server::stopping(&mut stopping) => return,
    };
    let reply = match request {
        None => return,
        Some(Err(refused)) => Reply::error(refused),
        Some(Ok(Request::Status)) => Reply {
            status: Some(status.clone()),
            ..Reply::ok("running")
        },
        Some(Ok(request)) => ask_run_loop(request, requests).await,
    };
    write_reply(write, &reply).await;
}

/// Why a peer may not use the socket, if it runs as another user than this process (and
/// is not root): the file's mode keeps them out already, unless it was changed.
fn stranger(stream: &UnixStream) -> Option<String> {
    let peer = stream.peer_cred().ok()?.uid();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    (peer != 0 && peer != own)
        .then(|| format!("user {peer} may not control this Fulcrum: it runs as user {own}"))
}

/// The request line: `None` when the client closed without sending anything, an error
/// when it sent too much, too slowly, or something that is not a request.
async fn read_request(read: impl tokio::io::AsyncRead + Unpin) -> Option<Result<Request, String>> {
    let mut line = Vec::new();
    let mut limited = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    match tokio::time::timeout(READ_TIMEOUT, limited.read_until(b'\n', &mut line)).await {
        Err(_) => Some(Err(format!(
            "no request line within {READ_TIMEOUT:?}: send one line of JSON, then wait for the reply"
        ))),
        Ok(Err(e)) => Some(Err(format!("the request could not be read: {e}"))),
        Ok(Ok(0)) => None,
        Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => Some(Err(format!(
            "the request is over {MAX_REQUEST_BYTES} bytes"
        ))),
        Ok(Ok(_)) => Some(protocol::decode_request(&line)),
    }
}

async fn ask_run_loop(request: Request, requests: &Requests) -> Reply {
    const STOPPING: &str = "Fulcrum is shutting down: the request was not handled";
    let (reply_to, reply) = oneshot::channel();
    if requests.send((request, reply_to)).await.is_err() {
        return Reply::error(STOPPING);
    }
    match tokio::time::timeout(ANSWER_TIMEOUT, reply).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(_)) => Reply::error(STOPPING),
        Err(_) => Reply::error(format!(
            "no outcome within {ANSWER_TIMEOUT:?}; the process's log says what became of the request"
        )),
    }
}

async fn write_reply(mut write: impl tokio::io::AsyncWrite + Unpin, reply: &Reply) {
    let line = protocol::encode(reply);
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        write.write_all(&line).await?;
        write.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_makes_a_private_directory_and_keeps_off_what_is_not_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/web.sock");
        let listener = bind(&socket).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir.path().join("run")), 0o700);
        assert_eq!(mode(&socket), 0o600);

        // A live socket is not taken over; a dead one is.
        let error = bind(&socket).unwrap_err();
        assert!(
            error.contains("another Fulcrum runs with this config"),
            "{error}"
        );
        drop(listener);
        assert!(socket.exists());
        drop(bind(&socket).unwrap());

        // Something other than a socket at the path is left alone.
        let file = dir.path().join("run/notes.sock");
        std::fs::write(&file, "keep me").unwrap();
        let error = bind(&file).unwrap_err();
        assert!(error.contains("not a socket"), "{error}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = bind(&open.join("web.sock")).unwrap_err();
        assert!(error.contains("may be written by any user"), "{error}");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        drop(bind(&open.join("web.sock")).unwrap());
    }
}
