//! Network namespaces made by a test: a "switch" namespace holding a bridge, and hosts, each
//! a namespace of its own with one interface (`eth0`) plugged into that bridge. Programs run
//! in a host with `ip netns exec`; test code runs there on a thread that joined the
//! namespace. Everything is removed when the topology is dropped, also when the test panics.
//! Needs root and iproute2's `ip`: without them the test fails and says so.

use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The namespaces of one test, named after the test process so that runs never collide.
pub struct Topology {
    prefix: String,
    /// Every namespace made so far, to delete.
    made: Vec<String>,
}

/// Where the `ip netns` namespaces are mounted.
const NETNS_DIR: &str = "/run/netns";

impl Topology {
    /// A switch and one namespace per host, each host with the given addresses on `eth0`
    /// (`"198.18.0.2/24"`; IPv6 ones skip duplicate address detection, to be usable at
    /// once) and its loopback up.
    pub fn new(hosts: &[(&str, &[&str])]) -> Topology {
        require_root_and_ip();
        remove_leftovers();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!(
            "fulcrum-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        // Built up as it goes, so that a failing step still removes what was made.
        let mut topology = Topology {
            prefix,
            made: Vec::new(),
        };
        let switch = topology.switch();
        ip(&["netns", "add", &switch]);
        topology.made.push(switch.clone());
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for (host, addresses) in hosts {
            assert_ne!(*host, "switch", "a host may not be called `switch`");
            let ns = topology.ns(host);
            ip(&["netns", "add", &ns]);
            topology.made.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", host, "netns",
                &switch,
            ]);
            for address in *addresses {
                if address.contains(':') {
                    ip(&["-n", &ns, "addr", "add", address, "dev", "eth0", "nodad"]);
                } else {
                    ip(&["-n", &ns, "addr", "add", address, "dev", "eth0"]);
                }
            }
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &switch, "link", "set", host, "master", "br0", "up"]);
        }
        topology
    }

    /// The namespace name of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn switch(&self) -> String {
        self.ns("switch")
    }

    /// Plugs `host`'s cable out of the switch (`up` false) or back in: its switch port goes
    /// down, and the host sees no carrier.
    pub fn set_link(&self, host: &str, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.switch(), "link", "set", host, state]);
    }

    /// `host`'s Ethernet address.
    pub fn mac(&self, host: &str) -> String {
        let out = ip(&["-n", &self.ns(host), "-br", "link", "show", "dev", "eth0"]);
        out.split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("no MAC address in `{out}`"))
            .to_string()
    }

    /// The Ethernet address `host`'s neighbour cache holds for `address`, if any.
    pub fn neighbour(&self, host: &str, address: &str) -> Option<String> {
        let out = ip(&[
            "-n",
            &self.ns(host),
            "neigh",
            "show",
            address,
            "dev",
            "eth0",
        ]);
        let mut words = out.split_whitespace();
        words.find(|w| *w == "lladdr")?;
        words.next().map(str::to_string)
    }

    /// What `ip addr show dev eth0` says in `host`.
    pub fn addresses(&self, host: &str) -> String {
        ip(&["-n", &self.ns(host), "addr", "show", "dev", "eth0"])
    }

    /// `program` with `args`, to run in `host`.
    pub fn command(&self, host: &str, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns(host), program])
            .args(args);
        command
    }

    /// Runs `f` on a new thread in `host`'s namespace: every socket it opens lives there.
    pub fn within<T: Send>(&self, host: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("{NETNS_DIR}/{}", self.ns(host));
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    enter_namespace(&path);
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs `make_future`'s future in `host`'s namespace (see [`Topology::within`]) on a
    /// current-thread tokio runtime.
    pub fn run<T, F, Fut>(&self, host: &str, make_future: F) -> T
    where
        T: Send,
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
    {
        self.within(host, || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(make_future())
        })
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace destroys its end of each veth, and with it the other end.
        for ns in &self.made {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Moves the calling thread into the network namespace mounted at `path`.
fn enter_namespace(path: &str) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: a plain setns(2) on a descriptor that stays open for the call; it changes
    // only this thread's network namespace.
    let done = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
    assert_eq!(done, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// Runs `ip` with `args`, panicking with its error output if it fails; returns its output.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip`: {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn require_root_and_ip() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "these tests build network namespaces and need root (CI runs them as root)"
    );
    let found = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "these tests need iproute2's `ip` (apt-get install iproute2)"
    );
}

/// Namespaces of earlier test runs that were killed before they could clean up: those
/// whose process is gone.
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("fulcrum-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// A program running in a host of a [`Topology`], killed when dropped; its output is
/// kept, and its stderr echoed to the test's, each line prefixed with `label`.
pub struct Running {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Running {
    /// Starts `command` and waits (up to 20 s) until its output has a line containing
    /// `ready`.
    pub fn start(mut command: Command, label: &str, ready: &str) -> Running {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
        let output = Arc::new(Mutex::new(String::new()));
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for (stream, echo) in [(stdout, false), (stderr, true)] {
            let sink = output.clone();
            let label = label.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if echo {
                        eprintln!("[{label}] {line}");
                    }
                    let mut output = sink.lock().unwrap();
                    output.push_str(&line);
                    output.push('\n');
                }
            });
        }
        let mut running = Running { child, output };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !running.output().contains(ready) {
            let exited = running.child.try_wait().unwrap();
            assert!(
                Instant::now() < deadline && exited.is_none(),
                "{label} did not print {ready:?} within 20 s (exit: {exited:?}): {}",
                running.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        running
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
