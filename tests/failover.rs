//! Failover under a steady load, with servers that are processes of their own
//! (`fulcrum backend`) and Fulcrum running as the real binary with `examples/health.toml`
//! (a worker per core): one server
//! frozen with SIGSTOP (the kernel still accepts its connections; nothing answers), one
//! killed and started again. Clients must see no error, and the admin API must show each
//! server down, and back, within the times the health checks promise.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Process, binary};

/// What `examples/health.toml` sets: checks every `INTERVAL`, a server down after `FALL`
/// failures and up after `RISE` passes.
const INTERVAL: Duration = Duration::from_secs(1);
const FALL: u32 = 3;
const RISE: u32 = 2;
/// Slack over `INTERVAL × FALL` (or `RISE`) for where in its interval a check falls, a
/// check's own timeout, and a noisy machine.
const SLACK: Duration = Duration::from_millis(2500);

/// The example binds fixed ports: its tests take turns.
static EXAMPLE_PORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A demo backend in a process of its own, at a fixed address so that it can come back.
struct BackendProcess {
    child: Child,
    addr: SocketAddr,
}

impl BackendProcess {
    fn start(name: &str, addr: SocketAddr) -> BackendProcess {
        let mut child = binary()
            .args(["backend", "--listen", &addr.to_string(), "--name", name])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // It prints once it listens.
        let mut out = child.stdout.take().unwrap();
        let mut first = [0u8; 16];
        std::io::Read::read_exact(&mut out, &mut first).expect("the backend did not start");
        BackendProcess { child, addr }
    }

    fn signal(&self, signal: &str) {
        support::send_signal(self.child.id(), signal);
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        // A frozen process must be let go before it can die.
        let _ = std::process::Command::new("kill")
            .args(["-s", "CONT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        self.kill();
    }
}

/// Answers seen by the load, by backend name, and every failure.
#[derive(Default)]
struct Seen {
    by_backend: HashMap<String, Vec<Instant>>,
    failures: Vec<String>,
    requests: usize,
}

impl Seen {
    fn assert_none_failed(&self) {
        assert!(
            self.failures.is_empty(),
            "{} of {} failed: {:?}",
            self.failures.len(),
            self.requests,
            &self.failures[..self.failures.len().min(5)]
        );
    }
}

/// `clients` loops of GETs on kept-alive connections for `duration`, each at most one
/// request per 2 ms (and at most 100,000 requests in all).
async fn load(url: String, clients: usize, duration: Duration) -> Seen {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (url, seen) = (url.clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            while Instant::now() < end && seen.lock().unwrap().requests < 100_000 {
                seen.lock().unwrap().requests += 1;
                let outcome = match client.get(&url).send().await {
                    Ok(response) if response.status() == 200 => {
                        response.text().await.map_err(|e| e.to_string())
                    }
                    Ok(response) => Err(format!("status {}", response.status())),
                    Err(e) => Err(e.to_string()),
                };
                {
                    let mut seen = seen.lock().unwrap();
                    match outcome {
                        Ok(text) => {
                            let name = text.split_whitespace().nth(4).unwrap_or("").to_string();
                            seen.by_backend
                                .entry(name)
                                .or_default()
                                .push(Instant::now());
                        }
                        Err(e) => seen.failures.push(e),
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    Arc::try_unwrap(seen).ok().unwrap().into_inner().unwrap()
}

/// The health state the admin API gives server `addr`.
async fn state_of(admin: SocketAddr, addr: SocketAddr) -> String {
    let text = reqwest::get(format!("http://{admin}/api/status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    let servers = status["upstreams"][0]["servers"]
        .as_array()
        .unwrap()
        .clone();
    let server = servers
        .iter()
        .find(|s| s["address"] == addr.to_string())
        .unwrap_or_else(|| panic!("no server {addr} in {status}"));
    server["health"]["state"].as_str().unwrap().to_string()
}

/// Polls until server `addr` is in one of `states`; returns how long that took.
async fn wait_for_state(
    admin: SocketAddr,
    addr: SocketAddr,
    states: &[&str],
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let state = state_of(admin, addr).await;
        if states.contains(&state.as_str()) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "server {addr} still {state} after {limit:?}, waiting for {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Setup {
    backends: Vec<BackendProcess>,
    proxy: Process,
    admin: SocketAddr,
}

/// `examples/health.toml` as it is (its token file named by absolute path, as the test
/// runs it from a directory of its own), in front of three `fulcrum backend` processes at
/// the ports it names.
fn setup() -> Setup {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let config = std::fs::read_to_string(format!("{examples}/health.toml"))
        .unwrap()
        .replace("\"admin.token\"", &format!("\"{examples}/admin.token\""));
    let backends = ["one", "two", "three"]
        .iter()
        .zip(9001..)
        .map(|(name, port)| BackendProcess::start(name, SocketAddr::from(([127, 0, 0, 1], port))))
        .collect();
    let proxy = Process::start(&config, &[]);
    Setup {
        backends,
        proxy,
        admin: "127.0.0.1:9901".parse().unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_costs_clients_nothing_and_is_marked_down() {
    let _turn = EXAMPLE_PORTS.lock().await;
    let Setup {
        backends,
        proxy,
        admin,
    } = setup();
    let frozen = &backends[1];
    let load = tokio::spawn(load(proxy.url("/"), 4, Duration::from_secs(6)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    frozen.signal("STOP");
    let frozen_at = Instant::now();
    let took = wait_for_state(admin, frozen.addr, &["down"], INTERVAL * FALL + SLACK).await;
    eprintln!("frozen server marked down after {took:?}");
    let seen = load.await.unwrap();
    seen.assert_none_failed();
    // Frozen, it answers nothing (what it wrote just before may still be on its way).
    let settled = frozen_at + Duration::from_millis(200);
    let late = seen
        .by_backend
        .get("two")
        .map_or(0, |t| t.iter().filter(|&&t| t > settled).count());
    assert_eq!(late, 0, "answers from the frozen server");
    assert!(seen.requests > 100, "only {} requests", seen.requests);
    // The metrics tell the same story: retries were made, and the server is down.
    let metrics = metrics(admin).await;
    assert!(
        sample(
            &metrics,
            "fulcrum_upstream_retries_total",
            &[("upstream", "app")]
        ) > 0.0
    );
    let server = frozen.addr.to_string();
    let down = [("server", server.as_str()), ("state", "down")];
    assert_eq!(sample(&metrics, "fulcrum_server_state", &down), 1.0);
}

async fn metrics(admin: SocketAddr) -> prometheus_parse::Scrape {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of the sample of `name` whose labels include `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no {name} with {labels:?}"));
    match found.value {
        prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
        _ => panic!("{name} is not a counter or gauge"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_is_marked_down_and_comes_back_through_slow_start() {
    let _turn = EXAMPLE_PORTS.lock().await;
    let Setup {
        mut backends,
        proxy,
        admin,
    } = setup();
    let addr = backends[1].addr;
    // Long enough for the server to come back and finish its 10 s slow start: least
    // connections gives a ramping server little until its share nears its whole weight.
    let load_end = Instant::now() + Duration::from_secs(25);
    let load = tokio::spawn(load(proxy.url("/"), 4, Duration::from_secs(25)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    backends[1].kill();
    // Refused connections mark it unreachable at once; the checks mark it down.
    let took = wait_for_state(admin, addr, &["down"], INTERVAL * FALL + SLACK).await;
    eprintln!("killed server marked down after {took:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    backends[1] = BackendProcess::start("two", addr);
    let back_at = Instant::now();
    let took = wait_for_state(admin, addr, &["ramping", "up"], INTERVAL * RISE + SLACK).await;
    eprintln!("restarted server marked up after {took:?}");
    let seen = load.await.unwrap();
    seen.assert_none_failed();
    // Traffic returns, gradually: less of it in the first second back than in the last,
    // when the ramp is over.
    let returned: Vec<Instant> = seen
        .by_backend
        .get("two")
        .unwrap()
        .iter()
        .copied()
        .filter(|&t| t > back_at)
        .collect();
    let first = returned
        .iter()
        .filter(|&&t| t < back_at + Duration::from_secs(1))
        .count();
    let last = returned
        .iter()
        .filter(|&&t| t > load_end - Duration::from_secs(1))
        .count();
    eprintln!(
        "answers from the restarted server: {first} in its first second back, {last} in the load's last second"
    );
    assert!(
        last > first,
        "no gradual return: {first} answers in the first second, {last} in the last"
    );
}
