//! Two real `fulcrum` processes forming an HA group on loopback: heartbeats over
//! 127.0.0.1, virtual addresses 127.77.T.N/32 on `lo` (each node its own, so that the
//! addresses show which node holds the role; T is unique per test). Needs root, as CI and
//! the namespace tests do. The roles are read from each node's `/api/status`.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Process, TempDir, read_until_close, unused_addr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const INTERVAL_MS: u64 = 100;
const DEAD_AFTER: u32 = 3;
/// How long a change may take beyond the dead time on a busy machine.
const SLACK: Duration = Duration::from_secs(3);
const KEY: &str = "loopback-test-key-0123456789";
const TOKEN: &str = "loopback-test-admin-token-0123456789";

fn dead_time() -> Duration {
    Duration::from_millis(INTERVAL_MS) * DEAD_AFTER
}

/// Virtual addresses of one test, taken off `lo` when it ends, however it ends.
struct Addresses(Vec<String>);

impl Addresses {
    fn new(test: u8) -> Addresses {
        let all = Addresses((1..=2).map(|n| format!("127.77.{test}.{n}/32")).collect());
        all.remove_all();
        all
    }

    fn of(&self, node: usize) -> &str {
        &self.0[node]
    }

    fn on_lo(&self, node: usize) -> bool {
        let out = std::process::Command::new("ip")
            .args(["-o", "addr", "show", "dev", "lo"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .any(|w| w == self.of(node))
    }

    fn remove(&self, node: usize) {
        let _ = std::process::Command::new("ip")
            .args(["addr", "del", self.of(node), "dev", "lo"])
            .output();
    }

    fn add(&self, node: usize) {
        let ok = std::process::Command::new("ip")
            .args(["addr", "add", self.of(node), "dev", "lo"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip addr add {} dev lo", self.of(node));
    }

    fn remove_all(&self) {
        for node in 0..self.0.len() {
            self.remove(node);
        }
    }
}

impl Drop for Addresses {
    fn drop(&mut self) {
        self.remove_all();
    }
}

/// A free UDP port on 127.0.0.1.
fn udp_addr() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The key and admin token files, shared by the nodes of a test.
struct Secrets {
    dir: TempDir,
}

impl Secrets {
    fn new() -> Secrets {
        let dir = TempDir::new();
        std::fs::write(dir.0.join("ha.key"), KEY).unwrap();
        std::fs::write(dir.0.join("admin.token"), TOKEN).unwrap();
        Secrets { dir }
    }
}

struct NodeSpec {
    name: &'static str,
    priority: u8,
    preempt: bool,
    bind: SocketAddr,
    peers: Vec<SocketAddr>,
    address: String,
    /// The upstream's one server.
    server: SocketAddr,
    /// TOML added at the end of the file, inside `[ha]`; then `[upstreams.app.*]` tables.
    extra: String,
}

impl NodeSpec {
    fn new(name: &'static str, priority: u8, preempt: bool, address: &str) -> NodeSpec {
        NodeSpec {
            name,
            priority,
            preempt,
            bind: udp_addr(),
            peers: vec![udp_addr()],
            address: address.to_string(),
            server: unused_addr(),
            extra: String::new(),
        }
    }
}

fn config(spec: &NodeSpec, secrets: &Secrets) -> String {
    let peers: Vec<String> = spec.peers.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
         [upstreams.app]\nservers = [{{ address = \"{server}\" }}]\n\
         [admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"{dir}/admin.token\"\n\
         [ha]\nnode = \"{name}\"\npriority = {priority}\ngroup = 7\nbind = \"{bind}\"\n\
         peers = [{peers}]\nkey_file = \"{dir}/ha.key\"\ninterface = \"lo\"\n\
         virtual_addresses = [\"{address}\"]\nheartbeat_interval = \"{INTERVAL_MS}ms\"\n\
         dead_after = {DEAD_AFTER}\npreempt = {preempt}\n{extra}\n",
        server = spec.server,
        extra = spec.extra,
        dir = secrets.dir.0.display(),
        name = spec.name,
        priority = spec.priority,
        bind = spec.bind,
        peers = peers.join(", "),
        address = spec.address,
        preempt = spec.preempt,
    )
}

struct Node {
    process: Process,
    admin: SocketAddr,
}

impl Node {
    async fn start(spec: &NodeSpec, secrets: &Secrets) -> Node {
        Node::start_with(spec, secrets, |_| {}).await
    }

    async fn start_with(
        spec: &NodeSpec,
        secrets: &Secrets,
        configure: impl FnOnce(&mut std::process::Command),
    ) -> Node {
        let process = Process::start_with(&config(spec, secrets), &[], configure);
        let line = process.log_from("admin listener").await;
        let admin = line
            .lines()
            .next()
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no admin address in {line}"));
        Node { process, admin }
    }

    /// The node's `/api/status` `ha`, once its admin listener answers (it binds after the
    /// listener whose log line `Process::start` waits for).
    async fn status(&self) -> Value {
        let url = format!("http://{}/api/status", self.admin);
        let deadline = Instant::now() + SLACK;
        loop {
            match support::client().get(&url).send().await {
                Ok(response) => {
                    let status: Value =
                        serde_json::from_str(&response.text().await.unwrap()).unwrap();
                    return status["ha"].clone();
                }
                Err(e) => assert!(Instant::now() < deadline, "{url}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn role(&self) -> String {
        self.status().await["role"].as_str().unwrap().to_string()
    }

    /// Waits until the node's role is `role`; returns its status then and how long it took.
    async fn wait_for(&self, role: &str, within: Duration) -> (Value, Duration) {
        let start = Instant::now();
        loop {
            let status = self.status().await;
            if status["role"] == role {
                return (status, start.elapsed());
            }
            assert!(
                start.elapsed() < within,
                "not {role} within {within:?}: {status:#}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the node hears `peer` (its first peer), then a few dead times more, so
    /// that whatever it decides from hearing it is decided; returns its status then.
    async fn settled_hearing(&self, peer: &str) -> Value {
        let start = Instant::now();
        loop {
            let status = self.status().await;
            if status["peers"][0]["name"] == peer && status["peers"][0]["alive"] == true {
                break;
            }
            assert!(start.elapsed() < SLACK, "{peer} not heard: {status:#}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(dead_time() * 3).await;
        self.status().await
    }

    /// Runs `fulcrum ARGS -c CONFIG` against this node, as an operator on it would: its
    /// control socket is found from the config (in the directory `Process` gives it).
    fn fulcrum(&self, args: &[&str]) -> std::process::Output {
        self.fulcrum_command(args).output().unwrap()
    }

    fn fulcrum_command(&self, args: &[&str]) -> std::process::Command {
        let mut command = support::binary();
        command
            .args(args)
            .arg("-c")
            .arg(&self.process.config)
            .env("FULCRUM_RUN_DIR", self.process.config.parent().unwrap());
        command
    }

    async fn switchover(&self, token: Option<&str>) -> (u16, Value) {
        let mut request =
            support::client().post(format!("http://{}/api/ha/switchover", self.admin));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (
            status,
            serde_json::from_str(&response.text().await.unwrap()).unwrap(),
        )
    }
}

/// A server at `addr` that answers every request `slow` after two seconds, and tells
/// `arrived` of each request as it comes.
async fn slow_server(addr: SocketAddr) -> Arc<tokio::sync::Notify> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let arrived = Arc::new(tokio::sync::Notify::new());
    let notify = arrived.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let notify = notify.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        notify.notify_one();
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    arrived
}

/// Two nodes: "lb1" (priority 200) and "lb2" (priority 100), lb1 started first and active.
async fn pair(test: u8, preempt: bool) -> (Addresses, Secrets, [NodeSpec; 2], Node, Node) {
    let addresses = Addresses::new(test);
    let secrets = Secrets::new();
    let (bind1, bind2) = (udp_addr(), udp_addr());
    let mut specs = [
        NodeSpec::new("lb1", 200, preempt, addresses.of(0)),
        NodeSpec::new("lb2", 100, preempt, addresses.of(1)),
    ];
    (specs[0].bind, specs[1].bind) = (bind1, bind2);
    (specs[0].peers, specs[1].peers) = (vec![bind2], vec![bind1]);
    let lb1 = Node::start(&specs[0], &secrets).await;
    let (status, _) = lb1.wait_for("active", dead_time() + SLACK).await;
    assert_eq!(status["last_change"]["reason"], "startup", "{status:#}");
    assert!(addresses.on_lo(0));
    let lb2 = Node::start(&specs[1], &secrets).await;
    // lb2 listens for a dead time, hears lb1 active, and stays backup.
    let status = lb2.settled_hearing("lb1").await;
    assert_eq!(status["role"], "backup", "{status:#}");
    assert_eq!(status["peers"][0]["alive"], true, "{status:#}");
    assert!(!addresses.on_lo(1));
    (addresses, secrets, specs, lb1, lb2)
}

/// Kills lb1 (SIGKILL: nothing released, nothing said), as a process crashes; its address
/// stays on the interface. lb2 must take over within the dead time.
async fn kill_lb1(addresses: &Addresses, lb1: Node, lb2: &Node) {
    drop(lb1.process);
    let killed = Instant::now();
    let (status, _) = lb2.wait_for("active", dead_time() + SLACK).await;
    let took = killed.elapsed();
    eprintln!(
        "lb2 active {took:?} after lb1 was killed (dead time {:?})",
        dead_time()
    );
    assert_eq!(status["last_change"]["reason"], "peer_dead", "{status:#}");
    assert!(addresses.on_lo(1));
    assert!(
        addresses.on_lo(0),
        "the killed process took its address off"
    );
}

#[tokio::test]
async fn the_backup_takes_over_from_a_dead_active_and_the_better_node_preempts_on_return() {
    let (addresses, secrets, specs, lb1, lb2) = pair(1, true).await;
    kill_lb1(&addresses, lb1, &lb2).await;

    let lb1 = Node::start(&specs[0], &secrets).await;
    let (status, _) = lb1.wait_for("active", dead_time() + SLACK).await;
    assert_eq!(status["last_change"]["reason"], "preempted", "{status:#}");
    let (status, _) = lb2.wait_for("backup", SLACK).await;
    assert_eq!(status["last_change"]["reason"], "preempted", "{status:#}");
    assert!(addresses.on_lo(0));
    assert!(!addresses.on_lo(1), "lb2 released its address");

    let metrics =
        support::get_text(&support::client(), &format!("http://{}/metrics", lb2.admin)).await;
    for line in [
        "fulcrum_ha_active 0",
        "fulcrum_ha_transitions_total{to=\"active\",reason=\"peer_dead\"} 1",
        "fulcrum_ha_transitions_total{to=\"backup\",reason=\"preempted\"} 1",
    ] {
        assert!(metrics.contains(line), "no {line} in:\n{metrics}");
    }
    assert!(
        metrics.contains(&format!(
            "fulcrum_ha_peer_up{{peer=\"{}\"}} 1",
            specs[0].bind
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn without_preemption_the_returning_better_node_stays_backup() {
    let (addresses, secrets, specs, lb1, lb2) = pair(2, false).await;
    kill_lb1(&addresses, lb1, &lb2).await;

    // Restarted, lb1 finds the address its killed process left, takes it off and listens
    // first: it must not take the role back as if the address were handed to it.
    let lb1 = Node::start(&specs[0], &secrets).await;
    let status = lb1.settled_hearing("lb2").await;
    assert_eq!(status["role"], "backup", "{status:#}");
    assert_eq!(status["transitions"], 0, "{status:#}");
    assert_eq!(status["peers"][0]["role"], "active", "{status:#}");
    let status = lb2.status().await;
    assert_eq!(status["role"], "active", "{status:#}");
    assert_eq!(
        status["transitions"], 1,
        "lb2 stepped down meanwhile: {status:#}"
    );
    assert!(!addresses.on_lo(0));
    assert!(addresses.on_lo(1));
    lb1.process.log_from("left by a previous run").await;
}

#[tokio::test]
async fn a_planned_switchover_moves_the_role_and_a_stopping_node_hands_it_back_at_once() {
    let (addresses, _secrets, specs, lb1, lb2) = pair(3, true).await;

    let (code, body) = lb1.switchover(None).await;
    assert_eq!(code, 401, "{body:#}");
    let (code, body) = lb2.switchover(Some(TOKEN)).await;
    assert_eq!(code, 409, "a backup has nothing to hand over: {body:#}");

    // A request in flight on lb1 when the switchover is asked, answered two seconds later.
    let arrived = slow_server(specs[0].server).await;
    let mut in_flight = tokio::net::TcpStream::connect(lb1.process.addr)
        .await
        .unwrap();
    in_flight
        .write_all(b"GET /slow HTTP/1.1\r\nhost: ha.test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(SLACK, arrived.notified())
        .await
        .expect("the request did not reach the server");

    // As an operator would: `fulcrum ha switchover`, through the control socket.
    let mut operator = lb1.fulcrum_command(&["ha", "switchover"]);
    let switchover = tokio::task::spawn_blocking(move || {
        let out = operator.output().unwrap();
        (out, Instant::now())
    });
    // lb1 drains first, active and saying so: lb2 does not take over meanwhile.
    let deadline = Instant::now() + SLACK;
    loop {
        let status = lb1.status().await;
        if status["draining"] == true {
            assert_eq!(status["role"], "active", "{status:#}");
            assert_eq!(status["yielding"], false, "{status:#}");
            break;
        }
        assert!(Instant::now() < deadline, "lb1 never drained: {status:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lb2.role().await, "backup");
    assert!(addresses.on_lo(0));
    // The process answers other requests meanwhile.
    let out = lb1.fulcrum(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let status = lb1.status().await;
    assert_eq!(status["draining"], true, "reload answered after the drain");
    // The request in flight is answered, its connection closing after it.
    let answer = read_until_close(&mut in_flight, SLACK).await;
    let answered = Instant::now();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(answer.ends_with("slow"), "{answer}");
    let (out, returned) = switchover.await.unwrap();
    assert!(
        answered < returned,
        "the switchover returned before the request in flight finished"
    );
    eprintln!(
        "switchover: answered {:?} after the last connection closed",
        returned - answered
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(": switched over: lb2 is active\n"),
        "{stdout}"
    );
    let status = lb1.status().await;
    assert_eq!(status["role"], "backup", "{status:#}");
    assert_eq!(status["last_change"]["reason"], "switchover", "{status:#}");
    let status = lb2.status().await;
    assert_eq!(status["role"], "active", "{status:#}");
    assert_eq!(
        status["last_change"]["reason"], "peer_yielded",
        "{status:#}"
    );
    assert!(!addresses.on_lo(0));
    assert!(addresses.on_lo(1));
    let status = lb1.status().await;
    assert_eq!(status["draining"], false, "{status:#}");
    // Its address gone, lb1 takes new connections again (on its own addresses).
    let connect = tokio::net::TcpStream::connect(lb1.process.addr);
    tokio::time::timeout(Duration::from_millis(500), connect)
        .await
        .expect("lb1's listener stayed paused")
        .unwrap();

    // lb1 ranks higher and preempts, but it handed the role over: it leaves it there.
    tokio::time::sleep(dead_time() * 5).await;
    assert_eq!(lb1.role().await, "backup");
    assert_eq!(lb2.role().await, "active");
    let out = lb2.fulcrum(&["ha", "status", "--admin", &lb2.admin.to_string()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.starts_with("lb2 (127.77.3.2/32, priority 100): active\n"),
        "{stdout}"
    );
    assert!(stdout.contains("  peer lb1 127.0.0.1:"), "{stdout}");
    assert!(
        stdout.contains(": backup (priority 200), heard "),
        "{stdout}"
    );
    assert!(
        stdout.contains("  last change: backup -> active (peer_yielded) at "),
        "{stdout}"
    );

    // SIGTERM: lb2 says it yields as it leaves, so lb1 takes over without waiting a dead
    // time, and lb2 takes its address off.
    lb2.process.signal("TERM");
    let (status, took) = lb1.wait_for("active", SLACK).await;
    eprintln!("lb1 active {took:?} after lb2 got SIGTERM");
    assert_eq!(
        status["last_change"]["reason"], "peer_yielded",
        "{status:#}"
    );
    let deadline = Instant::now() + SLACK;
    while addresses.on_lo(1) {
        assert!(Instant::now() < deadline, "lb2 kept its address");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(addresses.on_lo(0));
}

#[tokio::test]
async fn a_heartbeat_without_the_key_is_ignored_and_counted() {
    let addresses = Addresses::new(4);
    let secrets = Secrets::new();
    // The only peer is this test's socket: what it sends decides nothing unless accepted.
    let forger = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut spec = NodeSpec::new("lb1", 100, true, addresses.of(0));
    spec.peers = vec![forger.local_addr().unwrap()];
    let lb1 = Node::start(&spec, &secrets).await;
    lb1.wait_for("active", dead_time() + SLACK).await;

    let claim = |sequence| fulcrum::ha::heartbeat::Heartbeat {
        group: 7,
        node: "intruder".into(),
        priority: 254,
        role: fulcrum::ha::heartbeat::WireRole::Active,
        eligible: true,
        sequence,
    };
    let wrong_key = fulcrum::ha::heartbeat::key(b"not-the-group-key-at-all");
    for sequence in 1..=5 {
        forger
            .send_to(&claim(sequence).encode(&wrong_key), spec.bind)
            .unwrap();
    }
    // From an address not in peers, even with the right key.
    let right_key = fulcrum::ha::heartbeat::key(KEY.as_bytes());
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(&claim(6).encode(&right_key), spec.bind)
        .unwrap();
    let start = Instant::now();
    let status = loop {
        let status = lb1.status().await;
        let dropped = &status["heartbeats_dropped"];
        if dropped["unauthenticated"] == 5 && dropped["unknown_peer"] == 1 {
            break status;
        }
        assert!(start.elapsed() < SLACK, "not all dropped: {status:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status["role"], "active", "{status:#}");
    assert_eq!(
        status["heartbeats_dropped"]["unknown_peer"], 1,
        "{status:#}"
    );
    assert!(addresses.on_lo(0));
    let metrics =
        support::get_text(&support::client(), &format!("http://{}/metrics", lb1.admin)).await;
    assert!(
        metrics.contains("fulcrum_ha_heartbeats_dropped_total{reason=\"unauthenticated\"} 5"),
        "{metrics}"
    );
    let shown = support::get_text(
        &support::client(),
        &format!("http://{}/api/config", lb1.admin),
    )
    .await;
    let config: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(config["ha"]["node"], "lb1", "{shown}");
    assert_eq!(config["ha"]["key"], "(set, hidden)", "{shown}");
    assert!(!shown.contains(KEY), "the key is shown: {shown}");

    // The same claim with the key, from the peer's address, is believed: a better active
    // node, so lb1 steps down and takes its address off.
    forger
        .send_to(&claim(7).encode(&right_key), spec.bind)
        .unwrap();
    let (status, _) = lb1.wait_for("backup", SLACK).await;
    assert_eq!(status["last_change"]["reason"], "dual_active", "{status:#}");
    assert!(!addresses.on_lo(0));
}

#[tokio::test]
async fn a_node_finding_an_address_left_by_a_previous_run_takes_it_off_and_listens_first() {
    let addresses = Addresses::new(5);
    let secrets = Secrets::new();
    addresses.add(0);
    let spec = NodeSpec::new("lb1", 100, true, addresses.of(0));
    let lb1 = Node::start(&spec, &secrets).await;
    lb1.process.log_from("left by a previous run").await;
    let (status, _) = lb1.wait_for("active", dead_time() + SLACK).await;
    assert_eq!(status["last_change"]["reason"], "startup", "{status:#}");
    let detail = status["last_change"]["detail"].as_str().unwrap();
    assert!(detail.contains("no active peer heard"), "{status:#}");
    // Claimed after listening (which starts after the release), not found.
    let log = lb1.process.log_from("left by a previous run").await;
    let listened = log.find("left by a previous run").unwrap();
    assert!(
        log[listened..].contains("HA: role changed"),
        "the role changed before the stray address was seen: {log}"
    );
    assert!(addresses.on_lo(0));
}

#[tokio::test]
async fn a_binary_upgrade_of_the_active_node_keeps_the_role_and_the_address() {
    let addresses = Addresses::new(10);
    let secrets = Secrets::new();
    // The peer is this test's socket, which says nothing: the node is alone.
    let spec = NodeSpec::new("lb1", 100, true, addresses.of(0));
    let lb1 = Node::start(&spec, &secrets).await;
    lb1.wait_for("active", dead_time() + SLACK).await;
    let peer = UdpSocket::bind(spec.peers[0]).unwrap();

    lb1.process.signal("USR2");
    let line = lb1.process.log_from("upgraded: process ").await;
    let new: u32 = line
        .split("upgraded: process ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"));
    let _new = KillOnDrop(new);
    // The new process's log goes to the same stderr.
    let log = lb1.process.log_from("already on the interface").await;
    assert!(!log.contains("left by a previous run"), "{log}");
    assert!(addresses.on_lo(0));
    // It heartbeats as active from the start: no heartbeat after the upgrade says backup.
    peer.set_read_timeout(Some(SLACK)).unwrap();
    let key = fulcrum::ha::heartbeat::key(KEY.as_bytes());
    let mut buf = [0u8; 512];
    let until = Instant::now() + dead_time() * 2;
    while Instant::now() < until {
        let (len, _) = peer.recv_from(&mut buf).unwrap();
        let heartbeat = fulcrum::ha::heartbeat::Heartbeat::decode(&buf[..len], &key).unwrap();
        assert_eq!(
            heartbeat.role,
            fulcrum::ha::heartbeat::WireRole::Active,
            "{heartbeat:?}"
        );
    }
    assert!(addresses.on_lo(0));
}

#[tokio::test]
async fn a_node_that_cannot_put_its_address_on_says_so_and_never_claims_the_role() {
    let addresses = Addresses::new(11);
    let secrets = Secrets::new();
    let spec = NodeSpec::new("lb1", 100, true, addresses.of(0));
    let peer = UdpSocket::bind(spec.peers[0]).unwrap();
    let lb1 = Node::start_with(&spec, &secrets, |command| {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl(2) only, between fork and exec. Out of the bounding set, the
        // capability is not regained by exec as root.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_CAPBSET_DROP, CAP_NET_ADMIN, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    })
    .await;
    let start = Instant::now();
    let status = loop {
        let status = lb1.status().await;
        let error = status["error"].as_str().unwrap_or_default().to_string();
        if error.contains("cannot put the virtual addresses on") {
            break status;
        }
        assert!(start.elapsed() < dead_time() + SLACK, "{status:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let error = status["error"].as_str().unwrap();
    assert!(error.contains("needs CAP_NET_ADMIN"), "{status:#}");
    assert_eq!(status["eligible"], false, "{status:#}");
    // What it says to the peer from then on, through a few claims tried again: a backup
    // that may not hold the role.
    peer.set_read_timeout(Some(SLACK)).unwrap();
    let key = fulcrum::ha::heartbeat::key(KEY.as_bytes());
    let mut buf = [0u8; 512];
    while peer.set_nonblocking(true).is_ok() && peer.recv_from(&mut buf).is_ok() {}
    peer.set_nonblocking(false).unwrap();
    let until = Instant::now() + Duration::from_millis(2500);
    let mut heard = 0;
    while Instant::now() < until {
        let (len, _) = peer.recv_from(&mut buf).unwrap();
        let heartbeat = fulcrum::ha::heartbeat::Heartbeat::decode(&buf[..len], &key).unwrap();
        assert_eq!(
            heartbeat.role,
            fulcrum::ha::heartbeat::WireRole::Backup,
            "{heartbeat:?}"
        );
        heard += 1;
        // Between a retry's start and its failure the node says nothing.
        assert!(!heartbeat.eligible, "{heartbeat:?}");
    }
    assert!(heard > 10, "{heard} heartbeats");
    let status = lb1.status().await;
    assert_eq!(status["role"], "backup", "{status:#}");
    assert_eq!(status["eligible"], false, "{status:#}");
    assert!(
        status["error"]
            .as_str()
            .unwrap()
            .contains("cannot put the virtual addresses on `lo`"),
        "{status:#}"
    );
    let log = lb1
        .process
        .log_from("may not hold the role until a claim works")
        .await;
    assert_eq!(
        log.matches("may not hold the role until a claim works")
            .count(),
        1,
        "a lasting failure is logged once: {log}"
    );
    assert!(!addresses.on_lo(0));
}

#[tokio::test]
async fn heartbeats_go_on_while_the_main_runtime_is_stalled() {
    let addresses = Addresses::new(12);
    let secrets = Secrets::new();
    let spec = NodeSpec::new("lb1", 100, true, addresses.of(0));
    let peer = UdpSocket::bind(spec.peers[0]).unwrap();
    let config = fulcrum::config::parse("ha.toml", &config(&spec, &secrets)).unwrap();
    let server = fulcrum::server::Server::start(config).await.unwrap();
    let ha = server.ha().expect("a node with [ha]");
    let deadline = Instant::now() + dead_time() + SLACK;
    while ha.status().role != "active" {
        assert!(Instant::now() < deadline, "{:?}", ha.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let heard = std::thread::spawn(move || {
        peer.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 512];
        // From the start of listening to its end, the times between heartbeats.
        let mut arrivals = vec![Instant::now()];
        let until = arrivals[0] + Duration::from_millis(2500);
        while Instant::now() < until {
            if peer.recv_from(&mut buf).is_ok() {
                arrivals.push(Instant::now());
            }
        }
        arrivals.push(until);
        arrivals
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The runtime the server started on stalls, as in a slow synchronous reload.
    std::thread::sleep(Duration::from_millis(1500));
    let arrivals = heard.join().unwrap();
    let longest = arrivals
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap();
    assert!(
        longest < Duration::from_millis(INTERVAL_MS) * 6,
        "heartbeats stopped for {longest:?} while the main runtime stalled"
    );
    assert_eq!(ha.status().role, "active");
    assert!(server.shutdown(Duration::from_secs(1)).await);
}

#[tokio::test]
async fn a_peer_sending_under_this_nodes_name_makes_it_give_the_role_up_for_good() {
    let addresses = Addresses::new(13);
    let secrets = Secrets::new();
    let twin = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut spec = NodeSpec::new("lb1", 100, true, addresses.of(0));
    spec.peers = vec![twin.local_addr().unwrap()];
    let lb1 = Node::start(&spec, &secrets).await;
    lb1.wait_for("active", dead_time() + SLACK).await;

    // A second node configured as "lb1" too, lesser and a backup: nothing the election
    // would act on, but the two cannot tell each other's heartbeats from their own.
    let key = fulcrum::ha::heartbeat::key(KEY.as_bytes());
    let twin_heartbeat = fulcrum::ha::heartbeat::Heartbeat {
        group: 7,
        node: "lb1".into(),
        priority: 1,
        role: fulcrum::ha::heartbeat::WireRole::Backup,
        eligible: true,
        sequence: 1,
    };
    twin.send_to(&twin_heartbeat.encode(&key), spec.bind)
        .unwrap();
    let (status, _) = lb1.wait_for("backup", SLACK).await;
    assert_eq!(
        status["last_change"]["reason"], "name_conflict",
        "{status:#}"
    );
    assert_eq!(status["eligible"], false, "{status:#}");
    let error = status["error"].as_str().unwrap();
    assert!(error.contains("this node's own name"), "{status:#}");
    assert!(!addresses.on_lo(0));
    // For good: alone, it claims nothing again.
    tokio::time::sleep(dead_time() * 5).await;
    let status = lb1.status().await;
    assert_eq!(status["role"], "backup", "{status:#}");
    assert_eq!(status["error"].as_str().unwrap(), error, "{status:#}");
    assert!(!addresses.on_lo(0));
}

const CAP_NET_ADMIN: libc::c_ulong = 12;

/// Kills the process an upgrade started, which is no child of the test.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: a plain kill(2) of a process id.
        unsafe {
            libc::kill(self.0 as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// A TCP port whose answers the test turns on and off: while off, the accept queue (of
/// one) stays full and the kernel drops new SYNs, so a connection times out as to a host
/// cut off.
struct Gateway {
    addr: SocketAddr,
    answering: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Gateway {
    fn start() -> Gateway {
        use std::sync::atomic::{AtomicBool, Ordering};
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        socket.listen(0).unwrap();
        socket.set_nonblocking(true).unwrap();
        let listener: std::net::TcpListener = socket.into();
        let addr = listener.local_addr().unwrap();
        let answering = std::sync::Arc::new(AtomicBool::new(true));
        let on = answering.clone();
        std::thread::spawn(move || {
            // Ends with the test process; accepts only while answering.
            loop {
                if on.load(Ordering::SeqCst) {
                    while listener.accept().is_ok() {}
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Gateway { addr, answering }
    }

    fn answer(&self, on: bool) {
        self.answering
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_node_that_cannot_reach_its_gateway_gives_the_role_up_and_takes_it_back() {
    let addresses = Addresses::new(6);
    let secrets = Secrets::new();
    let gateway = Gateway::start();
    let mut spec = NodeSpec::new("lb1", 100, true, addresses.of(0));
    spec.extra = format!("reach = [\"{}\"]", gateway.addr);
    let lb1 = Node::start(&spec, &secrets).await;
    lb1.wait_for("active", dead_time() + SLACK).await;
    assert!(addresses.on_lo(0));

    gateway.answer(false);
    let (status, took) = lb1.wait_for("backup", SLACK * 2).await;
    eprintln!("lb1 gave the role up {took:?} after its gateway stopped answering");
    assert_eq!(status["last_change"]["reason"], "lost_reach", "{status:#}");
    assert_eq!(status["eligible"], false, "{status:#}");
    assert!(!addresses.on_lo(0));
    // Alone, but not eligible: it stays backup.
    tokio::time::sleep(dead_time() * 3).await;
    assert_eq!(lb1.role().await, "backup");

    gateway.answer(true);
    let (status, _) = lb1.wait_for("active", SLACK * 2).await;
    assert_eq!(status["eligible"], true, "{status:#}");
    assert!(addresses.on_lo(0));
}

#[tokio::test]
async fn with_reach_upstreams_a_node_claims_only_once_a_server_is_up() {
    let addresses = Addresses::new(7);
    let secrets = Secrets::new();
    let mut spec = NodeSpec::new("lb1", 100, true, addresses.of(0));
    spec.extra = "reach_upstreams = true\n\
                  [upstreams.app.health_check]\ntype = \"tcp\"\ninterval = \"100ms\"\nfall = 1\nrise = 1"
        .into();
    let lb1 = Node::start(&spec, &secrets).await;
    // Its one server refuses connections: checked down, so no reach.
    tokio::time::sleep(dead_time() * 5).await;
    let status = lb1.status().await;
    assert_eq!(status["role"], "backup", "{status:#}");
    assert_eq!(status["eligible"], false, "{status:#}");
    assert!(!addresses.on_lo(0));

    let _server = support::Backend::named_at("app", spec.server).await;
    let (status, _) = lb1.wait_for("active", SLACK * 2).await;
    assert_eq!(status["eligible"], true, "{status:#}");
    assert!(addresses.on_lo(0));
}

#[tokio::test]
async fn an_in_process_server_refuses_an_ha_reload_and_hands_over_on_shutdown() {
    let addresses = Addresses::new(8);
    let secrets = Secrets::new();
    let spec = NodeSpec::new("lb1", 100, true, addresses.of(0));
    let text = config(&spec, &secrets);
    let parsed = |text: &str| fulcrum::config::parse("ha.toml", text).unwrap();
    let server = fulcrum::server::Server::start(parsed(&text)).await.unwrap();
    let ha = server.ha().expect("a node with [ha]");
    let deadline = Instant::now() + dead_time() + SLACK;
    while ha.status().role != "active" {
        assert!(Instant::now() < deadline, "{:?}", ha.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(addresses.on_lo(0));

    let refused = server
        .reload(parsed(&text.replace("priority = 100", "priority = 101")))
        .unwrap_err();
    assert!(refused.contains("[ha] changed"), "{refused}");

    // The peer (this test's socket) hears the farewell: "yielding", from lb1.
    let peer = UdpSocket::bind(spec.peers[0]).unwrap();
    peer.set_read_timeout(Some(SLACK)).unwrap();
    assert!(server.shutdown(Duration::from_secs(1)).await);
    assert!(!addresses.on_lo(0), "the address is released on shutdown");
    let key = fulcrum::ha::heartbeat::key(KEY.as_bytes());
    let mut buf = [0u8; 512];
    // Heartbeats queued since the socket was bound, the last ones "yielding"; then silence.
    let mut yielded = false;
    while let Ok((len, _)) = peer.recv_from(&mut buf) {
        let heartbeat = fulcrum::ha::heartbeat::Heartbeat::decode(&buf[..len], &key).unwrap();
        if heartbeat.role == fulcrum::ha::heartbeat::WireRole::Yielding {
            yielded = true;
            break;
        }
    }
    assert!(yielded, "no yielding heartbeat");
    assert!(ha.status().left);
    assert_eq!(ha.status().last_change.unwrap().reason, "shutdown");
}

#[tokio::test]
async fn a_switchover_no_peer_takes_leaves_the_node_active_and_its_listeners_taking_connections() {
    let addresses = Addresses::new(9);
    let secrets = Secrets::new();
    let spec = NodeSpec::new("lb1", 200, true, addresses.of(0));
    let config = fulcrum::config::parse("ha.toml", &config(&spec, &secrets)).unwrap();
    let server = fulcrum::server::Server::start(config).await.unwrap();
    let ha = server.ha().expect("a node with [ha]");
    let listener = server.local_addrs()[0];

    // The peer (this test) says it is a live, eligible backup, and never takes the role.
    let peer = tokio::net::UdpSocket::bind(spec.peers[0]).await.unwrap();
    let node = spec.bind;
    let heartbeats = tokio::spawn(async move {
        let key = fulcrum::ha::heartbeat::key(KEY.as_bytes());
        for sequence in 1.. {
            let heartbeat = fulcrum::ha::heartbeat::Heartbeat {
                group: 7,
                node: "lb2".into(),
                priority: 100,
                role: fulcrum::ha::heartbeat::WireRole::Backup,
                eligible: true,
                sequence,
            };
            let _ = peer.send_to(&heartbeat.encode(&key), node).await;
            tokio::time::sleep(Duration::from_millis(INTERVAL_MS)).await;
        }
    });
    let deadline = Instant::now() + dead_time() + SLACK;
    while ha.status().role != "active" || !ha.status().peers[0].alive {
        assert!(Instant::now() < deadline, "{:?}", ha.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let why = ha.switchover().await.expect_err("nobody took the role");
    assert!(why.contains("no peer took the role"), "{why}");
    let status = ha.status();
    assert_eq!(status.role, "active", "{status:?}");
    assert!(!status.draining && !status.yielding, "{status:?}");
    assert!(addresses.on_lo(0));
    // Paused for the switchover, its listener takes connections again.
    let connect = tokio::net::TcpStream::connect(listener);
    tokio::time::timeout(Duration::from_millis(500), connect)
        .await
        .expect("the listener stayed paused")
        .unwrap();

    heartbeats.abort();
    assert!(server.shutdown(Duration::from_secs(1)).await);
}
