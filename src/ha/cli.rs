//! `fulcrum ha status` (this node's place in its group, from its admin listener) and the
//! arguments of `fulcrum ha switchover` (which goes through the control socket, as
//! `fulcrum reload` does).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::Value;

use crate::admin::cli::admin_addr_from_config;

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
    let status = crate::admin::cli::fetch_status(addr).await?;
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
