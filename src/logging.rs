//! Log output: diagnostics go to stderr (filtered by `RUST_LOG`, default `info`); the access
//! log (target `access`) goes to stdout as text or JSON lines, or nowhere when switched off.

use std::io::IsTerminal;

use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{Layer, fmt};

use crate::config::{AccessLogConfig, LogFormat};

pub fn init(access: &AccessLogConfig) {
    let diagnostics_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let diagnostics = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(
            Targets::new()
                .with_default(LevelFilter::TRACE)
                .with_target("access", LevelFilter::OFF),
        )
        .with_filter(diagnostics_filter);
    let access_targets = Targets::new().with_target(
        "access",
        if access.enabled {
            LevelFilter::INFO
        } else {
            LevelFilter::OFF
        },
    );
    let access_layer = match access.format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stdout)
            .with_ansi(std::io::stdout().is_terminal())
            .with_target(false)
            .with_filter(access_targets)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stdout)
            .with_filter(access_targets)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(diagnostics)
        .with(access_layer)
        .try_init();
}
