//! UDP listeners, with DNS as the reference: real DNS servers started here (each answering
//! with an address that says which server it is), the real `fulcrum` binary between them
//! and real DNS clients (hickory's), each client on a socket of its own, so a flow of its
//! own: every answer matches its query, flows are balanced and keep their server, expire,
//! are capped, leave a server that stops answering, and live through reloads and upgrades.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_resolver::net::client::{Client, ClientHandle};
use hickory_resolver::net::runtime::{RuntimeProvider, TokioRuntimeProvider};
use hickory_resolver::net::udp::UdpClientStream;
use tokio::net::UdpSocket;

use support::Process;

/// One query a DNS server saw.
#[derive(Debug, Clone)]
struct Seen {
    name: Name,
    id: u16,
    /// Where it came from: Fulcrum's socket for the flow.
    from: SocketAddr,
}

/// A DNS server on 127.0.0.1 that answers every A query with `192.0.2.<number>` for the
/// name asked, and remembers what it was asked. It can fall silent (bound, answering
/// nothing) or stop (its port closed).
struct DnsServer {
    addr: SocketAddr,
    number: u8,
    seen: Arc<Mutex<Vec<Seen>>>,
    silent: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
}

impl DnsServer {
    async fn start(number: u8) -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let silent = Arc::new(AtomicBool::new(false));
        let (log, quiet) = (seen.clone(), silent.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(query) = request.queries.first().cloned() else {
                    continue;
                };
                if quiet.load(Ordering::SeqCst) {
                    continue;
                }
                log.lock().unwrap().push(Seen {
                    name: query.name().clone(),
                    id: request.metadata.id,
                    from,
                });
                let mut response =
                    Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
                response.metadata.recursion_desired = request.metadata.recursion_desired;
                response.metadata.recursion_available = true;
                response.add_query(query.clone());
                response.edns = request.edns.clone();
                if query.query_type() == RecordType::A {
                    response.add_answer(Record::from_rdata(
                        query.name().clone(),
                        60,
                        RData::A(A(Ipv4Addr::new(192, 0, 2, number))),
                    ));
                }
                let _ = socket.send_to(&response.to_vec().unwrap(), from).await;
            }
        });
        DnsServer {
            addr,
            number,
            seen,
            silent,
            task: task.abort_handle(),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The source ports (Fulcrum's flow sockets) it saw queries from.
    fn flows(&self) -> HashSet<SocketAddr> {
        self.seen().into_iter().map(|s| s.from).collect()
    }

    /// Where the query for `name` came from, if it got here.
    fn source_of(&self, name: &Name) -> Option<SocketAddr> {
        self.seen()
            .into_iter()
            .find(|s| s.name == *name)
            .map(|s| s.from)
    }

    fn fall_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
    }

    /// Closes its port: queries to it are answered by ICMP port unreachable.
    fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `RuntimeProvider` for hickory's client that sends every query (and every retry) from
/// one socket, as a stub resolver with a fixed source port does: through Fulcrum, all of a
/// client's queries are one flow.
#[derive(Clone)]
struct FixedPort {
    tokio: TokioRuntimeProvider,
    socket: Arc<std::net::UdpSocket>,
}

impl RuntimeProvider for FixedPort {
    type Handle = <TokioRuntimeProvider as RuntimeProvider>::Handle;
    type Timer = <TokioRuntimeProvider as RuntimeProvider>::Timer;
    type Udp = UdpSocket;
    type Tcp = <TokioRuntimeProvider as RuntimeProvider>::Tcp;

    fn create_handle(&self) -> Self::Handle {
        self.tokio.create_handle()
    }

    fn connect_tcp(
        &self,
        server_addr: SocketAddr,
        bind_addr: Option<SocketAddr>,
        timeout: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = std::io::Result<Self::Tcp>>>> {
        self.tokio.connect_tcp(server_addr, bind_addr, timeout)
    }

    fn bind_udp(
        &self,
        _local_addr: SocketAddr,
        _server_addr: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = std::io::Result<Self::Udp>>>> {
        let copy = self.socket.try_clone();
        Box::pin(async move { UdpSocket::from_std(copy?) })
    }
}

/// A DNS client (hickory's) on a port of its own, asking Fulcrum.
struct DnsClient {
    client: Client<FixedPort>,
    port: u16,
    background: tokio::task::AbortHandle,
}

/// An answer as a client got it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    id: u16,
    /// The name the answer's record is for.
    name: Name,
    /// Which server answered (192.0.2.N).
    server: u8,
}

impl DnsClient {
    /// Waits up to `timeout` for each answer, sending the query again every 333 ms (up to
    /// `tries` times in all), as stub resolvers do.
    fn new(fulcrum: SocketAddr, timeout: Duration, tries: u8) -> DnsClient {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let port = socket.local_addr().unwrap().port();
        let provider = FixedPort {
            tokio: TokioRuntimeProvider::new(),
            socket: Arc::new(socket),
        };
        let stream = UdpClientStream::builder(fulcrum, provider)
            .with_timeout(Some(timeout))
            .with_max_retries(tries)
            .build();
        let (client, background) = Client::<FixedPort>::from_sender(stream);
        let background = tokio::spawn(background).abort_handle();
        DnsClient {
            client,
            port,
            background,
        }
    }

    /// Asks for `name` (type A) and checks the answer is to this query.
    async fn ask(&mut self, name: &Name) -> Result<Answer, String> {
        let response = self
            .client
            .query(name.clone(), DNSClass::IN, RecordType::A)
            .await
            .map_err(|e| format!("{name} from port {}: {e}", self.port))?;
        let question = response.queries.first().map(|q| q.name().clone());
        assert_eq!(
            question.as_ref(),
            Some(name),
            "the question came back changed"
        );
        let record = response
            .answers
            .first()
            .ok_or_else(|| format!("{name}: an answer without a record"))?;
        let RData::A(A(ip)) = &record.data else {
            return Err(format!("{name}: not an A record: {record:?}"));
        };
        Ok(Answer {
            id: response.metadata.id,
            name: record.name.clone(),
            server: ip.octets()[3],
        })
    }
}

impl Drop for DnsClient {
    fn drop(&mut self) {
        self.background.abort();
    }
}

fn name(text: &str) -> Name {
    Name::from_ascii(text).unwrap()
}

/// An address on 127.0.0.1 with a port nothing is bound to now, over UDP (on any
/// address, v4 or v6) or TCP. The port is below the ephemeral range, so that no socket
/// bound or connected meanwhile (Fulcrum's flow sockets, other tests' connections) takes
/// it before a test binds it, or binds it again.
fn unused_udp_addr() -> SocketAddr {
    use std::sync::atomic::AtomicU32;
    const LOW: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .filter(|&low| low > LOW + 1000)
        .unwrap_or(32_768);
    let span = ephemeral - LOW;
    // Test binaries run at the same time start at different places.
    let start = std::process::id().wrapping_mul(7919);
    let ipv6 = std::net::UdpSocket::bind("[::1]:0").is_ok();
    // Each socket is closed before the next is tried: a dual-stack `[::]` one would
    // clash with `0.0.0.0`.
    let free = |bind: &dyn Fn() -> std::io::Result<()>| bind().is_ok();
    for _ in 0..500 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + start.wrapping_add(n.wrapping_mul(131)) % span) as u16;
        let free = free(&|| std::net::UdpSocket::bind(("0.0.0.0", port)).map(drop))
            && (!ipv6 || free(&|| std::net::UdpSocket::bind(("::", port)).map(drop)))
            && free(&|| std::net::TcpListener::bind(("127.0.0.1", port)).map(drop));
        if free {
            return SocketAddr::from(([127, 0, 0, 1], port));
        }
    }
    panic!("no free port below {ephemeral}");
}

/// A UDP listener `dns` on `bind` over `servers`, with `listener` and `upstream` settings
/// added to each, and `top` before them.
fn config(top: &str, bind: &str, servers: &[&DnsServer], listener: &str, upstream: &str) -> String {
    let servers: Vec<String> = servers
        .iter()
        .map(|s| format!("{{ address = \"{}\" }}", s.addr))
        .collect();
    format!(
        "{top}\n[access_log]\nenabled = false\n\
         [listeners.dns]\nbind = \"{bind}\"\nmode = \"udp\"\nupstream = \"dns\"\n{listener}\n\
         [upstreams.dns]\nservers = [{}]\n{upstream}\n",
        servers.join(", ")
    )
}

/// Waits (up to 15 s) until `process` has logged `needle` `times` times.
async fn logged(process: &Process, needle: &str, times: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = process.stderr.lock().unwrap().clone();
        if log.matches(needle).count() >= times {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} not logged {times} times in: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts clients until one has a flow on each of `servers` servers; each with the name of
/// its first query.
async fn a_client_on_each(fulcrum: SocketAddr, servers: usize) -> HashMap<u8, (DnsClient, Name)> {
    let mut on: HashMap<u8, (DnsClient, Name)> = HashMap::new();
    for i in 0..20 {
        let mut client = DnsClient::new(fulcrum, Duration::from_secs(5), 3);
        let asked = name(&format!("warm{i}.example.test."));
        let answer = client.ask(&asked).await.unwrap();
        on.entry(answer.server).or_insert((client, asked));
        if on.len() == servers {
            break;
        }
    }
    assert_eq!(on.len(), servers, "round robin gave every server a flow");
    on
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_dns_clients_each_get_answers_to_their_own_queries_from_one_server() {
    const CLIENTS: usize = 50;
    const QUERIES: usize = 20;
    let (one, two) = (DnsServer::start(1).await, DnsServer::start(2).await);
    let process = Process::start(
        &config(
            "workers = 2",
            "127.0.0.1:0",
            &[&one, &two],
            "",
            "balance = \"round_robin\"",
        ),
        &[],
    );
    let fulcrum = process.addr;
    // Every client's socket is bound before any asks, and kept until the end: a port
    // given back early could go to another client, which would then share its flow.
    let clients: Vec<DnsClient> = (0..CLIENTS)
        .map(|_| DnsClient::new(fulcrum, Duration::from_secs(10), 5))
        .collect();
    let asking: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, mut client)| {
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for q in 0..QUERIES {
                    let asked = name(&format!("q{q}.client{c}.example.test."));
                    let answer = client.ask(&asked).await.unwrap();
                    assert_eq!(answer.name, asked, "an answer for another name");
                    answers.push((asked, answer));
                }
                (client, answers)
            })
        })
        .collect();
    let mut by_server: HashMap<u8, usize> = HashMap::new();
    let mut done = Vec::new();
    for asked in asking {
        let (client, answers) = asked.await.unwrap();
        let port = client.port;
        done.push(client);
        let servers: HashSet<u8> = answers.iter().map(|(_, a)| a.server).collect();
        assert_eq!(
            servers.len(),
            1,
            "client on port {port} was answered by servers {servers:?}"
        );
        let server = *servers.iter().next().unwrap();
        *by_server.entry(server).or_default() += 1;
        let answering = if server == one.number { &one } else { &two };
        // The id the server saw for each name is the id the client got back: no answer
        // crossed to another query.
        let seen: HashMap<Name, u16> = answering
            .seen()
            .into_iter()
            .map(|s| (s.name, s.id))
            .collect();
        for (asked, answer) in &answers {
            assert_eq!(seen.get(asked), Some(&answer.id), "{asked}");
        }
        // One flow: every query reached the server from the same socket of Fulcrum's.
        let sources: Vec<(Name, SocketAddr)> = answers
            .iter()
            .filter_map(|(asked, _)| Some((asked.clone(), answering.source_of(asked)?)))
            .collect();
        let distinct: HashSet<SocketAddr> = sources.iter().map(|(_, from)| *from).collect();
        assert_eq!(distinct.len(), 1, "client on port {port}: {sources:?}");
    }
    assert_eq!(by_server.values().sum::<usize>(), CLIENTS);
    assert!(
        by_server.len() == 2 && by_server.values().all(|&n| n >= CLIENTS / 4),
        "flows per server: {by_server:?}"
    );
    // A flow per client, each with a socket of its own to its server.
    assert_eq!(one.flows().len() + two.flows().len(), CLIENTS);
}

#[tokio::test]
async fn a_flow_quiet_for_its_idle_timeout_is_forgotten_and_the_next_datagram_starts_another() {
    let server = DnsServer::start(1).await;
    let process = Process::start(
        &config(
            "",
            "127.0.0.1:0",
            &[&server],
            "idle_timeout = \"400ms\"",
            "",
        ),
        &[],
    );
    // No retries: a flow's first datagram must get through (loopback loses none).
    let mut client = DnsClient::new(process.addr, Duration::from_secs(5), 1);
    let (first, second, third) = (
        name("first.example.test."),
        name("second.example.test."),
        name("third.example.test."),
    );
    client.ask(&first).await.unwrap();
    // Within the idle timeout: the same flow, so the same socket to the server.
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.ask(&second).await.unwrap();
    assert_eq!(server.source_of(&first), server.source_of(&second));
    // Past it (and the sweep after it): a new flow, with a new socket.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    client.ask(&third).await.unwrap();
    assert_ne!(server.source_of(&second), server.source_of(&third));
    assert!(server.source_of(&third).is_some());
}

#[tokio::test]
async fn past_max_flows_a_new_client_is_not_answered_until_a_flow_expires() {
    let server = DnsServer::start(1).await;
    let process = Process::start(
        &config(
            "",
            "127.0.0.1:0",
            &[&server],
            "idle_timeout = \"2s\"\nmax_flows = 3",
            "",
        ),
        &[],
    );
    let mut clients: Vec<DnsClient> = (0..3)
        .map(|_| DnsClient::new(process.addr, Duration::from_secs(5), 3))
        .collect();
    for (i, client) in clients.iter_mut().enumerate() {
        client
            .ask(&name(&format!("c{i}.example.test.")))
            .await
            .unwrap();
    }
    // Three flows alive: a fourth client's queries (and their retries) are dropped.
    let mut fourth = DnsClient::new(process.addr, Duration::from_millis(800), 3);
    let refused = fourth.ask(&name("fourth.example.test.")).await;
    assert!(refused.is_err(), "answered past max_flows: {refused:?}");
    assert!(server.source_of(&name("fourth.example.test.")).is_none());
    // A client with a flow still gets answers.
    clients[0].ask(&name("again.example.test.")).await.unwrap();
    // Once the three have been quiet for 2 s, their flows are gone and it is answered.
    tokio::time::sleep(Duration::from_millis(2800)).await;
    let mut fourth = DnsClient::new(process.addr, Duration::from_secs(5), 1);
    fourth.ask(&name("later.example.test.")).await.unwrap();
}

/// Resolvers that send each query from a new port (glibc, systemd-resolved) start a flow
/// per query: with `responses = 1` each ends at its answer, so `max_flows` bounds the
/// queries in flight rather than those of the last `idle_timeout`.
#[tokio::test]
async fn with_responses_a_flow_ends_at_its_answer_and_a_port_per_query_stays_under_max_flows() {
    const CAP: usize = 20;
    let server = DnsServer::start(1).await;
    // Without it, the first CAP clients' flows hold every slot for idle_timeout.
    let without = Process::start(
        &config(
            "",
            "127.0.0.1:0",
            &[&server],
            &format!("max_flows = {CAP}"),
            "",
        ),
        &[],
    );
    let asking: Vec<_> = (0..2 * CAP)
        .map(|i| {
            let mut client = DnsClient::new(without.addr, Duration::from_secs(1), 1);
            tokio::spawn(async move {
                client
                    .ask(&name(&format!("w{i}.example.test.")))
                    .await
                    .is_ok()
            })
        })
        .collect();
    let mut answered = 0;
    for asked in asking {
        answered += usize::from(asked.await.unwrap());
    }
    assert_eq!(answered, CAP, "max_flows = {CAP} without responses");
    drop(without);

    let with = Process::start(
        &config(
            "",
            "127.0.0.1:0",
            &[&server],
            &format!("max_flows = {CAP}\nresponses = 1"),
            "",
        ),
        &[],
    );
    for i in 0..10 * CAP {
        let mut client = DnsClient::new(with.addr, Duration::from_secs(2), 3);
        let asked = name(&format!("q{i}.example.test."));
        let answer = client.ask(&asked).await.unwrap();
        assert_eq!(answer.name, asked);
    }
}

#[tokio::test]
async fn a_server_that_stops_answering_is_marked_down_by_dns_checks_and_flows_leave_it() {
    let (one, two) = (DnsServer::start(1).await, DnsServer::start(2).await);
    let process = Process::start(
        &config(
            "",
            "127.0.0.1:0",
            &[&one, &two],
            "idle_timeout = \"30s\"",
            "balance = \"round_robin\"\n\
             [upstreams.dns.health_check]\ntype = \"dns\"\nquery = \"health.example.test\"\n\
             interval = \"200ms\"\ntimeout = \"150ms\"\nfall = 2\nrise = 1\n",
        ),
        &[],
    );
    let mut on = a_client_on_each(process.addr, 2).await;
    // The checks reach both servers.
    let health = name("health.example.test.");
    for server in [&one, &two] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.seen().iter().any(|s| s.name == health) {
            assert!(Instant::now() < deadline, "no dns health check came");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    two.fall_silent();
    let log = logged(&process, "server down: health checks fail", 1).await;
    let line = log
        .lines()
        .find(|l| l.contains("server down: health checks fail"))
        .unwrap();
    assert!(line.contains(&two.addr.to_string()), "{line}");
    assert!(line.contains("timed out"), "{line}");

    // New clients all go to the server that answers.
    for i in 0..10 {
        let mut client = DnsClient::new(process.addr, Duration::from_secs(5), 3);
        let answer = client
            .ask(&name(&format!("new{i}.example.test.")))
            .await
            .unwrap();
        assert_eq!(answer.server, one.number);
    }
    // The client whose flow was on the silent server: its next query moves the flow to
    // the other server, which answers.
    let (moved, _) = on.get_mut(&two.number).unwrap();
    let answer = moved.ask(&name("moved.example.test.")).await.unwrap();
    assert_eq!(answer.server, one.number);
    // The other client's flow stays where it was, on the same socket.
    let (stayed, first) = on.get_mut(&one.number).unwrap();
    let again = name("stayed.example.test.");
    let answer = stayed.ask(&again).await.unwrap();
    assert_eq!(answer.server, one.number);
    assert_eq!(one.source_of(&again), one.source_of(first));
}

/// A reload that changes an upstream's settings builds new server objects, which the
/// health checks then mark: a flow started before it must follow them, or it stays on a
/// server it cannot see go down.
#[tokio::test]
async fn after_a_reload_that_rebuilds_the_servers_flows_still_leave_a_server_marked_down() {
    let (one, two) = (DnsServer::start(1).await, DnsServer::start(2).await);
    let with_connect = |connect: &str| {
        config(
            &format!("[timeouts]\nupstream_connect = \"{connect}\""),
            "127.0.0.1:0",
            &[&one, &two],
            "idle_timeout = \"30s\"",
            "balance = \"round_robin\"\n\
             [upstreams.dns.health_check]\ntype = \"dns\"\nquery = \"health.example.test\"\n\
             interval = \"200ms\"\ntimeout = \"150ms\"\nfall = 2\nrise = 1\n",
        )
    };
    let process = Process::start(&with_connect("3s"), &[]);
    let mut on = a_client_on_each(process.addr, 2).await;
    std::fs::write(&process.config, with_connect("4s")).unwrap();
    process.signal("HUP");
    logged(&process, "config reloaded", 1).await;
    two.fall_silent();
    let log = logged(&process, "server down: health checks fail", 1).await;
    let line = log
        .lines()
        .find(|l| l.contains("server down: health checks fail"))
        .unwrap();
    assert!(line.contains(&two.addr.to_string()), "{line}");
    // The flow on the silent server moves with the client's next query (or a retry).
    let (moved, _) = on.get_mut(&two.number).unwrap();
    let answer = moved.ask(&name("moved.example.test.")).await.unwrap();
    assert_eq!(answer.server, one.number);
}

#[tokio::test]
async fn a_server_whose_port_closes_is_left_at_the_first_port_unreachable() {
    let (one, two) = (DnsServer::start(1).await, DnsServer::start(2).await);
    let process = Process::start(
        &config(
            "",
            "127.0.0.1:0",
            &[&one, &two],
            "",
            "balance = \"round_robin\"\nfail_timeout = \"30s\"",
        ),
        &[],
    );
    let mut on = a_client_on_each(process.addr, 2).await;
    two.stop();
    // The query reaches a closed port; ICMP ends the flow and marks the server
    // unreachable; the client's retry starts a flow on the other server.
    let (client, _) = on.get_mut(&two.number).unwrap();
    let answer = client.ask(&name("after.example.test.")).await.unwrap();
    assert_eq!(answer.server, one.number);
    let log = logged(&process, "udp server unreachable", 1).await;
    assert!(log.contains(&two.addr.to_string()), "{log}");
    for i in 0..6 {
        let mut client = DnsClient::new(process.addr, Duration::from_secs(5), 3);
        let answer = client
            .ask(&name(&format!("new{i}.example.test.")))
            .await
            .unwrap();
        assert_eq!(answer.server, one.number);
    }
}

#[tokio::test]
async fn a_reload_adds_and_removes_udp_listeners() {
    let server = DnsServer::start(1).await;
    let first = unused_udp_addr();
    let second = unused_udp_addr();
    let process = Process::start(&config("", &first.to_string(), &[&server], "", ""), &[]);
    let mut client = DnsClient::new(first, Duration::from_secs(5), 3);
    client.ask(&name("before.example.test.")).await.unwrap();

    // Added: a second listener, by another name, on another port.
    let both = format!(
        "{}\n[listeners.more]\nbind = \"{second}\"\nmode = \"udp\"\nupstream = \"dns\"\n",
        config("", &first.to_string(), &[&server], "", "")
    );
    std::fs::write(&process.config, both).unwrap();
    process.signal("HUP");
    logged(&process, "config reloaded", 1).await;
    let mut to_second = DnsClient::new(second, Duration::from_secs(5), 3);
    to_second.ask(&name("added.example.test.")).await.unwrap();
    client.ask(&name("kept.example.test.")).await.unwrap();

    // Removed: the first; the second serves on.
    let only_second = config("", &second.to_string(), &[&server], "", "");
    std::fs::write(
        &process.config,
        only_second.replace("listeners.dns", "listeners.more"),
    )
    .unwrap();
    process.signal("HUP");
    logged(&process, "config reloaded", 2).await;
    logged(&process, "listener removed", 1).await;
    to_second.ask(&name("still.example.test.")).await.unwrap();
    // It takes no new client: its loops have stopped receiving.
    let mut late = DnsClient::new(first, Duration::from_millis(500), 1);
    let refused = late.ask(&name("gone.example.test.")).await;
    assert!(
        refused.is_err(),
        "the removed listener answered: {refused:?}"
    );
    // Once its flow has drained (5 s at most), its sockets are closed: the port is free.
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = std::net::UdpSocket::bind(first) {
        assert!(
            Instant::now() < deadline,
            "the removed listener still holds {first}: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A listener removed and added again at once, before its flows have drained (and so
/// while its sockets still hold the port): the reload takes its sockets over.
#[tokio::test]
async fn a_udp_listener_removed_and_added_again_at_once_answers() {
    let server = DnsServer::start(1).await;
    let bind = unused_udp_addr();
    let other = unused_udp_addr();
    let with = config(
        "",
        &bind.to_string(),
        &[&server],
        "idle_timeout = \"30s\"",
        "",
    );
    let process = Process::start(&with, &[]);
    let mut client = DnsClient::new(bind, Duration::from_secs(5), 3);
    client.ask(&name("before.example.test.")).await.unwrap();
    // A client that keeps asking: its flow stays open through the removal's drain (5 s),
    // and with it the removed listener's sockets.
    let busy = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let query = Message::query().to_vec().unwrap();
    let asking = tokio::spawn(async move {
        for _ in 0..300 {
            let _ = busy.send_to(&query, bind).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    for round in 1..=2 {
        // Removed (the config's only listener, now on another address)…
        std::fs::write(
            &process.config,
            with.replace(&bind.to_string(), &other.to_string()),
        )
        .unwrap();
        process.signal("HUP");
        logged(&process, "config reloaded", 2 * round - 1).await;
        // …and back within 100 ms, while the open flow keeps the old sockets bound.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            std::net::UdpSocket::bind(bind).is_err(),
            "the removed listener's sockets were already closed: nothing to take over"
        );
        std::fs::write(&process.config, &with).unwrap();
        process.signal("HUP");
        let log = logged(&process, "config reloaded", 2 * round).await;
        assert!(!log.contains("cannot bind"), "{log}");
        let mut fresh = DnsClient::new(bind, Duration::from_secs(5), 3);
        let answer = fresh
            .ask(&name(&format!("again{round}.example.test.")))
            .await
            .unwrap();
        assert_eq!(answer.server, server.number);
    }
    asking.abort();
}

#[tokio::test]
async fn a_reload_that_removes_a_server_moves_its_flows_and_leaves_the_others() {
    let (one, two) = (DnsServer::start(1).await, DnsServer::start(2).await);
    let bind = unused_udp_addr().to_string();
    let both = config("", &bind, &[&one, &two], "", "balance = \"round_robin\"");
    let process = Process::start(&both, &[]);
    let mut on = a_client_on_each(process.addr, 2).await;
    let only_one = config("", &bind, &[&one], "", "balance = \"round_robin\"");
    std::fs::write(&process.config, only_one).unwrap();
    process.signal("HUP");
    logged(&process, "config reloaded", 1).await;
    // The flow on the removed server moves to the one left, with its next datagram.
    let (client, _) = on.get_mut(&two.number).unwrap();
    let answer = client.ask(&name("moved.example.test.")).await.unwrap();
    assert_eq!(answer.server, one.number);
    // The flow on the server that stays keeps its socket there.
    let (client, first) = on.get_mut(&one.number).unwrap();
    let stayed = name("stayed.example.test.");
    client.ask(&stayed).await.unwrap();
    assert_eq!(one.source_of(first), one.source_of(&stayed));
}

#[tokio::test]
async fn out_of_descriptors_new_flows_are_dropped_quietly_and_come_back_once_flows_expire() {
    const FILES: u64 = 64;
    let server = DnsServer::start(1).await;
    let text = config(
        "workers = 1",
        "127.0.0.1:0",
        &[&server],
        "idle_timeout = \"500ms\"",
        "",
    );
    let process = Process::start_with_open_files(&text, &[], FILES);
    // More clients at once than descriptors: the flows past the limit get no socket.
    let clients: Vec<DnsClient> = (0..2 * FILES)
        .map(|_| DnsClient::new(process.addr, Duration::from_millis(1500), 1))
        .collect();
    let asking: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            tokio::spawn(async move {
                let answered = client.ask(&name(&format!("c{i}.example.test."))).await;
                (client, answered.is_ok())
            })
        })
        .collect();
    let mut answered = 0;
    let mut keep = Vec::new();
    for asked in asking {
        let (client, ok) = asked.await.unwrap();
        answered += usize::from(ok);
        keep.push(client);
    }
    assert!(answered > 0 && answered < keep.len(), "{answered} answered");
    let log = logged(&process, "cannot open a udp socket", 1).await;
    // Said once a second at most, not once per datagram.
    assert!(
        log.matches("cannot open a udp socket").count() <= 3,
        "{log}"
    );
    // Once the flows have expired, their descriptors serve new ones.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut later = DnsClient::new(process.addr, Duration::from_secs(5), 1);
    later.ask(&name("later.example.test.")).await.unwrap();
    assert!(process.open_files_below(FILES) < FILES as usize);
}

#[tokio::test]
async fn a_reload_switching_a_listener_between_udp_and_http_rebinds_it() {
    let dns = DnsServer::start(1).await;
    let web = support::Backend::named("web").await;
    let bind = unused_udp_addr();
    // The same name and address, as UDP and then as HTTP.
    let as_mode = |udp: bool| {
        let listener = if udp {
            "mode = \"udp\"\nupstream = \"dns\"\n".to_string()
        } else {
            "[[listeners.svc.routes]]\nupstream = \"web\"\n".to_string()
        };
        format!(
            "[access_log]\nenabled = false\n[listeners.svc]\nbind = \"{bind}\"\n{listener}\
             [upstreams.dns]\nservers = [{{ address = \"{}\" }}]\n\
             [upstreams.web]\nservers = [{{ address = \"{}\" }}]\n",
            dns.addr, web.addr
        )
    };
    let process = Process::start(&as_mode(true), &[]);
    let mut client = DnsClient::new(bind, Duration::from_secs(5), 3);
    client.ask(&name("udp.example.test.")).await.unwrap();

    std::fs::write(&process.config, as_mode(false)).unwrap();
    process.signal("HUP");
    logged(&process, "config reloaded", 1).await;
    let http = support::client();
    assert_eq!(
        support::get_text(&http, &format!("http://{bind}/")).await,
        "web"
    );
    // Its UDP loops have stopped: a new client is not answered over UDP.
    let mut late = DnsClient::new(bind, Duration::from_millis(500), 1);
    let refused = late.ask(&name("gone.example.test.")).await;
    assert!(refused.is_err(), "still answered over UDP: {refused:?}");

    // Back to UDP at once, whether or not the old flow has drained (and its sockets
    // closed): the reload takes them over if they are still open.
    std::fs::write(&process.config, as_mode(true)).unwrap();
    process.signal("HUP");
    logged(&process, "config reloaded", 2).await;
    let mut client = DnsClient::new(bind, Duration::from_secs(5), 3);
    client.ask(&name("back.example.test.")).await.unwrap();
}

/// Kills the process an upgrade started, which is no child of the test.
struct Started(u32);

impl Drop for Started {
    fn drop(&mut self) {
        // SAFETY: a plain kill(2) of a process id.
        unsafe {
            libc::kill(self.0 as libc::pid_t, libc::SIGKILL);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_a_udp_listener_answering_every_query() {
    const CLIENTS: usize = 8;
    let server = DnsServer::start(1).await;
    let bind = unused_udp_addr();
    let admin = support::unused_addr();
    let mut process = Process::start(
        &config(
            &format!(
                "workers = 2\n[admin]\nbind = \"{admin}\"\n[timeouts]\nshutdown_grace = \"20s\""
            ),
            &bind.to_string(),
            &[&server],
            "",
            "",
        ),
        &[],
    );
    process.log_from("admin listener").await;
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let stop = stop.clone();
            tokio::spawn(async move {
                // Retries every 333 ms, for up to 10 s: a query lost in the handover is
                // asked again, as a stub resolver would.
                let mut client = DnsClient::new(bind, Duration::from_secs(10), 30);
                let (mut asked, mut failed) = (0, Vec::new());
                let start = Instant::now();
                while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
                    let query = name(&format!("q{asked}.c{c}.example.test."));
                    asked += 1;
                    match client.ask(&query).await {
                        Ok(answer) => assert_eq!(answer.name, query),
                        Err(e) => failed.push(format!("at {:?}: {e}", start.elapsed())),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (asked, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let old = process.child.id();
    process.signal("USR2");
    let line = logged(&process, "upgraded: process ", 1).await;
    let new: u32 = line
        .split("upgraded: process ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .expect("the new process's pid");
    let _started = Started(new);
    assert_ne!(new, old);
    // The old process drains and exits; the new one answers on.
    assert_eq!(process.wait(Duration::from_secs(20)), 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for l in loops {
        let (asked, failed) = l.await.unwrap();
        total += asked;
        assert!(
            failed.is_empty(),
            "{} of {asked} failed: {failed:?}",
            failed.len()
        );
    }
    assert!(total > CLIENTS * 10, "only {total} queries were asked");
    // Still answering, from the new process alone.
    let mut client = DnsClient::new(bind, Duration::from_secs(5), 3);
    client.ask(&name("after.example.test.")).await.unwrap();
}

/// An echo server on 127.0.0.1 and an in-process Fulcrum with a UDP listener over it.
async fn echo_behind_fulcrum(bind: &str) -> (fulcrum::server::Server, SocketAddr) {
    let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let text = format!(
        "[access_log]\nenabled = false\n\
         [listeners.echo]\nbind = \"{bind}\"\nmode = \"udp\"\nupstream = \"echo\"\n\
         [upstreams.echo]\nservers = [{{ address = \"{echo_addr}\" }}]\n"
    );
    let config = fulcrum::config::parse("test.toml", &text).unwrap();
    let server = fulcrum::server::Server::start(config).await.unwrap();
    let addr = server.local_addrs()[0];
    (server, addr)
}

/// Sends `datagram` from `client` and waits up to `wait` for it to come back.
async fn echoed(client: &UdpSocket, datagram: &[u8], wait: Duration) -> bool {
    client.send(datagram).await.unwrap();
    let mut buf = [0u8; 2048];
    matches!(
        tokio::time::timeout(wait, client.recv(&mut buf)).await,
        Ok(Ok(n)) if &buf[..n] == datagram
    )
}

#[tokio::test]
async fn an_ipv6_listener_relays_to_an_ipv4_server() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here: skipped");
        return;
    }
    let (_server, fulcrum) = echo_behind_fulcrum("[::1]:0").await;
    assert!(fulcrum.is_ipv6());
    let client = UdpSocket::bind("[::1]:0").await.unwrap();
    client.connect(fulcrum).await.unwrap();
    for i in 0..5u8 {
        assert!(echoed(&client, &[i; 100], Duration::from_secs(5)).await);
    }
}

/// A listener on a wildcard address replies from the address each client sent to: a
/// connected client socket (as a DNS resolver's) takes datagrams from that address alone.
#[tokio::test]
async fn a_wildcard_listener_replies_from_the_address_the_client_sent_to() {
    let port = unused_udp_addr().port();
    let (_server, fulcrum) = echo_behind_fulcrum(&format!("0.0.0.0:{port}")).await;
    assert_eq!(fulcrum.port(), port);
    for (i, to) in ["127.0.0.2", "127.0.0.1", "127.0.0.3"]
        .into_iter()
        .enumerate()
    {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect((to, port)).await.unwrap();
        for j in 0..3u8 {
            assert!(
                echoed(&client, &[i as u8, j], Duration::from_secs(5)).await,
                "no reply from {to}:{port}"
            );
        }
    }
}

/// As above, on `[::]`: over IPv6, and over IPv4 as mapped addresses.
#[tokio::test]
async fn an_ipv6_wildcard_listener_replies_from_the_address_the_client_sent_to() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here: skipped");
        return;
    }
    let port = unused_udp_addr().port();
    let (_server, _) = echo_behind_fulcrum(&format!("[::]:{port}")).await;
    for (from, to) in [("[::1]:0", "::1"), ("127.0.0.1:0", "127.0.0.2")] {
        let client = UdpSocket::bind(from).await.unwrap();
        client.connect((to, port)).await.unwrap();
        assert!(
            echoed(&client, b"hello", Duration::from_secs(5)).await,
            "no reply from {to} port {port}"
        );
    }
}

#[tokio::test]
async fn an_ha_switchover_pause_holds_off_new_flows_and_relays_the_open_ones() {
    let (server, fulcrum) = echo_behind_fulcrum("127.0.0.1:0").await;
    let open = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    open.connect(fulcrum).await.unwrap();
    assert!(echoed(&open, b"before", Duration::from_secs(5)).await);

    let quiesce = server.quiesce();
    quiesce.pause();
    // Flows are not connections a switchover's drain waits for.
    assert_eq!(quiesce.open_connections(), 0);
    let new = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    new.connect(fulcrum).await.unwrap();
    assert!(!echoed(&new, b"new", Duration::from_millis(500)).await);
    // The open flow goes on, whatever its bytes (a TCP SYN filter on a UDP socket would
    // read a payload byte as TCP flags, and drop this one).
    assert!(echoed(&open, &[0xff; 64], Duration::from_secs(5)).await);

    quiesce.resume();
    assert!(echoed(&new, b"after", Duration::from_secs(5)).await);

    let stats = server.udp_stats();
    let counts = stats.lock().unwrap().values().next().unwrap().counts();
    assert_eq!(counts.flows_open, 2, "{counts:?}");
    assert_eq!(counts.flows_started, 2, "{counts:?}");
    // Paused: the new client's first datagram was dropped, and nothing else.
    assert_eq!(counts.dropped, 1, "{counts:?}");
    assert_eq!(counts.datagrams_from_clients, 3, "{counts:?}");
    assert_eq!(counts.datagrams_from_servers, 3, "{counts:?}");
    assert_eq!(counts.bytes_from_servers, 6 + 64 + 5, "{counts:?}");
}

#[tokio::test]
async fn a_udp_listener_counts_its_flows_datagrams_and_what_the_cap_drops() {
    let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf).await {
            let _ = echo.send_to(&buf[..n], from).await;
        }
    });
    let text = format!(
        "[access_log]\nenabled = false\n\
         [listeners.echo]\nbind = \"127.0.0.1:0\"\nmode = \"udp\"\nupstream = \"echo\"\n\
         max_flows = 2\nidle_timeout = \"1s\"\n\
         [upstreams.echo]\nservers = [{{ address = \"{echo_addr}\" }}]\n"
    );
    let config = fulcrum::config::parse("test.toml", &text).unwrap();
    let server = fulcrum::server::Server::start(config).await.unwrap();
    let fulcrum = server.local_addrs()[0];
    let counts = || {
        let stats = server.udp_stats();
        let table = stats.lock().unwrap();
        let stats = table.values().next().unwrap();
        assert_eq!(stats.name, "echo");
        assert_eq!(stats.addr, fulcrum);
        stats.counts()
    };
    let mut clients = Vec::new();
    for _ in 0..3 {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(fulcrum).await.unwrap();
        clients.push(client);
    }
    for client in &clients[..2] {
        for _ in 0..3 {
            assert!(echoed(client, &[1; 10], Duration::from_secs(5)).await);
        }
    }
    assert!(!echoed(&clients[2], &[2; 10], Duration::from_millis(100)).await);
    let at_cap = counts();
    assert_eq!(
        at_cap,
        fulcrum::l4::udp::UdpCounts {
            flows_open: 2,
            flows_started: 2,
            datagrams_from_clients: 6,
            bytes_from_clients: 60,
            datagrams_from_servers: 6,
            bytes_from_servers: 60,
            dropped_at_cap: 1,
            dropped: 0,
            servers_unreachable: 0,
        }
    );
    // Quiet past the idle timeout: both flows end, and the third client gets one.
    let deadline = Instant::now() + Duration::from_secs(5);
    while counts().flows_open > 0 {
        assert!(Instant::now() < deadline, "{:?}", counts());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(echoed(&clients[2], &[3; 10], Duration::from_secs(5)).await);
    let after = counts();
    assert_eq!((after.flows_open, after.flows_started), (1, 3), "{after:?}");
}

/// Counts the allocations each thread makes, for the test below.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn count_allocation() {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

fn allocations() -> u64 {
    ALLOCATIONS.with(|n| n.get())
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: the caller's promises about `layout` hold for System too.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from System with this layout.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        count_allocation();
        // SAFETY: `ptr` came from System with this layout.
        unsafe { std::alloc::System.realloc(ptr, layout, size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// In-process, on this one thread (the current-thread runtime runs Fulcrum, the client
/// and the server): once a flow is open, relaying datagrams both ways allocates nothing.
#[tokio::test]
async fn relaying_a_flow_s_datagrams_allocates_nothing() {
    let (server, fulcrum) = echo_behind_fulcrum("127.0.0.1:0").await;
    count_round_trip_allocations(fulcrum).await;
    drop(server);
}

/// As above, on a wildcard listener, which receives and replies with packet info.
#[tokio::test]
async fn relaying_through_a_wildcard_listener_allocates_nothing() {
    let port = unused_udp_addr().port();
    let (server, _) = echo_behind_fulcrum(&format!("0.0.0.0:{port}")).await;
    count_round_trip_allocations(SocketAddr::from(([127, 0, 0, 1], port))).await;
    drop(server);
}

/// Opens a flow through `fulcrum` to an echo server, then checks that 2,000 round trips
/// on it allocate nothing on this thread.
async fn count_round_trip_allocations(fulcrum: SocketAddr) {
    const ROUND_TRIPS: u64 = 2000;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(fulcrum).await.unwrap();
    let mut buf = [0u8; 2048];
    let round_trip = async |i: u64, buf: &mut [u8]| {
        let datagram = [(i % 251) as u8; 1200];
        client.send(&datagram).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(buf))
            .await
            .expect("no echo through fulcrum")
            .unwrap();
        assert_eq!(&buf[..n], &datagram[..]);
    };
    // The flow starts (its socket, task and table entry) and warms up.
    for i in 0..100 {
        round_trip(i, &mut buf).await;
    }
    let before = allocations();
    for i in 0..ROUND_TRIPS {
        round_trip(i, &mut buf).await;
    }
    let made = allocations() - before;
    eprintln!("{made} allocations for {ROUND_TRIPS} round trips through the relay");
    assert_eq!(made, 0, "allocations for {ROUND_TRIPS} round trips");
}
