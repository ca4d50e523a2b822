//! `fulcrum status`: asks a running Fulcrum's admin listener for `/api/status` and prints
//! its servers as a table.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// How long the whole exchange with the admin listener may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// A status larger than this is not a Fulcrum's.
const MAX_STATUS_BYTES: usize = 16 << 20;

/// The one key of a config that `fulcrum status` needs; the rest of the file is not looked
/// at, so that neither its TLS keys nor the token file have to be readable.
#[derive(serde::Deserialize)]
struct AdminOnly {
    admin: Option<AdminBind>,
}

#[derive(serde::Deserialize)]
struct AdminBind {
    bind: Option<String>,
}

/// Where the admin listener of the Fulcrum running with the config at `path` listens; an
/// unspecified bind address (`0.0.0.0`) is reached on loopback.
pub fn admin_addr_from_config(path: &Path) -> Result<SocketAddr, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{shown} cannot be read: {e}"))?;
    let config: AdminOnly =
        toml::from_str(&text).map_err(|e| format!("{shown} is not valid TOML: {e}"))?;
    let Some(admin) = config.admin else {
        return Err(format!(
            "{shown}: the admin listener is off: add an [admin] section with bind = \"127.0.0.1:9901\" (or pass --admin ADDRESS)"
        ));
    };
    let Some(bind) = admin.bind else {
        return Err(format!(
            "{shown}: [admin] has no bind: add bind = \"127.0.0.1:9901\" (or pass --admin ADDRESS)"
        ));
    };
    let mut addr: SocketAddr = bind.parse().map_err(|_| {
        format!(
            "{shown}: [admin] bind `{bind}` is not an IP address and port, such as 127.0.0.1:9901"
        )
    })?;
    if addr.port() == 0 {
        return Err(format!(
            "{shown}: [admin] bind has port 0, so the running Fulcrum's admin port is not in the file: pass --admin ADDRESS"
        ));
    }
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(addr)
}

/// `GET /api/status` from the admin listener at `addr`.
pub async fn fetch_status(addr: SocketAddr) -> Result<Value, String> {
    tokio::time::timeout(TIMEOUT, fetch(addr, "/api/status"))
        .await
        .map_err(|_| format!("the admin listener at {addr} did not answer within {TIMEOUT:?}"))?
}

async fn fetch(addr: SocketAddr, path: &str) -> Result<Value, String> {
    let unreachable = |e: &dyn std::fmt::Display| {
        format!(
            "cannot reach the admin listener at {addr}: {e} (is Fulcrum running, with [admin] bind = \"{addr}\"?)"
        )
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| unreachable(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(&e))?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(&e))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_STATUS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the status from {addr} failed: {e}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!(
            "{addr}{path} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    serde_json::from_slice(&body)
        .map_err(|e| format!("{addr}{path} did not answer with a Fulcrum status: {e}"))
}

const HEADERS: [&str; 8] = [
    "UPSTREAM",
    "SERVER",
    "STATE",
    "WEIGHT",
    "IN FLIGHT",
    "REQUESTS",
    "ERRORS",
    "LATENCY",
];

/// The status as a table of servers, one line each, then the run-time overrides.
pub fn table(status: &Value) -> String {
    let mut rows: Vec<[String; 8]> = vec![HEADERS.map(String::from)];
    let empty = Vec::new();
    for upstream in status["upstreams"].as_array().unwrap_or(&empty) {
        let name = upstream["name"].as_str().unwrap_or("?");
        for s in upstream["servers"].as_array().unwrap_or(&empty) {
            let mut state = s["health"]["state"].as_str().unwrap_or("?").to_string();
            for flag in ["backup", "drain", "disabled"] {
                if s[flag].as_bool() == Some(true) {
                    state.push_str(&format!(" ({flag})"));
                }
            }
            let recent = &s["recent"];
            // Failed tries count as errors even with no request answered (a Fulcrum before
            // they were counted reports requests only).
            let tries = recent["tries"].as_u64().or(recent["requests"].as_u64());
            let errors = match tries {
                Some(0) | None => "-".to_string(),
                Some(_) => format!(
                    "{:.1}%",
                    recent["error_rate"].as_f64().unwrap_or(0.0) * 100.0
                ),
            };
            rows.push([
                name.to_string(),
                s["address"].as_str().unwrap_or("?").to_string(),
                state,
                s["weight"].to_string(),
                s["in_flight"].to_string(),
                s["requests"].to_string(),
                errors,
                format!("{:.1} ms", s["latency_ms"].as_f64().unwrap_or(0.0)),
            ]);
        }
    }
    let widths: Vec<usize> = (0..HEADERS.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, &w))| {
                // Text left, numbers right.
                if c < 3 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    let overrides = status["overrides"].as_array().unwrap_or(&empty);
    if !overrides.is_empty() {
        out.push_str("\nChanged through the admin API until the next reload:\n");
        for o in overrides {
            let mut what = Vec::new();
            for key in ["weight", "drain", "disabled"] {
                if !o[key].is_null() {
                    what.push(format!("{key} = {}", o[key]));
                }
            }
            out.push_str(&format!(
                "  {} {}: {}\n",
                o["upstream"].as_str().unwrap_or("?"),
                o["server"].as_str().unwrap_or("?"),
                what.join(", ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_address_is_read_without_the_files_the_config_names() {
        // Removed, with what is in it, when the test ends (passed or not).
        let dir = tempfile::tempdir().unwrap();
        let config_file = |name: &str, text: &str| {
            let path = dir.path().join(format!("{name}.toml"));
            std::fs::write(&path, text).unwrap();
            path
        };
        // Keys and a token file that are not there: a full load would stop on them.
        let path = config_file(
            "unreadable",
            "[listeners.web]\nbind = \"0.0.0.0:443\"\n\
             [[listeners.web.tls.certificates]]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n\
             [admin]\nbind = \"0.0.0.0:9901\"\ntoken_file = \"/nonexistent/token\"\n",
        );
        assert_eq!(
            admin_addr_from_config(&path),
            Ok("127.0.0.1:9901".parse().unwrap())
        );
        let path = config_file("nobind", "[admin]\ntoken_file = \"t\"\n");
        let error = admin_addr_from_config(&path).unwrap_err();
        assert!(error.contains("[admin] has no bind"), "{error}");
        let path = config_file("off", "workers = 2\n");
        let error = admin_addr_from_config(&path).unwrap_err();
        assert!(error.contains("the admin listener is off"), "{error}");
        let path = config_file("bad", "[admin]\nbind = \"localhost:9901\"\n");
        let error = admin_addr_from_config(&path).unwrap_err();
        assert!(error.contains("is not an IP address and port"), "{error}");
    }

    #[test]
    fn the_table_lines_servers_up_with_their_state_and_rates() {
        let status = serde_json::json!({
            "upstreams": [{ "name": "app", "servers": [
                { "address": "127.0.0.1:9001", "weight": 3, "backup": false, "drain": true,
                  "disabled": false, "health": { "state": "up" }, "in_flight": 2,
                  "requests": 1200, "recent": { "requests": 40, "error_rate": 0.025 },
                  "latency_ms": 12.345 },
                { "address": "127.0.0.1:9002", "weight": 1, "backup": true, "drain": false,
                  "disabled": false, "health": { "state": "unreachable" }, "in_flight": 0,
                  "requests": 0, "recent": { "requests": 0, "error_rate": 0.0 },
                  "latency_ms": 0.0 },
            ]}],
            "overrides": [{ "upstream": "app", "server": "127.0.0.1:9001", "weight": null,
                            "drain": true, "disabled": null }],
        });
        let table = table(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "UPSTREAM  SERVER          STATE                 WEIGHT  IN FLIGHT  REQUESTS  ERRORS  LATENCY"
        );
        assert_eq!(
            lines[1],
            "app       127.0.0.1:9001  up (drain)                 3          2      1200    2.5%  12.3 ms"
        );
        assert_eq!(
            lines[2],
            "app       127.0.0.1:9002  unreachable (backup)       1          0         0       -   0.0 ms"
        );
        assert!(
            table.contains("  app 127.0.0.1:9001: drain = true\n"),
            "{table}"
        );
    }
}
