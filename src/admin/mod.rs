//! The admin listener: a small HTTP/1.1 server (hyper) on its own address, apart from the
//! proxy's listeners, that shows the running state as JSON (`/api/status`, `/api/config`),
//! serves Prometheus metrics (`/metrics`), and lets an operator drain, disable, enable or
//! reweigh a server until the next reload, or reload the config file (`/api/reload`), with a
//! bearer token.
//!
//! It runs once per process on the caller's runtime, never on a worker: nothing it does
//! touches the request path beyond reading the counters the workers keep.

mod api;
pub mod cli;
mod metrics;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::Config;
use crate::runtime::Shared;
use api::RecentWindow;

/// Admin connections served at once; more are closed as soon as they are accepted.
const MAX_CONNECTIONS: usize = 64;
/// A request body (a weight change) is a few bytes; anything larger is refused.
const MAX_BODY_BYTES: usize = 4096;
/// How long a client may take to send a request head, or its body: a few seconds, so that
/// clients that connect and send nothing give their slot up soon.
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a connection may stay open with nothing moving either way, between requests
/// kept alive or within one.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often request counts are sampled for the status's recent request and error rates.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// What the admin API reads beyond the runtime snapshot: the listeners' connection counts.
pub struct Context {
    pub shared: Arc<Shared>,
    /// The running listeners, kept up to date by the server as reloads change them.
    pub listeners: ListenerTable,
    /// This node of the active/standby group, with `[ha]`.
    pub ha: Option<crate::ha::HaHandle>,
    /// What the UDP listeners count, by slot, kept up to date by the server.
    pub udp: crate::l4::udp::UdpTable,
    recent: Mutex<RecentWindow>,
    /// Where `POST /api/reload` goes: the run loop, which handles every reload. Set once
    /// the run loop exists; unset in the demo, which has no file to reload.
    control: Arc<OnceLock<crate::control::Requests>>,
}

/// Per listener slot (`crate::runtime::ListenerRuntime::slot`): its bound address, and the
/// semaphore whose permits its open connections hold, with the number it has now.
pub type ListenerTable = Arc<Mutex<std::collections::HashMap<usize, ListenerInfo>>>;

#[derive(Clone)]
pub struct ListenerInfo {
    pub addr: SocketAddr,
    pub connections: Arc<Semaphore>,
    pub permits: u32,
    /// Accept loops on the listener (one per worker), each holding a permit while it waits
    /// for the next connection.
    pub accept_loops: usize,
}

impl ListenerInfo {
    /// Connections the listener has open now. At its connection limit, accept loops wait
    /// for a permit rather than hold one, and this reads up to one low per loop.
    pub fn open(&self) -> usize {
        (self.permits as usize)
            .saturating_sub(self.connections.available_permits())
            .saturating_sub(self.accept_loops)
    }
}

impl Context {
    /// The listener in `slot`: where it is bound and its connections open now (`None`:
    /// a reload is adding or removing it at this moment).
    pub fn listener(&self, slot: usize) -> Option<(SocketAddr, usize)> {
        let table = lock(&self.listeners);
        table.get(&slot).map(|info| (info.addr, info.open()))
    }

    /// What the UDP listener in `slot` has counted, if it is one and is running.
    pub fn udp(&self, slot: usize) -> Option<crate::l4::udp::UdpCounts> {
        lock(&self.udp).get(&slot).map(|stats| stats.counts())
    }

    pub fn new(
        shared: Arc<Shared>,
        listeners: ListenerTable,
        control: Arc<OnceLock<crate::control::Requests>>,
    ) -> Self {
        Context {
            shared,
            listeners,
            ha: None,
            udp: Default::default(),
            recent: Mutex::new(RecentWindow::default()),
            control,
        }
    }
}

/// The admin listener's socket, if `config` has an `[admin]` section; bound now so that a
/// taken address stops the start.
pub fn bind(config: &Config) -> io::Result<Option<std::net::TcpListener>> {
    let Some(admin) = &config.admin else {
        return Ok(None);
    };
    let socket = std::net::TcpListener::bind(admin.bind)
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("the admin listener cannot bind {}: {e}", admin.bind),
            )
        })?;
    tracing::info!(addr = %socket.local_addr()?, "admin listener");
    Ok(Some(socket))
}

/// Serves the admin API on `socket` on the current runtime until shutdown.
pub fn spawn(
    socket: std::net::TcpListener,
    cx: Arc<Context>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let socket = TcpListener::from_std(socket)?;
    let sampled = cx.clone();
    tokio::spawn(crate::server::every(
        SAMPLE_EVERY,
        shutdown.clone(),
        move || {
            let sample = api::sample(&sampled.shared.load());
            lock(&sampled.recent).push(Instant::now(), sample);
        },
    ));
    tokio::spawn(accept_loop(socket, cx, shutdown));
    Ok(())
}

async fn accept_loop(socket: TcpListener, cx: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = crate::server::stopping(&mut shutdown) => return,
            accepted = socket.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: pause rather than spin.
                    tracing::warn!(error = %e, "admin listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Accepting always and closing what is over the limit at once, rather than leaving
        // it in the kernel's queue, means that clients holding every slot idle cannot keep
        // an operator waiting: a refused connection says so straight away, and a slot frees
        // within the timeouts.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!("admin listener at its connection limit: connection closed");
            drop(stream);
            continue;
        };
        let (cx, mut shutdown) = (cx.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let cx = cx.clone();
                async move { Ok::<_, Infallible>(handle(&cx, req).await) }
            });
            let stream = crate::idle_timeout::IdleTimeout::new(stream, IDLE_TIMEOUT);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = crate::server::stopping(&mut shutdown) => {}
            }
            drop(permit);
        });
    }
}

/// What the admin API answers: a status and a body of a content type.
pub(crate) struct Reply {
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    /// A header name (lower case) and value: `www-authenticate` with a 401, `allow` with
    /// a 405.
    extra: Option<(&'static str, &'static str)>,
}

impl Reply {
    fn json(status: StatusCode, value: &impl serde::Serialize) -> Reply {
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
        body.push(b'\n');
        Reply {
            status,
            content_type: "application/json",
            body: body.into(),
            extra: None,
        }
    }

    fn error(status: StatusCode, message: impl Into<String>) -> Reply {
        Reply::json(status, &serde_json::json!({ "error": message.into() }))
    }
}

async fn handle(cx: &Context, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = route(cx, req).await;
    let mut response = Response::new(Full::new(reply.body));
    *response.status_mut() = reply.status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(reply.content_type),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some((name, value)) = reply.extra {
        headers.insert(
            header::HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    response
}

async fn route(cx: &Context, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let read_only = |reply: fn(&Context) -> Reply| {
        if method == Method::GET || method == Method::HEAD {
            reply(cx)
        } else {
            method_not_allowed("GET")
        }
    };
    match segments.as_slice() {
        ["metrics"] => read_only(metrics::reply),
        ["api", "status"] => {
            read_only(|cx| Reply::json(StatusCode::OK, &api::status(cx, &lock(&cx.recent))))
        }
        ["api", "config"] => {
            read_only(|cx| Reply::json(StatusCode::OK, &api::config(&cx.shared.load().config)))
        }
        ["api", "reload"] => {
            if method != Method::POST {
                return method_not_allowed("POST");
            }
            if let Err(refused) = authorize(cx, &req) {
                return refused;
            }
            api::reload(cx).await
        }
        ["api", "ha", "switchover"] => {
            if method != Method::POST {
                return method_not_allowed("POST");
            }
            if let Err(refused) = authorize(cx, &req) {
                return refused;
            }
            api::switchover(cx).await
        }
        ["api", "upstreams", upstream, "servers", server, action] => {
            let change = match (*action, &method) {
                ("drain" | "disable" | "enable", &Method::POST) => None,
                ("weight", &Method::PUT) => Some(()),
                ("drain" | "disable" | "enable", _) => return method_not_allowed("POST"),
                ("weight", _) => return method_not_allowed("PUT"),
                _ => return not_found(&path),
            };
            if let Err(refused) = authorize(cx, &req) {
                return refused;
            }
            let (upstream, server) = (upstream.to_string(), server.to_string());
            let action = action.to_string();
            let body = match change {
                Some(()) => match read_body(req).await {
                    Ok(body) => Some(body),
                    Err(refused) => return refused,
                },
                None => None,
            };
            api::change(cx, &upstream, &server, &action, body.as_deref())
        }
        _ => not_found(&path),
    }
}

/// Whether the request may change state: a token must be configured, and presented.
fn authorize<B>(cx: &Context, req: &Request<B>) -> Result<(), Reply> {
    let rt = cx.shared.load();
    let Some(token) = rt.config.admin.as_ref().and_then(|a| a.token.as_ref()) else {
        return Err(Reply::error(
            StatusCode::FORBIDDEN,
            "changes through the admin API are off: set token_file in [admin] to a file holding a token of at least 16 characters, and send it as `Authorization: Bearer TOKEN`",
        ));
    };
    let presented = req.headers().get(header::AUTHORIZATION).and_then(|v| {
        let v = v.as_bytes();
        let scheme = v.get(..7)?;
        scheme
            .eq_ignore_ascii_case(b"bearer ")
            .then(|| v[7..].trim_ascii())
    });
    match presented {
        Some(presented) if token.matches(presented) => Ok(()),
        Some(_) => Err(unauthorized("the bearer token is not the admin token")),
        None => Err(unauthorized(
            "this call changes state: send `Authorization: Bearer TOKEN` with the token in [admin] token_file",
        )),
    }
}

fn unauthorized(message: &str) -> Reply {
    Reply {
        extra: Some(("www-authenticate", "Bearer realm=\"fulcrum-admin\"")),
        ..Reply::error(StatusCode::UNAUTHORIZED, message)
    }
}

fn method_not_allowed(allow: &'static str) -> Reply {
    Reply {
        extra: Some(("allow", allow)),
        ..Reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("this path takes {allow}"),
        )
    }
}

fn not_found(path: &str) -> Reply {
    Reply::error(
        StatusCode::NOT_FOUND,
        format!("no admin endpoint at {path}: try /api/status, /api/config or /metrics"),
    )
}

/// The request's body, at most `MAX_BODY_BYTES`, within `READ_TIMEOUT`.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Reply> {
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES).collect();
    match tokio::time::timeout(READ_TIMEOUT, body).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(Reply::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {MAX_BODY_BYTES} bytes"),
        )),
        Ok(Err(e)) => Err(Reply::error(
            StatusCode::BAD_REQUEST,
            format!("the body could not be read: {e}"),
        )),
        Err(_) => Err(Reply::error(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {READ_TIMEOUT:?}"),
        )),
    }
}

/// Locks a mutex only the admin listener's tasks take; one that panicked holding it left
/// nothing half-written that matters.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
