//! Log output: diagnostics go to stderr (filtered by `RUST_LOG`, default `info`); the access
//! log (target `access`) goes to stdout as text or JSON lines, or nowhere when switched off.
//!
//! A worker never waits for stdout: access log lines go through a bounded queue to a writer
//! thread, and when a slow reader lets the queue fill, lines are dropped, counted, and the
//! count reported on stderr.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{Layer, fmt};

use crate::config::{AccessLogConfig, LogFormat};

/// Access log lines waiting for stdout at most; about 200 bytes each.
const QUEUED_LINES: usize = 16 * 1024;
/// How often dropped lines are reported.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// Keeps the access log's writer thread; dropping it writes out what is queued (waiting at
/// most a second for a stalled stdout).
pub struct LogGuard {
    _writer: WorkerGuard,
}

pub fn init(access: &AccessLogConfig) -> LogGuard {
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
    let (stdout, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUED_LINES)
        .lossy(true)
        .thread_name("fulcrum-access-log")
        .finish(std::io::stdout());
    if access.enabled {
        report_dropped_lines(stdout.error_counter());
        let _ = DROPPED.set(stdout.error_counter());
    }
    let access_layer = match access.format {
        LogFormat::Text => fmt::layer()
            .with_writer(stdout)
            .with_ansi(std::io::stdout().is_terminal())
            .with_target(false)
            .with_filter(access_targets)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(stdout)
            .with_filter(access_targets)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(diagnostics)
        .with(access_layer)
        .try_init();
    LogGuard { _writer: guard }
}

/// The count of dropped access log lines, once `init` has set up the access log.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Access log lines dropped so far because stdout did not keep up; `None` where this
/// process's access log was not set up by [`init`].
pub fn dropped_lines() -> Option<u64> {
    DROPPED.get().map(|counter| counter.dropped_lines() as u64)
}

/// Says on stderr, at most every `REPORT_EVERY`, how many access log lines were dropped
/// since the last report because stdout did not keep up.
fn report_dropped_lines(dropped: ErrorCounter) {
    let watch = move || {
        let mut reported = 0;
        loop {
            std::thread::sleep(REPORT_EVERY);
            let now = dropped.dropped_lines();
            if now > reported {
                tracing::warn!(
                    dropped = now - reported,
                    total = now,
                    "access log lines dropped: stdout is not keeping up"
                );
                reported = now;
            }
        }
    };
    let _ = std::thread::Builder::new()
        .name("fulcrum-log-watch".into())
        .spawn(watch);
}
