//! The `fulcrum` command: `demo`, `run`, `check`, `status`, `cert`, and `reload`, `upgrade`
//! and `ha switchover`, which act on a running Fulcrum through its control socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use fulcrum::config::{self, Config};
use fulcrum::ha::cli::HaCommand;

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
    /// The active/standby group ([ha]): this node's role, or a planned switchover.
    Ha {
        #[command(subcommand)]
        command: HaCommand,
    },
    /// Certificates for development: a local CA, certificates it signs, and inspection.
    Cert {
        #[command(subcommand)]
        command: fulcrum::cert::cli::CertCommand,
    },
    /// Have the Fulcrum started with this config file read it again and apply it; prints
    /// the outcome (the errors, with file:line:col, if the file is not good).
    Reload {
        #[arg(short, long, default_value = "fulcrum.toml")]
        config: PathBuf,
    },
    /// Replace the Fulcrum started with this config file by one running this binary,
    /// without refusing a connection: the new process takes the listeners over, the old
    /// one finishes what it has and exits.
    Upgrade {
        #[arg(short, long, default_value = "fulcrum.toml")]
        config: PathBuf,
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
            Command::Ha {
                command: HaCommand::Status { config, admin },
            } => fulcrum::ha::cli::status(&config, admin).await,
            Command::Backend { listen, name } => backend(listen, name).await,
            Command::Status { config, admin } => status(&config, admin).await,
            Command::Reload { config } => reload_command(&config).await,
            Command::Upgrade { config } => upgrade_command(&config).await,
            Command::Ha {
                command: HaCommand::Switchover { config },
            } => switchover_command(&config).await,
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
/// applies it if it is good. With a config file, the control socket takes `fulcrum reload`,
/// `fulcrum upgrade` and `fulcrum ha switchover` requests, which are handled here too. The
/// control socket and the listeners are bound now, or taken from the process this one
/// replaces in a binary upgrade (see `fulcrum::upgrade`); SIGUSR2 starts such an upgrade
/// with the binary this process was started from.
async fn run(config: Config, path: Option<&Path>) -> ExitCode {
    // First of all: a signal's default action ends the process, so one sent while it
    // starts (as soon as its listeners accept, or a deploy script's early SIGUSR2 or
    // SIGHUP) would kill it. Caught from here on, it waits until the loop below runs.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("cannot listen for SIGTERM");
    let mut int = signal(SignalKind::interrupt()).expect("cannot listen for SIGINT");
    let mut hup = signal(SignalKind::hangup()).expect("cannot listen for SIGHUP");
    let mut usr2 = signal(SignalKind::user_defined2()).expect("cannot listen for SIGUSR2");
    // Held to the end, so that queued access log lines are written out on exit.
    let _log = fulcrum::logging::init(&config.access_log);
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let grace = config.timeouts.shutdown_grace;
    // Recorded now: once a package upgrade has replaced the file, this path names the new
    // binary, which SIGUSR2 starts.
    let binary = std::env::current_exe().ok();
    let mut inherited = match fulcrum::upgrade::inherited() {
        Ok(inherited) => inherited,
        Err(e) => {
            tracing::error!("cannot take over the old process's sockets: {e}");
            return ExitCode::FAILURE;
        }
    };
    let inherited_control = inherited.as_mut().and_then(|i| i.take_control());
    // Until this process serves, the socket file is the old process's: a failed start must
    // leave it in place.
    let control_inherited = inherited_control.is_some();
    // Before the listeners: a second process with this file would otherwise bind them
    // beside the first one (SO_REUSEPORT) and take a share of its connections.
    let (mut control, reloads, mut requests) = match start_control(&config, path, inherited_control)
    {
        Ok(Some((control, reloads, requests))) => (Some(control), Some(reloads), Some(requests)),
        Ok(None) => (None, None, None),
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::start_workers_inheriting(config, inherited) {
        Ok(server) => server,
        Err(e) => {
            tracing::error!("{e}");
            if let Some(mut control) = control {
                if control_inherited {
                    control.handed_over();
                }
                control.stop().await;
            }
            return ExitCode::FAILURE;
        }
    };
    if let Some(reloads) = reloads {
        server.send_reloads_to(reloads);
    }
    let stop_reason = {
        loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = hup.recv() => {
                    let _ = reload(&server, path, "SIGHUP");
                }
                Some((request, reply_to)) = next_request(&mut requests) => {
                    // A switchover drains connections for up to seconds first: meanwhile
                    // this loop answers signals and other requests.
                    if request == fulcrum::control::Request::HaSwitchover {
                        let switchover = ha_switchover(&server);
                        tokio::spawn(async move {
                            let _ = reply_to.send(switchover.await.into());
                        });
                        continue;
                    }
                    let (reply, stop) =
                        handle_request(request, &server, path, control.as_mut(), grace).await;
                    let _ = reply_to.send(reply);
                    if let Some(reason) = stop {
                        break reason;
                    }
                }
                _ = usr2.recv() => {
                    let Some(binary) = binary.as_deref().and_then(Path::to_str) else {
                        tracing::error!("SIGUSR2: cannot tell which binary this process was started from");
                        continue;
                    };
                    let upgrade = fulcrum::control::Request::Upgrade { binary: binary.to_string() };
                    let (_, stop) = handle_request(upgrade, &server, path, control.as_mut(), grace).await;
                    if let Some(reason) = stop {
                        break reason;
                    }
                }
            }
        }
    };
    // Requests still queued are told that nothing will come of them.
    drop(requests);
    tracing::info!(
        reason = stop_reason,
        ?grace,
        "shutting down: no new connections; requests in flight may finish"
    );
    if let Some(control) = control {
        control.stop().await;
    }
    if server.shutdown(grace).await {
        tracing::info!("all connections closed; exiting");
    } else {
        tracing::warn!(
            ?grace,
            "grace period over with connections still open; exiting"
        );
        // Tunnels left open are reset and logged rather than closed by the exit, which
        // would pass for a clean end.
        fulcrum::l4::relay::cut_tunnels(Duration::from_millis(200)).await;
    }
    ExitCode::SUCCESS
}

type ControlRequest = (
    fulcrum::control::Request,
    tokio::sync::oneshot::Sender<fulcrum::control::Reply>,
);

/// The control socket of a process run with a config file, serving; a sender of requests
/// for the admin API; and the run loop's end of the requests. `None` for the demo.
fn start_control(
    config: &Config,
    path: Option<&Path>,
    inherited: Option<std::os::unix::net::UnixListener>,
) -> Result<
    Option<(
        fulcrum::control::Control,
        fulcrum::control::Requests,
        tokio::sync::mpsc::Receiver<ControlRequest>,
    )>,
    String,
> {
    let (Some(path), Some(control)) = (path, &config.control) else {
        return Ok(None);
    };
    // The old process's socket, unless the file now names another path: then a fresh one
    // there, so that commands given the file find this process.
    let at_configured_path = |listener: &std::os::unix::net::UnixListener| {
        listener
            .local_addr()
            .is_ok_and(|addr| addr.as_pathname() == Some(control.socket.as_path()))
    };
    let listener = match inherited {
        Some(listener) if at_configured_path(&listener) => listener,
        _ => fulcrum::control::bind(&control.socket)?,
    };
    let status = fulcrum::control::Status {
        pid: std::process::id(),
        config: path.display().to_string(),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    // A few at most: the control socket serves a handful of connections, the admin API
    // one reload at a time per connection.
    let (requests, queue) = tokio::sync::mpsc::channel(8);
    let control = fulcrum::control::serve(listener, &control.socket, status, requests.clone())
        .map_err(|e| {
            format!(
                "cannot serve the control socket {}: {e}",
                control.socket.display()
            )
        })?;
    Ok(Some((control, requests, queue)))
}

async fn next_request(
    requests: &mut Option<tokio::sync::mpsc::Receiver<ControlRequest>>,
) -> Option<ControlRequest> {
    match requests {
        Some(requests) => requests.recv().await,
        None => std::future::pending().await,
    }
}

/// Acts on a request from the control socket or the admin API: the reply, and the reason
/// to shut down if the request ends this process's service.
async fn handle_request(
    request: fulcrum::control::Request,
    server: &Server,
    path: Option<&Path>,
    control: Option<&mut fulcrum::control::Control>,
    grace: Duration,
) -> (fulcrum::control::Reply, Option<&'static str>) {
    use fulcrum::control::{Reply, Request};
    match request {
        Request::Reload => (reload(server, path, "reload request").into(), None),
        Request::Upgrade { binary } => {
            let (Some(path), Some(control)) = (path, control) else {
                return (
                    Reply::error("this Fulcrum has no config file: it cannot be upgraded"),
                    None,
                );
            };
            match fulcrum::upgrade::hand_over(
                server,
                Path::new(&binary),
                path,
                Some(control.listener()),
            )
            .await
            {
                Ok(new_pid) => {
                    control.handed_over();
                    // The new process holds the virtual addresses now: leave them on.
                    if let Some(ha) = server.ha() {
                        ha.leave(false).await;
                    }
                    let message = format!(
                        "upgraded: process {new_pid} serves, process {} drains (up to {})",
                        std::process::id(),
                        humantime::format_duration(grace)
                    );
                    tracing::info!("{message}");
                    (Reply::ok(message), Some("binary upgrade"))
                }
                Err(e) => {
                    tracing::error!("binary upgrade failed; this process serves on: {e}");
                    (Reply::error(format!("not upgraded: {e}")), None)
                }
            }
        }
        Request::HaSwitchover => (ha_switchover(server).await.into(), None),
        // The control socket answers these itself.
        Request::Status => (Reply::ok("running"), None),
    }
}

/// Hands the active role of a high-availability pair to a peer; resolves once it holds it.
fn ha_switchover(server: &Server) -> impl Future<Output = Result<String, String>> + use<> {
    let ha = server.ha();
    async move {
        let Some(ha) = ha else {
            return Err("high availability is not configured ([ha] section)".to_string());
        };
        ha.switchover()
            .await
            .map(|peer| format!("switched over: {peer} is active"))
    }
}

/// Reads the config file at `path` again and applies it if it is good: `Ok("reloaded")`,
/// or every reason it was not. `trigger` names what asked, for the log.
fn reload(server: &Server, path: Option<&Path>, trigger: &str) -> Result<String, String> {
    let Some(path) = path else {
        tracing::warn!("{trigger}: the demo has no config file to reload");
        return Err("the demo has no config file to reload".to_string());
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
        Ok(()) => {
            tracing::info!(config = %path.display(), "{trigger}: config reloaded");
            Ok("reloaded".to_string())
        }
        Err(e) => {
            tracing::error!(
                config = %path.display(),
                "{trigger}: config not reloaded; still serving with the previous one:\n{e}"
            );
            Err(format!(
                "not reloaded; still serving with the previous config:\n{e}"
            ))
        }
    }
}

/// `fulcrum reload -c FILE`.
async fn reload_command(config: &Path) -> ExitCode {
    tell_running(
        config,
        &fulcrum::control::Request::Reload,
        Duration::from_secs(30),
    )
    .await
}

/// `fulcrum upgrade -c FILE`: checked here first, so that a bad file is reported without
/// disturbing the running process.
async fn upgrade_command(config: &Path) -> ExitCode {
    use fulcrum::control::Request;
    if let Err(e) = config::load(config) {
        eprintln!("{e}");
        eprintln!("{}: not upgraded: fix the config first", config.display());
        return ExitCode::FAILURE;
    }
    let binary = match std::env::current_exe() {
        Ok(binary) => binary,
        Err(e) => {
            eprintln!("cannot tell which binary this is: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(binary) = binary.to_str().map(str::to_string) else {
        eprintln!(
            "the binary's path {} is not UTF-8, which the control socket cannot carry",
            binary.display()
        );
        return ExitCode::FAILURE;
    };
    let request = Request::Upgrade { binary };
    match ask_running(config, &request, Duration::from_secs(60)).await {
        Ok(reply) if reply.ok => {
            println!("{}", reply.message);
            ExitCode::SUCCESS
        }
        Ok(reply) => {
            eprintln!("{}: {}", config.display(), reply.message);
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}

/// `fulcrum ha switchover -c FILE`.
async fn switchover_command(config: &Path) -> ExitCode {
    let request = fulcrum::control::Request::HaSwitchover;
    tell_running(config, &request, Duration::from_secs(60)).await
}

/// Sends `request` to the Fulcrum running with `config` and prints its answer after the
/// file's name: on stdout and exit 0 if it did it, on stderr and exit 1 if not.
async fn tell_running(
    config: &Path,
    request: &fulcrum::control::Request,
    within: Duration,
) -> ExitCode {
    match ask_running(config, request, within).await {
        Ok(reply) if reply.ok => {
            println!("{}: {}", config.display(), reply.message);
            ExitCode::SUCCESS
        }
        Ok(reply) => {
            eprintln!("{}: {}", config.display(), reply.message);
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}

/// Sends `request` to the Fulcrum running with the config file `config`, through the
/// control socket that file names (or its default); on failure, says why and returns the
/// exit code.
async fn ask_running(
    config: &Path,
    request: &fulcrum::control::Request,
    within: Duration,
) -> Result<fulcrum::control::Reply, ExitCode> {
    use fulcrum::control::client::{AskError, ask};
    let socket = match config::control::socket_of(config) {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("{e}");
            eprintln!(
                "{}: its control socket cannot be found until the file reads as TOML: nothing was sent",
                config.display()
            );
            return Err(ExitCode::FAILURE);
        }
    };
    match ask(&socket, request, within).await {
        Ok(reply) => Ok(reply),
        Err(AskError::NotRunning { socket }) => {
            eprintln!(
                "no Fulcrum runs with {}: nothing answers on {}",
                config.display(),
                socket.display()
            );
            Err(ExitCode::FAILURE)
        }
        Err(AskError::Failed(e)) => {
            eprintln!("{e}");
            Err(ExitCode::FAILURE)
        }
    }
}
