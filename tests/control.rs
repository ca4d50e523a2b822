//! The control socket end to end: a real `fulcrum run -c FILE`, real backends, and the real
//! `fulcrum reload -c FILE` finding it by the file; `POST /api/reload`; a second process and
//! a stale socket file; and clients that misbehave on the socket.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{Backend, Process, TempDir, binary, client, get_text, unused_addr};

/// Two upstreams, `one` on backend {0} and `two` on backend {1}; the route goes to `route`.
fn two_upstreams(route: &str, extra: &str) -> String {
    format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"{route}\"\n\
         [upstreams.one]\nservers = [{{ address = \"{{0}}\" }}]\n\
         [upstreams.two]\nservers = [{{ address = \"{{1}}\" }}]\n\
         [access_log]\nenabled = false\n{extra}"
    )
}

/// The output of a `fulcrum` command run to its end (within 60 s).
struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `fulcrum ARGS` with default control sockets in `run_dir`, off the async runtime.
async fn fulcrum(args: &[&str], config: &Path, run_dir: &Path) -> Outcome {
    let mut command = binary();
    command
        .args(args)
        .arg("-c")
        .arg(config)
        .env("FULCRUM_RUN_DIR", run_dir);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    Outcome {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The directory `Process` gives its control socket (and keeps its config in).
fn run_dir(process: &Process) -> PathBuf {
    process.config.parent().unwrap().to_path_buf()
}

/// The control socket files in `dir`.
fn sockets_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .map(|e| e.path())
        .collect()
}

/// Which backend answered each of `n` requests, counted.
async fn answers(process: &Process, n: usize) -> HashMap<String, usize> {
    let client = client();
    let mut seen = HashMap::new();
    for _ in 0..n {
        *seen
            .entry(get_text(&client, &process.url("/")).await)
            .or_default() += 1;
    }
    seen
}

fn only(name: &str, n: usize) -> HashMap<String, usize> {
    HashMap::from([(name.to_string(), n)])
}

#[tokio::test]
async fn reload_applies_an_edited_file_reports_a_broken_one_and_the_socket_goes_with_the_process() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let control = "[control]\nsocket = \"ctl/web.sock\"\n";
    let mut process = Process::start(&two_upstreams("one", control), &[&a, &b]);
    let socket = run_dir(&process).join("ctl/web.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    assert_eq!(answers(&process, 4).await, only("a", 4));

    // The route moved to the other upstream: the command says so, and traffic follows.
    let moved = support::fill(&two_upstreams("two", control), &[&a, &b]);
    std::fs::write(&process.config, &moved).unwrap();
    let out = fulcrum(&["reload"], &process.config, Path::new("/nonexistent")).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(
        out.stdout.trim(),
        format!("{}: reloaded", process.config.display())
    );
    assert_eq!(answers(&process, 4).await, only("b", 4));

    // A file with an error of meaning: its place is printed, and `two` goes on serving.
    std::fs::write(
        &process.config,
        moved.replace(
            "[access_log]",
            "[upstreams.two.health_check]\nrise = 0\n[access_log]",
        ),
    )
    .unwrap();
    let out = fulcrum(&["reload"], &process.config, Path::new("/nonexistent")).await;
    assert_eq!(out.code, 1, "{}", out.all());
    let place = format!("{}:10:8", process.config.display());
    assert!(out.stderr.contains(&place), "{place} in {}", out.all());
    assert!(out.stderr.contains("not reloaded"), "{}", out.all());
    assert_eq!(answers(&process, 4).await, only("b", 4));

    // A file that is not even TOML: the command cannot find the socket in it, says where
    // the file is broken, and the process is left alone.
    std::fs::write(&process.config, format!("{moved}\n[listeners\n")).unwrap();
    let out = fulcrum(&["reload"], &process.config, Path::new("/nonexistent")).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stderr
            .contains(&format!("{}:14:", process.config.display())),
        "{}",
        out.all()
    );
    assert_eq!(answers(&process, 4).await, only("b", 4));

    // A graceful exit takes the socket file with it.
    process.signal("TERM");
    assert_eq!(process.wait(Duration::from_secs(30)), 0);
    assert!(!socket.exists(), "{} is left", socket.display());
}

#[tokio::test]
async fn the_default_socket_is_found_by_the_file_and_guards_it_against_a_second_process() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let bind = unused_addr();
    let config = |weights: (u32, u32)| {
        format!(
            "[listeners.web]\nbind = \"{bind}\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
             [upstreams.app]\nservers = [{{ address = \"{{0}}\", weight = {} }}, {{ address = \"{{1}}\", weight = {} }}]\n\
             [access_log]\nenabled = false\n",
            weights.0, weights.1
        )
    };
    let mut first = Process::start(&config((1, 1)), &[&a, &b]);
    let dir = run_dir(&first);
    let sockets = sockets_in(&dir);
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    let name = sockets[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        name.starts_with("fulcrum-") && name.ends_with(".sock") && name.len() == 29,
        "{name}"
    );

    // A server's weight changed: the default socket is found from the same file.
    std::fs::write(&first.config, support::fill(&config((9, 1)), &[&a, &b])).unwrap();
    let out = fulcrum(&["reload"], &first.config, &dir).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let seen = answers(&first, 20).await;
    assert_eq!(seen.get("a"), Some(&18), "{seen:?}");

    // A second process with the same file refuses to start, and the first serves on.
    let out = fulcrum(&["run"], &first.config, &dir).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stderr.contains(&format!(
            "another Fulcrum (process {}) runs with this config: its control socket {} answers",
            first.child.id(),
            sockets[0].display()
        )),
        "{}",
        out.all()
    );
    assert_eq!(answers(&first, 10).await.values().sum::<usize>(), 10);

    // Killed, the first leaves its socket file; a new process replaces it and is reached.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert!(sockets[0].exists());
    let log = dir.join("second.log");
    let mut second = binary()
        .args(["run", "-c"])
        .arg(&first.config)
        .env("FULCRUM_RUN_DIR", &dir)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log).unwrap().contains("listening") {
        assert!(
            second.try_wait().unwrap().is_none(),
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(
            Instant::now() < deadline,
            "the second process did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = fulcrum(&["reload"], &first.config, &dir).await;
    let _ = second.kill();
    let _ = second.wait();
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("control socket left by a process that is gone: replaced")
    );
}

#[tokio::test]
async fn reload_of_a_file_nothing_runs_with_says_so() {
    let dir = TempDir::new();
    let other = dir.0.join("other.toml");
    std::fs::write(
        &other,
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
         [upstreams.app]\nservers = [{ address = \"127.0.0.1:1\" }]\n",
    )
    .unwrap();
    let out = fulcrum(&["reload"], &other, &dir.0).await;
    assert_eq!(out.code, 1, "{}", out.all());
    let line = format!(
        "no Fulcrum runs with {}: nothing answers on ",
        other.display()
    );
    assert!(out.stderr.contains(&line), "{}", out.all());
    assert!(
        out.stderr.contains(&dir.0.display().to_string()),
        "{}",
        out.all()
    );

    // A stale file (a socket nobody listens on) reads the same.
    let socket = config_socket(&other, &dir.0);
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let out = fulcrum(&["reload"], &other, &dir.0).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains(&line), "{}", out.all());
}

/// The default control socket of `config` with run directory `run_dir`.
fn config_socket(config: &Path, run_dir: &Path) -> PathBuf {
    let canonical = std::fs::canonicalize(config).unwrap();
    run_dir.join(fulcrum::config::control::socket_name(&canonical))
}

const TOKEN: &str = "control-test-token-0123456789";

#[tokio::test]
async fn post_api_reload_reloads_with_the_token_only() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let secrets = TempDir::new();
    let token_file = secrets.0.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let admin = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
        token_file.display()
    );
    let process = Process::start(&two_upstreams("one", &admin), &[&a, &b]);
    let line = process.log_from("admin listener").await;
    let addr = line
        .lines()
        .next()
        .unwrap()
        .split("addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let url = format!("http://{addr}/api/reload");
    let http = client();

    let moved = support::fill(&two_upstreams("two", &admin), &[&a, &b]);
    std::fs::write(&process.config, &moved).unwrap();
    let without = http.post(&url).send().await.unwrap();
    assert_eq!(without.status(), 401);
    let wrong = http
        .post(&url)
        .bearer_auth("not-the-token-at-all-0123")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(answers(&process, 3).await, only("a", 3));
    assert_eq!(
        http.get(&url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .status(),
        405
    );

    let with = http.post(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(with.status(), 200);
    let body: serde_json::Value = serde_json::from_str(&with.text().await.unwrap()).unwrap();
    assert_eq!(body["reloaded"], true, "{body}");
    assert_eq!(answers(&process, 3).await, only("b", 3));

    // A bad file: 400 with the error's place, and the running config stays.
    std::fs::write(
        &process.config,
        moved.replace("upstream = \"two\"", "upstream = \"three\""),
    )
    .unwrap();
    let bad = http.post(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = serde_json::from_str(&bad.text().await.unwrap()).unwrap();
    let error = body["error"].as_str().unwrap();
    let place = format!("{}:4:12", process.config.display());
    assert!(error.contains(&place), "{place} in {error}");
    assert_eq!(answers(&process, 3).await, only("b", 3));

    // The config shows where the control socket is.
    let config: serde_json::Value =
        serde_json::from_str(&get_text(&http, &format!("http://{addr}/api/config")).await).unwrap();
    let socket = config["control"]["socket"].as_str().unwrap();
    assert_eq!(Path::new(socket), sockets_in(&run_dir(&process))[0]);
}

/// Sends `bytes` on a new connection to `socket` and reads what comes back until the
/// server closes (or 15 s pass).
fn exchange(socket: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    // The server may close before reading all of an over-long line.
    let _ = stream.write_all(bytes);
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply
}

#[tokio::test]
async fn misbehaving_clients_get_an_error_or_a_close_and_others_are_still_answered() {
    let a = Backend::named("a").await;
    let b = Backend::named("b").await;
    let process = Process::start(&two_upstreams("one", ""), &[&a, &b]);
    let dir = run_dir(&process);
    let socket = sockets_in(&dir).remove(0);

    // Idle connections, opened first and holding slots while others are served.
    let idle: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let started = Instant::now();

    let garbage = exchange(&socket, b"hello there\n");
    let reply: serde_json::Value = serde_json::from_str(&garbage).unwrap();
    assert_eq!(reply["ok"], false, "{garbage}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .starts_with("not a control request"),
        "{garbage}"
    );
    let unknown = exchange(&socket, b"{\"request\":\"self-destruct\"}\n");
    assert!(unknown.contains("\"ok\":false"), "{unknown}");

    // Over-long: an error reply, or the connection closed before all of it was read.
    let long = exchange(&socket, &vec![b'x'; 1 << 20]);
    assert!(
        long.is_empty() || long.contains("over 8192 bytes"),
        "{long}"
    );

    // Status, and a real reload, still answered while the idle ones wait.
    let status: serde_json::Value =
        serde_json::from_str(&exchange(&socket, b"{\"request\":\"status\"}\n")).unwrap();
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["status"]["pid"], process.child.id(), "{status}");
    assert_eq!(
        status["status"]["config"],
        process.config.display().to_string()
    );
    let moved = support::fill(&two_upstreams("two", ""), &[&a, &b]);
    std::fs::write(&process.config, moved).unwrap();
    let out = fulcrum(&["reload"], &process.config, &dir).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(answers(&process, 3).await, only("b", 3));

    // The idle ones are told off within the read timeout (5 s), and closed.
    for mut stream in idle {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(reply.contains("no request line within"), "{reply}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(20),
        "{waited:?}"
    );

    // More connections than the socket serves at once: the extra are closed at once, and
    // once the crowd is gone a command gets through.
    let crowd: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = exchange(&socket, b"{\"request\":\"status\"}\n");
    assert_eq!(refused, "", "a ninth connection was served");
    drop(crowd);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = fulcrum(&["reload"], &process.config, &dir).await;
    assert_eq!(out.code, 0, "{}", out.all());
}

#[tokio::test]
async fn upgrade_checks_the_file_itself_before_asking_the_process() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let process = Process::start(&two_upstreams("one", ""), &[&a, &b]);
    let dir = run_dir(&process);
    let good = std::fs::read_to_string(&process.config).unwrap();
    std::fs::write(
        &process.config,
        good.replace("upstream = \"one\"", "upstream = \"none\""),
    )
    .unwrap();
    let out = fulcrum(&["upgrade"], &process.config, &dir).await;
    assert_eq!(out.code, 1, "{}", out.all());
    let place = format!("{}:4:12", process.config.display());
    assert!(out.stderr.contains(&place), "{place} in {}", out.all());
    assert!(
        out.stderr.contains("not upgraded: fix the config first"),
        "{}",
        out.all()
    );
    // The process was not asked: its log has no request of any kind, and it serves on.
    assert_eq!(answers(&process, 3).await, only("a", 3));
    let log = process.stderr.lock().unwrap().clone();
    assert!(!log.contains("upgrade"), "{log}");

    // With nothing running, the command says so.
    std::fs::write(&process.config, &good).unwrap();
    let elsewhere = TempDir::new();
    let out = fulcrum(&["upgrade"], &process.config, &elsewhere.0).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("nothing answers on"), "{}", out.all());
}

/// The process `fulcrum upgrade` says serves now.
fn new_pid(out: &Outcome) -> u32 {
    out.stdout
        .split("upgraded: process ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no new pid in {}", out.all()))
}

/// A process this test did not start itself (one a binary upgrade started): killed at the end.
struct Successor(u32);

impl Drop for Successor {
    fn drop(&mut self) {
        support::send_signal(self.0, "KILL");
    }
}

#[tokio::test]
async fn fulcrum_upgrade_replaces_the_process_and_its_control_socket_answers_from_the_new_one() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let mut process = Process::start(&two_upstreams("one", ""), &[&a, &b]);
    let dir = run_dir(&process);
    assert_eq!(answers(&process, 2).await, only("a", 2));

    let out = fulcrum(&["upgrade"], &process.config, &dir).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let new = new_pid(&out);
    let _successor = Successor(new);
    assert_ne!(new, process.child.id());
    // The old process had nothing in flight: it finishes at once and exits cleanly.
    assert_eq!(process.wait(Duration::from_secs(20)), 0);
    assert_eq!(answers(&process, 2).await, only("a", 2));

    // The socket file is the new process's now (the old one left it in place), and a
    // reload through it reaches the new process.
    assert_eq!(sockets_in(&dir).len(), 1, "{dir:?}");
    std::fs::write(
        &process.config,
        support::fill(&two_upstreams("two", ""), &[&a, &b]),
    )
    .unwrap();
    let out = fulcrum(&["reload"], &process.config, &dir).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(answers(&process, 2).await, only("b", 2));
    let out = fulcrum(&["upgrade"], &process.config, &dir).await;
    assert_eq!(
        out.code,
        0,
        "a second upgrade from the new process: {}",
        out.all()
    );
    let newer = new_pid(&out);
    let _newer = Successor(newer);
    assert_eq!(answers(&process, 2).await, only("b", 2));
}

#[tokio::test]
async fn an_upgrade_that_fails_after_the_handover_leaves_the_old_process_its_control_socket() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let process = Process::start(&two_upstreams("one", ""), &[&a, &b]);
    let dir = run_dir(&process);
    // The new process takes the sockets, then cannot bind a listener on a port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let good = std::fs::read_to_string(&process.config).unwrap();
    std::fs::write(
        &process.config,
        format!(
            "{good}\n[listeners.more]\nbind = \"{}\"\n[[listeners.more.routes]]\nupstream = \"two\"\n",
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let out = fulcrum(&["upgrade"], &process.config, &dir).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.all().contains("not upgraded"), "{}", out.all());
    assert_eq!(answers(&process, 2).await, only("a", 2));

    // The old process still answers on its control socket.
    std::fs::write(&process.config, &good).unwrap();
    assert_eq!(sockets_in(&dir).len(), 1, "{dir:?}");
    let out = fulcrum(&["reload"], &process.config, &dir).await;
    assert_eq!(out.code, 0, "{}", out.all());
}
