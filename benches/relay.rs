//! What relaying an L4 TCP tunnel costs with each copy strategy of `l4::relay` (buffered
//! `recv`/`send`, and `splice(2)` through a pipe), with tokio's `copy_bidirectional` as a
//! reference: CPU time of the relaying thread per byte and per exchange over loopback, and the
//! memory an idle tunnel holds.
//!
//! The relay runs as a Fulcrum worker does: one thread, one single-threaded tokio runtime,
//! accepting, connecting to the server and relaying, one task per tunnel. Clients and servers
//! run on another thread (or, for memory, in a child process), so the figures are the relay
//! thread's own CPU seconds, measured with `CLOCK_THREAD_CPUTIME_ID`.
//!
//! `cargo bench --bench relay` (both parts), `-- throughput` or `-- memory` for one. Each
//! throughput scenario runs `RELAY_BENCH_SECONDS` (default 3) per strategy, `RELAY_BENCH_ROUNDS`
//! (default 2) rounds in alternating order (`RELAY_BENCH_SCENARIO`: only those whose name
//! contains it); the memory part holds `RELAY_BENCH_TUNNELS`
//! (default 5,000) idle tunnels, each after `RELAY_BENCH_EXCHANGE` bytes (default 100) each
//! way.

use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fulcrum::l4::relay::{Strategy, relay_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

// As the `fulcrum` binary: memory figures depend on the allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PEER_ENV: &str = "FULCRUM_RELAY_BENCH_PEER";
const MEMORY_ENV: &str = "FULCRUM_RELAY_BENCH_MEMORY";
/// Every request is this long; its first 8 bytes say how long the answer must be.
const REQUEST: usize = 64;

#[derive(Clone, Copy, Debug)]
enum Copier {
    Buffered,
    Splice,
    Adaptive,
    TokioCopyBidirectional,
}

impl Copier {
    const ALL: [Copier; 4] = [
        Copier::Buffered,
        Copier::Splice,
        Copier::Adaptive,
        Copier::TokioCopyBidirectional,
    ];

    fn name(self) -> &'static str {
        match self {
            Copier::Buffered => "buffered",
            Copier::Splice => "splice",
            Copier::Adaptive => "adaptive",
            Copier::TokioCopyBidirectional => "tokio copy_bidirectional",
        }
    }

    async fn relay(self, mut client: TcpStream, mut server: TcpStream) {
        let idle = Duration::from_secs(3600);
        match self {
            Copier::Buffered => {
                drop(relay_with(Strategy::Buffered, client, server, idle, None).await)
            }
            Copier::Splice => drop(relay_with(Strategy::Splice, client, server, idle, None).await),
            Copier::Adaptive => {
                drop(relay_with(Strategy::Adaptive, client, server, idle, None).await)
            }
            Copier::TokioCopyBidirectional => {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        }
    }
}

fn thread_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write to; the clock id is a constant Linux knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// The relay under test, on its own thread: accepts on `frontend`, connects to `backend`,
/// relays with `copier`. Asked through `cpu`, it answers with its thread's CPU time; dropping
/// the sender stops it (and closes every tunnel).
struct RelayThread {
    frontend: SocketAddr,
    cpu: mpsc::UnboundedSender<oneshot::Sender<Duration>>,
    thread: std::thread::JoinHandle<()>,
}

impl RelayThread {
    fn start(copier: Copier, backend: SocketAddr) -> RelayThread {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let frontend = listener.local_addr().unwrap();
        let (cpu, mut asks) = mpsc::unbounded_channel::<oneshot::Sender<Duration>>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                tokio::spawn(async move {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        tokio::spawn(async move {
                            let Ok(server) = TcpStream::connect(backend).await else {
                                return;
                            };
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            copier.relay(client, server).await;
                        });
                    }
                });
                while let Some(answer) = asks.recv().await {
                    let _ = answer.send(thread_cpu());
                }
            });
        });
        RelayThread {
            frontend,
            cpu,
            thread,
        }
    }

    fn cpu(&self) -> Duration {
        let (answer, answered) = oneshot::channel();
        self.cpu.send(answer).unwrap();
        answered.blocking_recv().unwrap()
    }

    fn stop(self) {
        drop(self.cpu);
        self.thread.join().unwrap();
    }
}

/// Answers each request with as many bytes as it asks for, until the client closes.
async fn serve(mut stream: TcpStream, answer: Arc<Vec<u8>>) {
    let _ = stream.set_nodelay(true);
    let mut request = [0u8; REQUEST];
    while stream.read_exact(&mut request).await.is_ok() {
        let mut left = u64::from_le_bytes(request[..8].try_into().unwrap()) as usize;
        while left > 0 {
            let piece = left.min(answer.len());
            if stream.write_all(&answer[..piece]).await.is_err() {
                return;
            }
            left -= piece;
        }
    }
}

/// Sends requests for `answer` bytes one after another and reads each answer whole, until
/// `stop`; counts finished exchanges.
async fn client(frontend: SocketAddr, answer: usize, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    let mut stream = TcpStream::connect(frontend).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut request = [0u8; REQUEST];
    request[..8].copy_from_slice(&(answer as u64).to_le_bytes());
    let mut scratch = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        stream.write_all(&request).await.unwrap();
        let mut left = answer;
        while left > 0 {
            let want = left.min(scratch.len());
            let n = stream.read(&mut scratch[..want]).await.unwrap();
            assert!(n > 0, "the relay closed the tunnel");
            left -= n;
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
}

struct Scenario {
    name: &'static str,
    answer: usize,
    tunnels: usize,
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "ping-pong 64 B / 64 B",
        answer: 64,
        tunnels: 32,
    },
    Scenario {
        name: "100 KiB answers",
        answer: 100 * 1024,
        tunnels: 16,
    },
    Scenario {
        name: "10 MiB answers",
        answer: 10 << 20,
        tunnels: 4,
    },
];

struct Measured {
    exchanges_per_cpu_second: f64,
    mib_per_cpu_second: f64,
    relay_busy: f64,
}

fn measure(copier: Copier, scenario: &Scenario, seconds: f64) -> Measured {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    backend.set_nonblocking(true).unwrap();
    let relay = RelayThread::start(copier, backend.local_addr().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load = {
        let (frontend, stop, done) = (relay.frontend, stop.clone(), done.clone());
        let (tunnels, answer) = (scenario.tunnels, scenario.answer);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let backend = TcpListener::from_std(backend).unwrap();
                let bytes = Arc::new(vec![0x5a; 1 << 20]);
                tokio::spawn(async move {
                    while let Ok((stream, _)) = backend.accept().await {
                        tokio::spawn(serve(stream, bytes.clone()));
                    }
                });
                let clients: Vec<_> = (0..tunnels)
                    .map(|_| tokio::spawn(client(frontend, answer, stop.clone(), done.clone())))
                    .collect();
                for client in clients {
                    client.await.unwrap();
                }
            });
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let (cpu0, done0, wall0) = (relay.cpu(), done.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (cpu1, done1, wall) = (relay.cpu(), done.load(Ordering::Relaxed), wall0.elapsed());
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    relay.stop();

    let cpu = (cpu1 - cpu0).as_secs_f64();
    let exchanges = (done1 - done0) as f64;
    let bytes = exchanges * (REQUEST + scenario.answer) as f64;
    Measured {
        exchanges_per_cpu_second: exchanges / cpu,
        mib_per_cpu_second: bytes / cpu / (1 << 20) as f64,
        relay_busy: cpu / wall.as_secs_f64(),
    }
}

fn throughput() {
    let seconds: f64 = env_or("RELAY_BENCH_SECONDS", 3.0);
    let rounds: usize = env_or("RELAY_BENCH_ROUNDS", 2);
    println!("\nthroughput: relay thread CPU; {rounds} rounds of {seconds} s; best round shown");
    let only: String = env_or("RELAY_BENCH_SCENARIO", String::new());
    for scenario in SCENARIOS.iter().filter(|s| s.name.contains(only.as_str())) {
        println!("\n{} ({} tunnels)", scenario.name, scenario.tunnels);
        let mut best: Vec<Option<Measured>> = Copier::ALL.iter().map(|_| None).collect();
        for round in 0..rounds {
            for i in 0..Copier::ALL.len() {
                // Alternate the order so that drift in the machine's load favours no one.
                let i = if round % 2 == 0 {
                    i
                } else {
                    Copier::ALL.len() - 1 - i
                };
                let measured = measure(Copier::ALL[i], scenario, seconds);
                if best[i]
                    .as_ref()
                    .is_none_or(|b| b.exchanges_per_cpu_second < measured.exchanges_per_cpu_second)
                {
                    best[i] = Some(measured);
                }
            }
        }
        for (copier, measured) in Copier::ALL.iter().zip(best) {
            let m = measured.unwrap();
            println!(
                "  {:<26} {:>10.0} exchanges/CPU-s {:>9.0} MiB/CPU-s  (relay thread {:>3.0}% busy)",
                copier.name(),
                m.exchanges_per_cpu_second,
                m.mib_per_cpu_second,
                m.relay_busy * 100.0
            );
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Measures each copier's idle tunnels in a fresh process: what earlier runs left in the
/// allocator would otherwise blur the figures.
fn memory() {
    let tunnels: usize = env_or("RELAY_BENCH_TUNNELS", 5000);
    let exchange: usize = env_or("RELAY_BENCH_EXCHANGE", 100);
    println!("memory: {tunnels} idle tunnels, each after {exchange} bytes each way");
    for (i, _) in Copier::ALL.iter().enumerate() {
        let status = Command::new(std::env::current_exe().unwrap())
            .env(MEMORY_ENV, i.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// Holds idle tunnels through a relay in this process, their clients and servers in a child
/// process (so this process's memory is the relay's), and reports what each costs.
fn memory_of(copier: Copier) {
    let tunnels: usize = env_or("RELAY_BENCH_TUNNELS", 5000);
    let mut peer = Command::new(std::env::current_exe().unwrap())
        .env(PEER_ENV, tunnels.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_peer = peer.stdin.take().unwrap();
    let mut from_peer = BufReader::new(peer.stdout.take().unwrap());
    let mut line = String::new();
    from_peer.read_line(&mut line).unwrap();
    let backend: SocketAddr = line.trim().parse().expect("the peer's backend address");
    let relay = RelayThread::start(copier, backend);

    let mut say = |what: &str| {
        writeln!(to_peer, "{what}").unwrap();
        line.clear();
        from_peer.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "done", "the peer failed");
    };
    // A first round that is closed again: the runtime's and allocator's own start-up costs,
    // and the worker's spare chunks, are not the tunnels'.
    say(&format!("warm {}", relay.frontend));
    std::thread::sleep(Duration::from_millis(300));
    let (before, fds_before) = (resident_kib() as f64, open_fds() as f64);
    say(&format!("hold {}", relay.frontend));
    std::thread::sleep(Duration::from_millis(300));
    let (after, fds_after) = (resident_kib() as f64, open_fds() as f64);
    println!(
        "  {:<26} {:>6.2} KiB resident per idle tunnel, {:.2} descriptors per tunnel",
        copier.name(),
        (after - before) / tunnels as f64,
        (fds_after - fds_before) / tunnels as f64,
    );
    drop(to_peer);
    peer.wait().unwrap();
    relay.stop();
    if let Some(size) = future_size(copier) {
        println!("  {:<26} (the relay future itself: {size} bytes)", "");
    }
}

/// The size of the future that relays one tunnel: held for the tunnel's life, idle or not.
fn future_size(copier: Copier) -> Option<usize> {
    let strategy = match copier {
        Copier::Buffered => Strategy::Buffered,
        Copier::Splice => Strategy::Splice,
        Copier::Adaptive => Strategy::Adaptive,
        Copier::TokioCopyBidirectional => return None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let relaying = relay_with(strategy, client, server, Duration::from_secs(1), None);
        Some(std::mem::size_of_val(&relaying))
    })
}

/// The child of [`memory`]: prints its server's address, then on "warm <relay>" opens 64
/// tunnels, exchanges once on each and closes them; on "hold <relay>" opens `tunnels` and
/// keeps them; answers "done" to each. Ends when its stdin closes.
fn peer(tunnels: usize) {
    let exchange: usize = env_or("RELAY_BENCH_EXCHANGE", 100);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", backend.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = backend.accept().await {
                tokio::spawn(async move {
                    // Echo `exchange` bytes, then hold the connection open until the client
                    // closes it.
                    let mut bytes = vec![0u8; 16 * 1024];
                    let mut left = exchange;
                    while left > 0 {
                        let want = left.min(bytes.len());
                        match stream.read(&mut bytes[..want]).await {
                            Ok(n) if n > 0 && stream.write_all(&bytes[..n]).await.is_ok() => {
                                left -= n
                            }
                            _ => return,
                        }
                    }
                    let _ = stream.read(&mut bytes).await;
                });
            }
        });
        let mut held = Vec::new();
        let mut commands = tokio::io::BufReader::new(tokio::io::stdin());
        let mut line = String::new();
        loop {
            line.clear();
            if tokio::io::AsyncBufReadExt::read_line(&mut commands, &mut line)
                .await
                .unwrap()
                == 0
            {
                return;
            }
            let (what, relay) = line.trim().split_once(' ').unwrap();
            let relay: SocketAddr = relay.parse().unwrap();
            let count = if what == "warm" { 64 } else { tunnels };
            let mut opened = Vec::with_capacity(count);
            let sent = vec![7u8; exchange];
            let mut received = vec![0u8; exchange];
            for _ in 0..count {
                let mut stream = TcpStream::connect(relay).await.unwrap();
                let (mut reader, mut writer) = stream.split();
                let (wrote, read) =
                    tokio::join!(writer.write_all(&sent), reader.read_exact(&mut received));
                wrote.unwrap();
                read.unwrap();
                opened.push(stream);
            }
            if what == "hold" {
                held.extend(opened);
            }
            println!("done");
        }
    });
}

fn main() {
    if let Ok(tunnels) = std::env::var(PEER_ENV) {
        return peer(tunnels.parse().unwrap());
    }
    if let Ok(copier) = std::env::var(MEMORY_ENV) {
        return memory_of(Copier::ALL[copier.parse::<usize>().unwrap()]);
    }
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
    if wants("memory") {
        memory();
    }
    if wants("throughput") {
        throughput();
    }
}
