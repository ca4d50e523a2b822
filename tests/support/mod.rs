//! Builder-style pieces for end-to-end tests: real backends, a real Fulcrum on port 0, and
//! raw clients for input no well-behaved client would send.
#![allow(dead_code)]

pub mod h2raw;
pub mod l4;
pub mod netns;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// What a backend saw: every request head, and how many connections it accepted.
#[derive(Default)]
pub struct Seen {
    pub requests: Mutex<Vec<http::request::Parts>>,
    pub connections: AtomicUsize,
}

impl Seen {
    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
    pub fn last(&self) -> http::request::Parts {
        self.requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the backend saw no request")
    }
}

/// A real HTTP/1.1 server on 127.0.0.1:0.
pub struct Backend {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    accept: tokio::task::AbortHandle,
}

impl Backend {
    /// Answers every request with `name` as its body and in `x-backend`.
    pub async fn named(name: &'static str) -> Backend {
        Backend::with(move |_req| async move {
            Response::builder()
                .header("x-backend", name)
                .body(full(name))
                .unwrap()
        })
        .await
    }

    /// As [`Backend::named`], on a given address (to come back where a stopped one was).
    pub async fn named_at(name: &'static str, addr: SocketAddr) -> Backend {
        Backend::listen_with(
            TcpListener::bind(addr).await.unwrap(),
            move |_req| async move {
                Response::builder()
                    .header("x-backend", name)
                    .body(full(name))
                    .unwrap()
            },
        )
    }

    /// Answers with whatever `handler` returns; the request head is recorded first.
    pub async fn with<F, Fut>(handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        Backend::listen_with(TcpListener::bind("127.0.0.1:0").await.unwrap(), handler)
    }

    fn listen_with<F, Fut>(listener: TcpListener, handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let handler = Arc::new(handler);
        let seen2 = seen.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                seen2.connections.fetch_add(1, Ordering::SeqCst);
                let (handler, seen) = (handler.clone(), seen2.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (handler, seen) = (handler.clone(), seen.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            seen.requests.lock().unwrap().push(parts.clone());
                            Ok::<_, Infallible>(handler(Request::from_parts(parts, body)).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Backend {
            addr,
            seen,
            accept: accept.abort_handle(),
        }
    }

    /// Stops accepting connections: new ones are refused (ones already open stay).
    pub fn stop(&self) {
        self.accept.abort();
    }
}

/// A Fulcrum started in-process from a config text.
pub struct Proxy {
    pub addr: SocketAddr,
    pub server: fulcrum::server::Server,
}

impl Proxy {
    /// Starts Fulcrum with `config`, after `{0}`, `{1}`, … are replaced by the backends'
    /// addresses. The first listener's address is `addr`.
    pub async fn start(config: &str, backends: &[&Backend]) -> Proxy {
        let config = fulcrum::config::parse("test.toml", &fill(config, backends))
            .unwrap_or_else(|e| panic!("{e}"));
        let server = fulcrum::server::Server::start(config).await.unwrap();
        Proxy {
            addr: server.local_addrs()[0],
            server,
        }
    }

    /// Like [`Proxy::start`], but on `workers` worker threads of their own, each with its
    /// own event loop and connection pools, as `fulcrum run` serves.
    pub fn start_workers(config: &str, backends: &[&Backend], workers: usize) -> Proxy {
        let text = format!("workers = {workers}\n{}", fill(config, backends));
        let config = fulcrum::config::parse("test.toml", &text).unwrap_or_else(|e| panic!("{e}"));
        let server = fulcrum::server::Server::start_workers(config).unwrap();
        Proxy {
            addr: server.local_addrs()[0],
            server,
        }
    }

    /// One listener routing everything to one upstream of `backends`, plus `extra` TOML.
    pub async fn simple(backends: &[&Backend], extra: &str) -> Proxy {
        Proxy::start(&simple_config(backends.len(), extra), backends).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// The body of a GET to `url`, through `client`.
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// An HTTP/1.1 client with keep-alive.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Sends raw bytes and returns everything the server sent until it closed (or 5 s passed).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    read_until_close(&mut stream, Duration::from_secs(5)).await
}

pub async fn read_until_close(stream: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of each response in a raw byte stream, in order (bodies must not hold
/// `HTTP/1.1 `).
pub fn statuses(raw: &str) -> Vec<u16> {
    raw.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| raw.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// The real `fulcrum` binary, run as a child process with a config file.
pub struct Process {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub stdout: Arc<Mutex<String>>,
    /// Fulcrum's own log lines.
    pub stderr: Arc<Mutex<String>>,
    /// The config file it runs with, to rewrite before a reload.
    pub config: std::path::PathBuf,
    _dir: TempDir,
}

/// A directory removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "fulcrum-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback address with a port nothing listens on now: connections to it are refused,
/// and a config may name it for a listener of its own.
pub fn unused_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Sends `signal` (a name: `HUP`, `STOP`, …) to process `pid`, which must take it.
pub fn send_signal(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -s {signal} {pid} failed");
}

pub fn binary() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
}

impl Process {
    /// Runs `fulcrum run` with `config` (backend placeholders as in [`Proxy::start`]) and
    /// waits until it listens.
    pub fn start(config: &str, backends: &[&Backend]) -> Process {
        Process::start_with(config, backends, |_| {})
    }

    /// Like [`Process::start`], allowed at most `files` open descriptors (`RLIMIT_NOFILE`).
    pub fn start_with_open_files(config: &str, backends: &[&Backend], files: u64) -> Process {
        use std::os::unix::process::CommandExt;
        Process::start_with(config, backends, |command| {
            let limit = libc::rlimit {
                rlim_cur: files,
                rlim_max: files,
            };
            // SAFETY: setrlimit is async-signal-safe, and the pointer is to a live rlimit.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        })
    }

    /// Like [`Process::start`], after `configure` has had its say on the command (its
    /// stdout, say).
    pub fn start_with(
        config: &str,
        backends: &[&Backend],
        configure: impl FnOnce(&mut std::process::Command),
    ) -> Process {
        use std::io::{BufRead, BufReader, Read};
        let dir = TempDir::new();
        let path = dir.0.join("fulcrum.toml");
        std::fs::write(&path, fill(config, backends)).unwrap();
        let mut command = binary();
        command
            .args(["run", "-c"])
            .arg(&path)
            .env("RUST_LOG", "info")
            // Its control socket beside its config, not in /run/fulcrum, where one killed
            // test after another would leave theirs.
            .env("FULCRUM_RUN_DIR", &dir.0)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        configure(&mut command);
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(String::new()));
        let log_sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("addr=").nth(1) {
                    let _ = tx.send(addr.trim().parse::<SocketAddr>().unwrap());
                }
                eprintln!("[fulcrum] {line}");
                let mut log = log_sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let stdout = Arc::new(Mutex::new(String::new()));
        // Absent when `configure` sent stdout elsewhere.
        if let Some(mut out) = child.stdout.take() {
            let sink = stdout.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("fulcrum did not start listening");
        Process {
            child,
            addr,
            stdout,
            stderr: log,
            config: path,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// How many of the descriptors numbered below `limit` the process has open (one
    /// inherited from the test harness may sit above a lowered limit, taking no slot).
    pub fn open_files_below(&self, limit: u64) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
                    .filter(|&fd| fd < limit)
                    .count()
            })
            .unwrap_or(0)
    }

    /// Waits (up to 10 s) for a line on stdout containing `needle`, and returns it.
    pub async fn stdout_line(&self, needle: &str) -> String {
        wait_for_line(&self.stdout, needle).await
    }

    /// Waits (up to 10 s) for a log line containing `needle`, and returns it with the
    /// lines after it.
    pub async fn log_from(&self, needle: &str) -> String {
        let line = wait_for_line(&self.stderr, needle).await;
        let log = self.stderr.lock().unwrap().clone();
        log[log.find(&line).unwrap()..].to_string()
    }
}

async fn wait_for_line(output: &Mutex<String>, needle: &str) -> String {
    {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let out = output.lock().unwrap().clone();
            if let Some(line) = out.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no line with {needle:?} in: {out}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Process {
    /// A field of /proc/PID/status in KiB (VmRSS, VmHWM, …).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    pub fn signal(&self, signal: &str) {
        send_signal(self.child.id(), signal);
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait(&mut self, limit: Duration) -> i32 {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "fulcrum did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One listener, one upstream of `n` backends, as TOML with placeholders.
pub fn simple_config(n: usize, extra: &str) -> String {
    let servers: Vec<String> = (0..n)
        .map(|i| format!("{{ address = \"{{{i}}}\" }}"))
        .collect();
    format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
         [upstreams.app]\nservers = [{}]\n{extra}",
        servers.join(", ")
    )
}

/// One listener routing everything to one upstream of servers at `addrs` (servers that are
/// not [`Backend`]s: raw, dead or misbehaving ones), plus `extra` TOML for that upstream.
pub fn config_for(addrs: &[SocketAddr], extra: &str) -> String {
    let servers: Vec<String> = addrs
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n[upstreams.app]\nservers = [{}]\n{extra}",
        servers.join(", ")
    )
}

/// `config` with `{0}`, `{1}`, … replaced by the backends' addresses.
pub fn fill(config: &str, backends: &[&Backend]) -> String {
    let mut text = config.to_string();
    for (i, b) in backends.iter().enumerate() {
        text = text.replace(&format!("{{{i}}}"), &b.addr.to_string());
    }
    text
}

/// A backend speaking raw bytes, for responses no HTTP library would write: it reads each
/// request head (requests with bodies are not supported) and writes what `reply` returns,
/// closing the connection afterwards when `reply` says so.
pub struct RawBackend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<String>>>,
    pub connections: Arc<AtomicUsize>,
}

impl RawBackend {
    pub async fn start(
        reply: impl Fn(&str) -> (Vec<u8>, bool) + Send + Sync + 'static,
    ) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let reply = Arc::new(reply);
        let (seen2, connections2) = (seen.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                connections2.fetch_add(1, Ordering::SeqCst);
                let (reply, seen) = (reply.clone(), seen2.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                            buf.drain(..end + 4);
                            seen.lock().unwrap().push(head.clone());
                            let (bytes, close) = reply(&head);
                            if stream.write_all(&bytes).await.is_err() || close {
                                return;
                            }
                        }
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                });
            }
        });
        RawBackend {
            addr,
            seen,
            connections,
        }
    }
}

/// A WebSocket server on 127.0.0.1 that sends every text or binary message back.
pub async fn websocket_echo() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });
    addr
}
