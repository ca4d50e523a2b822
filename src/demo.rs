//! `fulcrum demo`: three small built-in backends and a Fulcrum in front of them, configured
//! from an embedded TOML file through the same pipeline as a user's config, over HTTP and
//! over HTTPS with a certificate from the demo's own CA (made on first run, then reused).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::{self, Config, ConfigError};

/// The demo's config; `{listen}` and `{alpha}`, `{beta}`, `{gamma}` are filled in at start.
pub const DEMO_CONFIG: &str = include_str!("../examples/demo.toml");

pub const BACKEND_NAMES: [&str; 3] = ["alpha", "beta", "gamma"];

/// Where the demo serves, and where its certificates are kept.
pub struct DemoSetup {
    pub listen: SocketAddr,
    pub listen_https: SocketAddr,
    pub cert_dir: std::path::PathBuf,
}

/// Starts the demo backends on free loopback ports, makes (or reuses) the demo's
/// certificates, and returns the demo config with what a client needs to trust it.
pub async fn start(
    setup: &DemoSetup,
) -> std::io::Result<Result<(Config, crate::cert::DemoCert), ConfigError>> {
    let certs = crate::cert::demo_certificate(&setup.cert_dir)?;
    let mut text = DEMO_CONFIG.replace("127.0.0.1:8080", &setup.listen.to_string());
    // The HTTPS listener is added here rather than in the example file, which cannot know
    // where the certificates are.
    text.push_str(&format!(
        "\n[listeners.demo-https]\nbind = \"{}\"\n\n[[listeners.demo-https.routes]]\nupstream = \"demo\"\n\n\
         [listeners.demo-https.tls]\ncertificates = [{{ cert = {:?}, key = {:?} }}]\n",
        setup.listen_https,
        certs.cert.display().to_string(),
        certs.key.display().to_string(),
    ));
    for (name, placeholder) in
        BACKEND_NAMES
            .iter()
            .zip(["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"])
    {
        let addr = start_backend(name).await?;
        text = text.replace(placeholder, &addr.to_string());
    }
    Ok(config::parse("demo.toml (embedded)", &text).map(|config| (config, certs)))
}

/// A backend that answers every request with its own name, on a free loopback port.
async fn start_backend(name: &'static str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve_backend(name.to_string(), listener));
    Ok(addr)
}

/// Answers every request on `listener` with `name` and its address, until the process
/// ends: the demo's backends, and `fulcrum backend` for trying examples on one machine.
pub async fn serve_backend(name: String, listener: TcpListener) {
    let addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            tracing::error!("demo backend {name}: {e}");
            return;
        }
    };
    let name: std::sync::Arc<str> = name.into();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                tracing::warn!("demo backend {name}: cannot accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let name = name.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let name = name.clone();
                async move {
                    let text = format!(
                        "Hello from demo backend {name} ({addr}): you asked for {}\n",
                        req.uri().path()
                    );
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
