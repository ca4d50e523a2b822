//! `fulcrum ha status` (this node's place in its group, from its admin listener) and the
//! arguments of `fulcrum ha switchover` (which goes through the control socket, as
//! `fulcrum reload` does).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::admin::cli::admin_addr_from_config;

/// A switchover waits for a peer to take the role: a dead time, a few seconds at most.
const TIMEOUT: Duration = Duration::from_secs(30);
const MAX_ANSWER_BYTES: usize = 1 << 20;

#[derive(clap::Subcommand)]
pub enum HaCommand {
    /// Show this node's role, its peers and its last change of role.
    Status {
        /// The config the running Fulcrum was started with: its [admin] bind is asked.
        #[arg(short, long, default_value = "fulcrum.toml")]
        config: PathBuf,
        /// The admin listener's address, instead of reading it from the config.
        #[arg(long, value_name = "ADDRESS")]
        admin: Option<SocketAddr>,
    },
    /// Hand the active role to the best peer (run on the active node, through the control
    /// socket of the Fulcrum started with this config): returns once the peer holds it.
    Switchover {
        #[arg(short, long, default_value = "fulcrum.toml")]
        config: PathBuf,
    },
}

/// Prints this node's role, its peers and its last change.
pub async fn status(config: &Path, admin: Option<SocketAddr>) -> ExitCode {
    match describe_status(config, admin).await {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn describe_status(config: &Path, admin: Option<SocketAddr>) -> Result<String, String> {
    let addr = admin.map_or_else(|| admin_addr_from_config(config), Ok)?;
    let status = request(addr, http::Method::GET, "/api/status", None).await?;
    if status["ha"].is_null() {
        return Err(format!(
            "the Fulcrum at {addr} is not in an HA group (its config has no [ha])"
        ));
    }
    Ok(describe(&status["ha"]))
}

/// The node's role, its peers, and its last change, in a few lines.
fn describe(ha: &Value) -> String {
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    let mut out = format!(
        "{} ({}, priority {}): {}{}{}\n",
        text(&ha["node"]),
        ha["virtual_addresses"]
            .as_array()
            .map(|a| a.iter().map(text).collect::<Vec<_>>().join(", "))
            .unwrap_or_default(),
        ha["priority"],
        text(&ha["role"]),
        if ha["yielding"] == true {
            ", yielding"
        } else if ha["draining"] == true {
            ", draining its connections before it yields"
        } else {
            ""
        },
        if ha["eligible"] == false {
            ", not eligible (reach checks fail)"
        } else {
            ""
        },
    );
    for peer in ha["peers"].as_array().into_iter().flatten() {
        let state = if peer["alive"] == true {
            format!(
                "{} (priority {}), heard {} ms ago",
                text(&peer["role"]),
                peer["priority"],
                peer["last_heard_ms_ago"]
            )
        } else if peer["name"].is_null() {
            "never heard".to_string()
        } else {
            format!("gone, last heard {} ms ago", peer["last_heard_ms_ago"])
        };
        let name = if peer["name"].is_null() {
            String::new()
        } else {
            format!("{} ", text(&peer["name"]))
        };
        out.push_str(&format!(
            "  peer {name}{}: {state}\n",
            text(&peer["address"])
        ));
    }
    let change = &ha["last_change"];
    if !change.is_null() {
        out.push_str(&format!(
            "  last change: {} -> {} ({}) at {}: {}\n",
            text(&change["from"]),
            text(&change["to"]),
            text(&change["reason"]),
            text(&change["at"]),
            text(&change["detail"])
        ));
    }
    out
}

/// One request to the admin listener at `addr`, with the bearer `token` if given; the JSON
/// answer of a success, or the error the listener gave.
async fn request(
    addr: SocketAddr,
    method: http::Method,
    path: &str,
    token: Option<&str>,
) -> Result<Value, String> {
    let exchange = async {
        let unreachable = |e: &dyn std::fmt::Display| {
            format!("cannot reach the admin listener at {addr}: {e} (is Fulcrum running?)")
        };
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, addr.to_string());
        if let Some(token) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(&e))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer from {addr} failed: {e}"))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| format!("{addr}{path} did not answer with JSON: {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "{addr}{path} answered {status}: {}",
                value["error"].as_str().unwrap_or("(no reason given)")
            ));
        }
        Ok(value)
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| format!("the admin listener at {addr} did not answer within {TIMEOUT:?}"))?
}
