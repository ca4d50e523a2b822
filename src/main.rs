//! The `fulcrum` command: `demo`, `run`, `check`, `status` and `cert`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use fulcrum::config::{self, Config};

// Connections come and go with a few buffers each; mimalloc serves such churn with far
// fewer instructions than glibc's allocator (measured: see bench/README.md). Built without
// transparent huge pages: with them, 4,000 connections waiting for their heads held 19 KiB
// each instead of 7. (Its v2 build gave idle memory back sooner but cost 20% on 100 KiB
// responses: bench/README.md, memory section.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use fulcrum::server::Server;

#[derive(Parser)]
#[command(
    version,
    about = "Fulcrum: a high-availability HTTP load balancer and reverse proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start three built-in demo backends and balance across them.
    Demo {
        /// Where the demo's proxy listens for HTTP.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where it listens for HTTPS.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen_https: SocketAddr,
        /// Where the demo's CA and certificate are kept (made on first run).
        #[arg(long)]
        certs: Option<PathBuf>,
    },
    /// Run one demo backend, which answers every request with its name and address: three
    /// of them give the examples' upstreams something to balance over.
    Backend {
        #[arg(long)]
        listen: SocketAddr,
        /// What it calls itself in its answers (default: its address).
        #[arg(long)]
        name: Option<String>,
    },
    /// Run the proxy with a config file.
    Run {
        #[arg(short, long, default_value = "fulcrum.toml")]
        config: PathBuf,
    },
    /// Validate a config file and exit: 0 if it is good, 1 with every problem if not.
    Check {
        #[arg(short, long, default_value = "fulcrum.toml")]
        config: PathBuf,
    },
    /// Show a running Fulcrum's servers: state, weight, load, requests, errors, latency
    /// (from its admin listener).
    Status {
        /// The config the running Fulcrum was started with: its [admin] bind is asked.
        #[arg(short, long, default_value = "fulcrum.toml", conflicts_with = "admin")]
        config: PathBuf,
        /// The admin listener's address, instead of reading it from the config.
        #[arg(long, value_name = "ADDRESS")]
        admin: Option<SocketAddr>,
    },
    /// Certificates for development: a local CA, certificates it signs, and inspection.
    Cert {
        #[command(subcommand)]
        command: fulcrum::cert::cli::CertCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The main thread only waits for signals; workers serve on threads of their own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot start the async runtime");
    runtime.block_on(async {
        match cli.command {
            Command::Check { config } => check(&config),
            Command::Cert { command } => fulcrum::cert::cli::run(command),
            Command::Backend { listen, name } => backend(listen, name).await,
            Command::Status { config, admin } => status(&config, admin).await,
            Command::Run { config: path } => match config::load(&path) {
                Ok(config) => run(config, Some(&path)).await,
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            },
            Command::Demo {
                listen,
                listen_https,
                certs,
            } => {
                let setup = fulcrum::demo::DemoSetup {
                    listen,
                    listen_https,
                    cert_dir: certs.unwrap_or_else(fulcrum::cert::default_demo_dir),
                };
                demo(setup).await
            }
        }
    })
}

async fn demo(setup: fulcrum::demo::DemoSetup) -> ExitCode {
    match fulcrum::demo::start(&setup).await {
        Ok(Ok((config, certs))) => {
            println!(
                "Fulcrum demo: try `curl http://{}/` a few times to see the backends take turns,",
                setup.listen
            );
            println!(
                "and over HTTPS: `curl --cacert {} https://localhost:{}/`",
                certs.ca.display(),
                setup.listen_https.port()
            );
            run(config, None).await
        }
        Ok(Err(e)) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cannot start the demo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn backend(listen: SocketAddr, name: Option<String>) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("demo backend listening on {listen}");
    let name = name.unwrap_or_else(|| listen.to_string());
    tokio::select! {
        () = fulcrum::demo::serve_backend(name, listener) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    ExitCode::SUCCESS
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::load(path) {
        Ok(config) => {
            for warning in &config.warnings {
                eprintln!("{warning}");
            }
            let servers: usize = config
                .upstreams
                .iter()
                .map(|u| u.servers.len() + u.named.len())
                .sum();
            println!(
                "{}: ok ({} listeners, {} upstreams, {servers} servers)",
                path.display(),
                config.listeners.len(),
                config.upstreams.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn status(config: &std::path::Path, admin: Option<SocketAddr>) -> ExitCode {
    use fulcrum::admin::cli;
    let addr = match admin.map_or_else(|| cli::admin_addr_from_config(config), Ok) {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match cli::fetch_status(addr).await {
        Ok(status) => {
            print!("{}", cli::table(&status));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves until SIGTERM or SIGINT; on SIGHUP, reads the config file at `path` again and
/// applies it if it is good.
async fn run(config: Config, path: Option<&std::path::Path>) -> ExitCode {
    // Held to the end, so that queued access log lines are written out on exit.
    let _log = fulcrum::logging::init(&config.access_log);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let grace = config.timeouts.shutdown_grace;
    // Recorded now: once a package upgrade has replaced the file, this path names the new
    // binary, which SIGUSR2 starts.
    let binary = std::env::current_exe().ok();
    let inherited = match fulcrum::upgrade::inherited() {
        Ok(inherited) => inherited,
        Err(e) => {
            tracing::error!("cannot take over the old process's sockets: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::start_workers_inheriting(config, inherited) {
        Ok(server) => server,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let signal = {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("cannot listen for SIGTERM");
        let mut int = signal(SignalKind::interrupt()).expect("cannot listen for SIGINT");
        let mut hup = signal(SignalKind::hangup()).expect("cannot listen for SIGHUP");
        let mut usr2 = signal(SignalKind::user_defined2()).expect("cannot listen for SIGUSR2");
        loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = hup.recv() => reload(&server, path),
                _ = usr2.recv() => if upgrade(&server, binary.as_deref(), path).await {
                    break "SIGUSR2";
                },
            }
        }
    };
    tracing::info!(
        signal,
        ?grace,
        "shutting down: no new connections; requests in flight may finish"
    );
    if server.shutdown(grace).await {
        tracing::info!("all connections closed; exiting");
    } else {
        tracing::warn!(
            ?grace,
            "grace period over with connections still open; exiting"
        );
    }
    ExitCode::SUCCESS
}

/// SIGUSR2: hands the listening sockets over to a new process of `binary` (the file this
/// one was started from) with the config at `path`. True once the new process serves: this
/// one then stops accepting and finishes its connections; false, and this one serves on.
async fn upgrade(
    server: &Server,
    binary: Option<&std::path::Path>,
    path: Option<&std::path::Path>,
) -> bool {
    let (Some(binary), Some(path)) = (binary, path) else {
        tracing::warn!("SIGUSR2: no binary path or config file to upgrade with");
        return false;
    };
    match fulcrum::upgrade::hand_over(server, binary, path, None).await {
        Ok(pid) => {
            tracing::info!(
                pid,
                "SIGUSR2: upgraded: process {pid} serves now; this one stops accepting"
            );
            true
        }
        Err(e) => {
            tracing::error!("SIGUSR2: upgrade failed; still serving: {e}");
            false
        }
    }
}

fn reload(server: &Server, path: Option<&std::path::Path>) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: the demo has no config file to reload");
        return;
    };
    let outcome = config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|config| {
            for warning in &config.warnings {
                tracing::warn!("{warning}");
            }
            server.reload(config)
        });
    match outcome {
        Ok(()) => tracing::info!(config = %path.display(), "SIGHUP: config reloaded"),
        Err(e) => tracing::error!(
            config = %path.display(),
            "SIGHUP: config not reloaded; still serving with the previous one:\n{e}"
        ),
    }
}
