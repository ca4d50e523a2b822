#!/usr/bin/env python3
"""Fulcrum beside nginx and HAProxy, in one run, on this machine.

Every proxy runs pinned to CPU 0 with one worker, in front of the same nginx backend
(pinned to CPU 1 with wrk). Scenarios run interleaved across proxies for several rounds;
medians are reported. Requests per CPU-second divide the requests served by the proxy
process's own user+system CPU time over the run (from /proc), so the figure does not
depend on how much CPU the load generator took.

Scenarios use wrk over HTTP/1.1, except `h2c`: h2load with prior-knowledge HTTP/2 (16
connections of 10 concurrent streams each) to the proxy, which talks HTTP/1.1 to the backend.
The `tls-*` scenarios are the same over HTTPS (h2 over TLS for `tls-h2`): every proxy
serves one ECDSA P-256 certificate made at startup, with session resumption as Fulcrum's
defaults have it (tickets, a 10,000-session cache) or, for `tls-new`, off on every proxy.
Before the rounds each TLS listener is checked with `openssl s_client` (version, cipher,
group, ALPN, and whether a reconnect resumes) and the table says what was negotiated.

The `tcp-*` scenarios put each proxy in L4 mode on a port of its own: Fulcrum's `mode =
"tcp"` listener, HAProxy's `mode tcp`, nginx's `stream` module; each relays bytes without
parsing HTTP, so every client connection is one upstream connection, and wrk speaks HTTP
through the tunnel to the same backend. nginx's HTTP proxy (`nginx-http`, the config of
the HTTP scenarios) runs them too, as the reference the issue's goal is stated against.
Bulk scenarios also report MiB per CPU-second: what wrk read, over the proxy's CPU time.

Usage: python3 bench/run.py [--rounds N] [--duration SECONDS] [--scenarios KEY,...]
                            [--proxies fulcrum,nginx,haproxy] [--port-base PORT] [--out FILE]
Installs nginx (and its stream module), haproxy, wrk and h2load (nghttp2-client) from
Debian packages if missing.
"""

import argparse
import collections
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def set_ports(base):
    """All ports the benchmark listens on, from one base (default 18000), all on 127.0.0.1."""
    global BACKEND_PORT, BACKEND_H2C_PORT, PROXY_PORT, PROXY_H2C_PORT, PROXY_TLS_PORT, PROXY_TCP_PORT
    BACKEND_PORT = base + 1  # the nginx backend, HTTP/1.1
    BACKEND_H2C_PORT = base + 2  # the same backend over h2c, for the direct h2c row only
    PROXY_PORT = base + 80  # the proxy under test, HTTP/1.1 (and h2c for Fulcrum)
    PROXY_H2C_PORT = base + 82  # nginx's and HAProxy's h2c-only listeners
    PROXY_TLS_PORT = base + 43  # the proxy under test over TLS: HTTP/1.1 and h2 by ALPN
    PROXY_TCP_PORT = base + 70  # the proxy under test relaying TCP (L4), no HTTP parsed


set_ports(18000)

# key (for --scenarios), title, path, connections, extra client args, client, and for
# scenarios over TLS which proxy configs serve them: "resume" (session resumption as
# Fulcrum's defaults: tickets and a session cache) or "full" (no resumption on any proxy);
# and whether the proxies relay it as TCP (L4) rather than proxy HTTP.
Scenario = collections.namedtuple("Scenario", "key title path conns extra client tls tcp", defaults=[None, False])
CLOSE = ["-H", "Connection: close"]
SCENARIOS = [
    Scenario("ka64", "keep-alive 1 KiB, 64 conns", "/1k", 64, [], "wrk"),
    Scenario("ka256", "keep-alive 1 KiB, 256 conns", "/1k", 256, [], "wrk"),
    Scenario("new", "new connection per request", "/1k", 32, CLOSE, "wrk"),
    Scenario("100k", "keep-alive 100 KiB, 64 conns", "/100k", 64, [], "wrk"),
    # Where a batching controller shows harm: one connection (every wait is latency), and a
    # low fixed rate (16 connections × 125 requests a second, h2load over HTTP/1.1).
    Scenario("one", "keep-alive 1 KiB, 1 conn", "/1k", 1, [], "wrk"),
    Scenario("rate", "1 KiB at 2,000 req/s, 16 conns", "/1k", 16, ["--h1", "--rps=125"], "h2load"),
    Scenario("h2c", "h2c, 16 connections × 10 streams", "/1k", 16, ["-m10"], "h2load"),
    Scenario("tls-ka64", "TLS keep-alive 1 KiB, 64 conns", "/1k", 64, [], "wrk", "resume"),
    Scenario("tls-new", "TLS full handshake per request", "/1k", 32, CLOSE, "wrk", "full"),
    Scenario("tls-resume", "TLS resumed handshake per request", "/1k", 32, CLOSE, "wrk", "resume"),
    Scenario("tls-h2", "h2 over TLS, 16 conns × 10 streams", "/1k", 16, ["-m10"], "h2load", "resume"),
    Scenario("tls-100k", "TLS keep-alive 100 KiB, 64 conns", "/100k", 64, [], "wrk", "resume"),
    Scenario("tcp-ka64", "TCP keep-alive 1 KiB, 64 conns", "/1k", 64, [], "wrk", tcp=True),
    Scenario("tcp-ka256", "TCP keep-alive 1 KiB, 256 conns", "/1k", 256, [], "wrk", tcp=True),
    Scenario("tcp-new", "TCP new connection per request", "/1k", 32, CLOSE, "wrk", tcp=True),
    Scenario("tcp-100k", "TCP keep-alive 100 KiB, 64 conns", "/100k", 64, [], "wrk", tcp=True),
    # wrk's default 2 s timeout is near a 10 MiB response's p99 on this machine.
    Scenario("tcp-10m", "TCP keep-alive 10 MiB, 16 conns", "/10m", 16, ["--timeout", "10s"], "wrk", tcp=True),
]
# Scenarios whose figure of merit is bytes: they also report MiB per CPU-second.
BULK_PATHS = ("/100k", "/10m")
# The proxies of the L4 scenarios: the three in TCP mode, and nginx's HTTP proxy for reference.
L4_PROXIES = ("fulcrum", "nginx", "haproxy", "nginx-http")
TLS_VARIANTS = ("resume", "full")
# Sessions a proxy remembers for resumption by id: Fulcrum's default `session_cache`.
SESSION_CACHE = 10000


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


# Debian builds nginx's stream module as a dynamic module, in its own package.
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def install(perf=False):
    need = [p for p, b in [("nginx", "nginx"), ("haproxy", "haproxy"), ("wrk", "wrk"), ("nghttp2-client", "h2load")] if not shutil.which(b) and not os.path.exists(f"/usr/sbin/{b}")]
    if perf and not shutil.which("perf"):
        need.append("linux-perf")  # only `--syscalls` uses it
    if not os.path.exists(NGINX_STREAM_MODULE):
        need.append("libnginx-mod-stream")
    if need:
        print(f"installing {' '.join(need)} ...", file=sys.stderr)
        sh("apt-get", "update", "-qq")
        sh("apt-get", "install", "-y", "-qq", *need, stdout=subprocess.DEVNULL)


def build_fulcrum():
    sh("cargo", "build", "--release", "--quiet", cwd=ROOT)
    return os.path.join(ROOT, "target", "release", "fulcrum")


def wait_port(port, timeout=10):
    import socket
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def nginx_bin():
    return shutil.which("nginx") or "/usr/sbin/nginx"


def haproxy_bin():
    return shutil.which("haproxy") or "/usr/sbin/haproxy"


def start_backend(work, max_conns=4096):
    """The nginx backend, pinned to CPU 1: static 1 KiB, 100 KiB and 10 MiB files."""
    www = os.path.join(work, "www")
    os.makedirs(www, exist_ok=True)
    for name, size in [("1k", 1024), ("100k", 102400), ("10m", 10 * 1024 * 1024)]:
        with open(os.path.join(www, name), "wb") as f:
            f.write(b"x" * size)
    conf = os.path.join(work, "backend.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1; daemon off; pid {work}/backend.pid; error_log {work}/backend.err;
worker_rlimit_nofile {max_conns + 100};
events {{ worker_connections {max_conns}; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{BACKEND_PORT} backlog=4096; listen 127.0.0.1:{BACKEND_H2C_PORT} http2;
    root {www}; location / {{ }} }} }}
""")
    p = subprocess.Popen(["taskset", "-c", "1", nginx_bin(), "-c", conf, "-p", work], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(BACKEND_PORT)
    return p


def certificate(work):
    """One ECDSA P-256 certificate for localhost and 127.0.0.1, issued by a CA made for it,
    in `work` (made once): every proxy serves it, clients may check it against ca.pem.

    Returns the paths: ca (the CA's certificate), cert (the chain: leaf then CA, PEM, as
    Fulcrum requires a complete chain and every proxy then sends the same bytes), key (its
    PKCS#8 key) and combined (chain then key, HAProxy's `crt` file)."""
    d = os.path.join(work, "tls")
    paths = {name: os.path.join(d, file) for name, file in
             [("ca", "ca.pem"), ("ca_key", "ca.key"), ("cert", "site.pem"), ("key", "site.key"), ("combined", "combined.pem")]}
    if os.path.exists(paths["combined"]):
        return paths
    os.makedirs(d, exist_ok=True)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    for key in (paths["ca_key"], paths["key"]):
        sh("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key, **quiet)
    sh("openssl", "req", "-x509", "-new", "-key", paths["ca_key"], "-subj", "/CN=Fulcrum benchmark CA", "-days", "30",
       "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
       "-out", paths["ca"], **quiet)
    csr = os.path.join(d, "site.csr")
    sh("openssl", "req", "-new", "-key", paths["key"], "-subj", "/CN=localhost", "-out", csr, **quiet)
    ext = os.path.join(d, "site.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    sh("openssl", "x509", "-req", "-in", csr, "-CA", paths["ca"], "-CAkey", paths["ca_key"], "-set_serial", "2",
       "-days", "30", "-extfile", ext, "-out", paths["cert"], **quiet)
    with open(paths["cert"], "a") as f:
        f.write(open(paths["ca"]).read())
    with open(paths["combined"], "w") as f:
        f.write(open(paths["cert"]).read() + open(paths["key"]).read())
    for path in paths.values():
        os.chmod(path, 0o644)  # nginx reads them as root, but keep the worker able to
    return paths


def proxy_configs(work, fulcrum, max_conns=8192, tls="resume"):
    """Command lines for the three proxies, each with one worker, in front of the backend.

    max_conns bounds the client connections each proxy accepts (nginx counts upstream
    connections too, so it gets twice that); the file descriptor limits follow from it.
    nginx and HAProxy serve h2c (prior knowledge) on PROXY_H2C_PORT, Fulcrum on PROXY_PORT.
    nginx 1.22 (Debian 12) has no `http2 on;` yet: `listen … http2` makes that listener
    HTTP/2-only, hence the second listener.

    Each also serves HTTPS on PROXY_TLS_PORT (ALPN h2 and http/1.1, TLS 1.2 and 1.3, the
    certificate of `certificate`), with session resumption according to `tls`:
      "resume": Fulcrum's defaults (session tickets, a cache of 10,000 sessions); nginx
                `ssl_session_tickets on` with a shared cache of ~12,000 sessions (3 MiB,
                ~4,000 per MiB); HAProxy's tickets (its default) with `tune.ssl.cachesize
                10000`. All three send TLS 1.3 tickets after a full handshake.
      "full":   none on any proxy: Fulcrum `session_tickets = false`, `session_cache = 0`;
                nginx `ssl_session_tickets off`, `ssl_session_cache off`; HAProxy
                `no-tls-tickets`, `tune.ssl.cachesize 0`.
    """
    assert tls in TLS_VARIANTS
    resume = tls == "resume"
    cert = certificate(work)
    nginx_conf = os.path.join(work, f"nginx-proxy-{tls}.conf")
    nginx_resumption = (f"ssl_session_cache shared:TLS:3m; ssl_session_tickets on;" if resume
                        else "ssl_session_cache off; ssl_session_tickets off;")
    with open(nginx_conf, "w") as f:
        f.write(f"""
worker_processes 1; daemon off; pid {work}/nginx-proxy.pid; error_log {work}/nginx-proxy.err;
worker_rlimit_nofile {2 * max_conns + 100};
events {{ worker_connections {2 * max_conns}; }}
http {{ access_log off; keepalive_requests 1000000;
  upstream backend {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 256; }}
  server {{ listen 127.0.0.1:{PROXY_PORT} backlog=4096 deferred;
    listen 127.0.0.1:{PROXY_H2C_PORT} http2 backlog=4096 deferred;
    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
  server {{ listen 127.0.0.1:{PROXY_TLS_PORT} ssl http2 backlog=4096 deferred;
    ssl_certificate {cert["cert"]}; ssl_certificate_key {cert["key"]}; ssl_protocols TLSv1.2 TLSv1.3;
    {nginx_resumption}
    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}
""")
    haproxy_conf = os.path.join(work, f"haproxy-{tls}.cfg")
    with open(haproxy_conf, "w") as f:
        f.write(f"""
global
  nbthread 1
  maxconn {max_conns}
  tune.ssl.cachesize {SESSION_CACHE if resume else 0}
defaults
  mode http
  maxconn {max_conns}
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:{PROXY_PORT} defer-accept
  bind 127.0.0.1:{PROXY_H2C_PORT} defer-accept proto h2
  bind 127.0.0.1:{PROXY_TLS_PORT} defer-accept ssl crt {cert["combined"]} alpn h2,http/1.1 ssl-min-ver TLSv1.2{"" if resume else " no-tls-tickets"}
  default_backend be
backend be
  server s1 127.0.0.1:{BACKEND_PORT}
""")
    fulcrum_conf = os.path.join(work, f"fulcrum-{tls}.toml")
    fulcrum_resumption = "" if resume else "session_tickets = false\nsession_cache = 0\n"
    with open(fulcrum_conf, "w") as f:
        f.write(f"""
workers = 1
[listeners.bench]
max_connections = {max_conns}
bind = "127.0.0.1:{PROXY_PORT}"
[[listeners.bench.routes]]
upstream = "backend"
[listeners.tls]
max_connections = {max_conns}
bind = "127.0.0.1:{PROXY_TLS_PORT}"
[[listeners.tls.routes]]
upstream = "backend"
[listeners.tls.tls]
certificates = [{{ cert = "{cert["cert"]}", key = "{cert["key"]}" }}]
min_version = "1.2"
{fulcrum_resumption}
[upstreams.backend]
pool_max_idle_per_server = 256
servers = [{{ address = "127.0.0.1:{BACKEND_PORT}" }}]
[access_log]
enabled = false
""")
    return {
        "fulcrum": [fulcrum, "run", "-c", fulcrum_conf],
        "nginx": [nginx_bin(), "-c", nginx_conf, "-p", work],
        "haproxy": [haproxy_bin(), "-f", haproxy_conf, "-db"],
    }


def tcp_proxy_configs(work, fulcrum, max_conns=8192, haproxy_splice=False):
    """Command lines for the three proxies relaying TCP on PROXY_TCP_PORT to the backend,
    one worker each, without parsing HTTP: each client connection gets its own upstream
    connection, made when the client connects, and lives as long as the client's.

    Fulcrum a `mode = "tcp"` listener (its default balancer; one server);
    nginx a `stream` server with `proxy_pass` to an upstream (the dynamic stream module
    loaded; `worker_connections` twice max_conns, as it counts upstream connections);
    HAProxy `mode tcp` frontend and backend with maxconn as in HTTP mode.
    None defers accept (Fulcrum's default for TCP, as server-speaks-first protocols need it
    off), and every other setting is at its default: buffers (nginx's `proxy_buffer_size`
    16k, HAProxy's `tune.bufsize` 16k), no splicing in HAProxy (`option splice-*` off).
    Timeouts are long enough for no tunnel to be closed during a run. `haproxy_splice`
    gives HAProxy `option splice-request` and `option splice-response` (splice(2) both ways,
    as Fulcrum does on large reads by default; `splice-auto`, tried, made HAProxy 2.6 splice
    nothing here, by strace), and `maxpipes` max_conns/8 rather than its default
    max_conns/4, whose descriptors would not fit this machine's hard limit of 20,000 (a
    benchmark tunnel uses a pipe only while it moves bulk: at most 64 here).
    """
    nginx_conf = os.path.join(work, "nginx-stream.conf")
    with open(nginx_conf, "w") as f:
        f.write(f"""
load_module {NGINX_STREAM_MODULE};
worker_processes 1; daemon off; pid {work}/nginx-stream.pid; error_log {work}/nginx-stream.err;
worker_rlimit_nofile {2 * max_conns + 100};
events {{ worker_connections {2 * max_conns}; }}
stream {{
  upstream backend {{ server 127.0.0.1:{BACKEND_PORT}; }}
  server {{ listen 127.0.0.1:{PROXY_TCP_PORT} backlog=4096; proxy_pass backend; proxy_timeout 10m; }} }}
""")
    haproxy_conf = os.path.join(work, "haproxy-tcp.cfg")
    haproxy_splicing = "  option splice-request\n  option splice-response" if haproxy_splice else ""
    with open(haproxy_conf, "w") as f:
        f.write(f"""
global
  nbthread 1
  maxconn {max_conns}
{f"  maxpipes {max_conns // 8}" if haproxy_splice else ""}
defaults
  mode tcp
  maxconn {max_conns}
  timeout connect 5s
  timeout client 10m
  timeout server 10m
{haproxy_splicing}
frontend fe_tcp
  bind 127.0.0.1:{PROXY_TCP_PORT}
  default_backend be_tcp
backend be_tcp
  server s1 127.0.0.1:{BACKEND_PORT}
""")
    fulcrum_conf = os.path.join(work, "fulcrum-tcp.toml")
    with open(fulcrum_conf, "w") as f:
        f.write(f"""
workers = 1
[listeners.tcp]
bind = "127.0.0.1:{PROXY_TCP_PORT}"
mode = "tcp"
upstream = "backend"
max_connections = {max_conns}
[upstreams.backend]
servers = [{{ address = "127.0.0.1:{BACKEND_PORT}" }}]
[access_log]
enabled = false
""")
    return {
        "fulcrum": [fulcrum, "run", "-c", fulcrum_conf],
        "nginx": [nginx_bin(), "-c", nginx_conf, "-p", work],
        "haproxy": [haproxy_bin(), "-f", haproxy_conf, "-db"],
    }


def pids_of(proc):
    """The process and its children (nginx's worker), whose CPU we count."""
    pids = [proc.pid]
    try:
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    except OSError:
        pass
    return pids


def cpu_time(pids):
    """The processes' CPU time: nanoseconds on a CPU per thread, from each thread's
    schedstat; and user and kernel clock ticks for the processes (/proc/PID/stat, which
    counts the same time in 10 ms units, split between user and kernel)."""
    on_cpu = {}
    user = kernel = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            kernel += int(fields[12])
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    on_cpu[tid] = int(f.read().split()[0])
            except OSError:
                pass
    return on_cpu, user, kernel


def cpu_seconds(before, after):
    """CPU seconds between two `cpu_time` readings. From schedstat, at a nanosecond's
    resolution where ticks have 10 ms (at 2,000 req/s a proxy uses some 25 of them in a
    4 s run): the threads alive at the end, each from its first reading (a thread that
    ended meanwhile is not counted; the proxies here keep theirs). Ticks when schedstat
    gave nothing."""
    (ns_before, user_before, kernel_before), (ns_after, user_after, kernel_after) = before, after
    ns = sum(n - ns_before.get(tid, 0) for tid, n in ns_after.items())
    user, kernel = user_after - user_before, kernel_after - kernel_before
    seconds = ns / 1e9 if ns > 0 else (user + kernel) / os.sysconf("SC_CLK_TCK")
    return seconds, user, kernel


def peak_rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                m = re.search(r"VmHWM:\s+(\d+)", f.read())
                total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total


def parse_latency(text, label):
    m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(port, path, conns, extra, duration, tls=False):
    """wrk, HTTP/1.1; over TLS it offers no ALPN, and with `Connection: close` it resumes
    the session of its previous connection whenever the server lets it (OpenSSL's
    SSL_clear keeps the session)."""
    scheme = "https" if tls else "http"
    args = ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", *extra, f"{scheme}://127.0.0.1:{port}{path}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60).stdout
    summary = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h), ([\d.]+)([KMGT]?)B read", out)
    if not summary:
        raise RuntimeError(f"wrk gave no summary:\n{out}")
    requests = int(summary.group(1))
    seconds = float(summary.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[summary.group(3)]
    # wrk's units are binary (KB is 1024 bytes), printed to two decimals.
    read_bytes = float(summary.group(4)) * 1024 ** " KMGT".index(summary.group(5) or " ")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests": requests,
        "bytes": read_bytes,
        "mib_s": read_bytes / 2**20 / seconds if seconds > 0 else float("nan"),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": parse_latency(out, "50"),
        "p99": parse_latency(out, "99"),
        "errors": (int(errors.group(1)) if errors else 0),
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def run_h2load(port, path, conns, extra, duration, tls=False):
    """h2load: prior-knowledge HTTP/2 over cleartext, or over TLS with ALPN h2 (checked);
    latency percentiles from its per-request log."""
    scheme = "https" if tls else "http"
    with tempfile.NamedTemporaryFile(prefix="fulcrum-h2load-", suffix=".log") as log:
        args = ["taskset", "-c", "1", "h2load", "-t1", f"-c{conns}", *extra, f"-D{duration}", f"--log-file={log.name}", f"{scheme}://127.0.0.1:{port}{path}"]
        out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60).stdout
        times = sorted(int(line.split("\t")[2]) / 1000 for line in open(log.name) if line.count("\t") >= 2)
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    if not m:
        raise RuntimeError(f"h2load gave no summary:\n{out}")
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    pct = lambda q: times[min(len(times) - 1, math.ceil(q * len(times)) - 1)] if times else float("nan")
    if tls:
        protocol = re.search(r"Application protocol: (\S+)", out)
        if not protocol or protocol.group(1) != "h2":
            raise RuntimeError(f"h2load over TLS did not negotiate h2:\n{out}")
    cipher = re.search(r"^Cipher: (\S+)", out, re.M)
    return {
        "requests": int(m.group(3)),
        "bytes": float("nan"),
        "mib_s": float("nan"),
        "rps": float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1)),
        "p50": pct(0.50),
        "p99": pct(0.99),
        "errors": int(codes.group(3)) + int(codes.group(4)),  # 4xx and 5xx, as wrk's non-2xx or 3xx
        "socket_errors": (f"failed {m.group(5)}, errored {m.group(6)}, timeout {m.group(7)}" if int(m.group(5)) + int(m.group(6)) + int(m.group(7)) else "")
                         + (f" ({cipher.group(1)})" if tls and cipher else ""),
    }


def run_client(scenario, port, duration):
    client = run_h2load if scenario.client == "h2load" else run_wrk
    return client(port, scenario.path, scenario.conns, scenario.extra, duration, tls=scenario.tls is not None)


def port_for(name, scenario):
    """Where the scenario's client connects: nginx and HAProxy take h2c on their own port,
    all three TLS on PROXY_TLS_PORT (TLS scenarios have no direct run), TCP relays on
    PROXY_TCP_PORT (but nginx's HTTP proxy, their reference, on PROXY_PORT)."""
    if scenario.tcp:
        return {"direct": BACKEND_PORT, "nginx-http": PROXY_PORT}.get(name, PROXY_TCP_PORT)
    if scenario.tls:
        assert name != "direct"
        return PROXY_TLS_PORT
    if scenario.client == "h2load" and "--h1" not in scenario.extra:
        return {"direct": BACKEND_H2C_PORT, "fulcrum": PROXY_PORT}.get(name, PROXY_H2C_PORT)
    return BACKEND_PORT if name == "direct" else PROXY_PORT


def start_proxy(cmd, cpu="0", port=None):
    """Starts a proxy pinned to one CPU and waits until it listens on `port` (PROXY_PORT
    unless given)."""
    proc = subprocess.Popen(["taskset", "-c", cpu, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port or PROXY_PORT)
    except BaseException:
        stop_proxy(proc)
        raise
    time.sleep(0.3)
    return proc


def stop_proxy(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    time.sleep(0.3)


def s_client(cert, args, stdin=b""):
    """One `openssl s_client` connection to PROXY_TLS_PORT, checking the certificate against
    the benchmark's CA; returns its output."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{PROXY_TLS_PORT}", "-servername", "localhost",
           "-CAfile", cert["ca"], *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=15).stdout.decode(errors="replace")


def check_tls(cert, work):
    """What the proxy now running negotiates on PROXY_TLS_PORT, from `openssl s_client`
    (OpenSSL 3.0, as wrk and h2load use): for TLS 1.3 and for TLS 1.2, a first connection
    and two reconnects offering its session (`-sess_out`/`-sess_in`: `-reconnect` reuses
    a session before TLS 1.3 tickets arrive, so never resumes), each sending one request
    and reading the response and tickets; and one connection offering ALPN h2, http/1.1."""
    sess = os.path.join(work, "tls", "session.pem")
    request = b"GET /1k HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    out = {}
    for version in ("1.3", "1.2"):
        runs = []
        for i in range(3):
            args = ["-alpn", "http/1.1", "-ign_eof", "-tls" + version.replace(".", "_"), "-sess_out", sess]
            runs.append(s_client(cert, args + (["-sess_in", sess] if i else []), request))
        first = runs[0]
        handshake = re.search(r"^(?:New|Reused), (\S+), Cipher is (\S+)", first, re.M)
        group = re.search(r"^Server Temp Key: (\S+?),", first, re.M)
        out[version] = {
            "protocol": handshake.group(1) if handshake else "?",
            "cipher": handshake.group(2) if handshake else "?",
            "group": group.group(1) if group else "?",
            "verified": all("Verify return code: 0 (ok)" in r for r in runs),
            "ok": all(re.search(r"^HTTP/1.1 200", r, re.M) for r in runs),
            "resumed": sum(bool(re.search(r"^Reused,", r, re.M)) for r in runs[1:]),
            "tickets": [r.count("Post-Handshake New Session Ticket arrived") for r in runs[:2]],
        }
    alpn = re.search(r"^ALPN protocol: (\S+)", s_client(cert, ["-alpn", "h2,http/1.1"]), re.M)
    out["alpn"] = alpn.group(1) if alpn else "none"
    return out


def describe_tls(check):
    """One line of the TLS check, for the table."""
    v3, v2 = check["1.3"], check["1.2"]
    return (f"{v3['protocol']} {v3['cipher']} {v3['group']}, ALPN {check['alpn']}"
            f"{'' if v3['verified'] and v2['verified'] else ', CERTIFICATE NOT VERIFIED'}"
            f"{'' if v3['ok'] and v2['ok'] else ', NOT 200'} | {v3['resumed']}/2 | {v2['resumed']}/2 | "
            f"{v3['tickets'][0]} / {v3['tickets'][1]}")


def established_to(port):
    """Established TCP connections (IPv4) whose remote end is 127.0.0.1:`port`: seen from
    the proxy, its upstream connections to the backend."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        return sum(1 for line in f if line.split()[2] == want and line.split()[3] == "01")


def check_tcp_relay(conns=4, timeout=5.0):
    """That the proxy now running on PROXY_TCP_PORT relays TCP rather than HTTP: `conns`
    client connections that send nothing must each open an upstream connection to the
    backend (an HTTP proxy connects only for a request), and then each one request sent
    through them must come back as the backend's 200 with the whole 1 KiB body.
    Returns a line describing what was seen; raises if either fails."""
    import socket
    before = established_to(BACKEND_PORT)
    clients = [socket.create_connection(("127.0.0.1", PROXY_TCP_PORT), timeout=timeout) for _ in range(conns)]
    try:
        deadline = time.time() + timeout
        while established_to(BACKEND_PORT) - before < conns and time.time() < deadline:
            time.sleep(0.05)
        opened = established_to(BACKEND_PORT) - before
        if opened < conns:
            raise RuntimeError(f"{conns} idle client connections opened {opened} upstream connections: not a TCP relay")
        for c in clients:
            c.sendall(b"GET /1k HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            response = b""
            while len(response) < 64 * 1024:  # bounded: the whole response is ~1.3 KiB
                chunk = c.recv(65536)
                if not chunk:
                    break
                response += chunk
            head, _, body = response.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200") or body != b"x" * 1024:
                raise RuntimeError(f"through the TCP relay: {head[:200]!r}, {len(body)} bytes of body")
    finally:
        for c in clients:
            c.close()
    return f"{conns} idle clients opened {opened} upstream connections; each relayed a 200 and 1 KiB"


# System calls counted with `--syscalls`, by kind: kernel tracepoints through `perf stat`,
# which cost the proxy far less than strace (no stop per call), so the counts are of the
# proxy as it runs without them.
SYSCALL_KINDS = {
    "read": ("read", "readv", "recvfrom", "recvmsg"),
    "write": ("write", "writev", "sendto", "sendmsg", "sendfile64", "splice"),
    "wait": ("epoll_wait", "epoll_pwait", "epoll_pwait2", "io_uring_enter"),
    "epoll_ctl": ("epoll_ctl",),
    "sleep": ("nanosleep", "clock_nanosleep"),
}


def start_syscall_count(pids):
    """`perf stat` over every thread of `pids`: all system calls, those by kind, those that
    returned EAGAIN, and context switches. Stopped (and read) by `stop_syscall_count`."""
    out = tempfile.NamedTemporaryFile(prefix="fulcrum-perf-", suffix=".csv", delete=False)
    events = ["-e", "raw_syscalls:sys_enter", "-e", "raw_syscalls:sys_exit", "--filter", "ret == -11", "-e", "context-switches"]
    for names in SYSCALL_KINDS.values():
        for n in names:
            events += ["-e", f"syscalls:sys_enter_{n}"]
    proc = subprocess.Popen(["perf", "stat", "-x,", "-o", out.name, *events, "-p", ",".join(map(str, pids))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.2)  # perf attaches before the counted run starts
    return proc, out.name


def stop_syscall_count(counting):
    proc, path = counting
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)
    counts = {}
    with open(path) as f:
        for line in f:
            fields = line.strip().split(",")
            if len(fields) > 2 and fields[0].isdigit():
                counts[fields[2]] = int(fields[0])
    os.unlink(path)
    by_kind = {kind: sum(counts.get(f"syscalls:sys_enter_{n}", 0) for n in names) for kind, names in SYSCALL_KINDS.items()}
    total = counts.get("raw_syscalls:sys_enter", 0)
    by_kind["other"] = total - sum(by_kind.values())
    return {"total": total, "eagain": counts.get("raw_syscalls:sys_exit", 0), "switches": counts.get("context-switches", 0), **by_kind}


def variant_command(fulcrum_cmd, env):
    """Fulcrum's command line with `env` set; `BIN=path` in it runs another build instead."""
    binary = [e.partition("=")[2] for e in env if e.startswith("BIN=")]
    cmd = [*binary[-1:], *fulcrum_cmd[1:]] if binary else fulcrum_cmd
    return ["env", *[e for e in env if not e.startswith("BIN=")], *cmd]


def measure(name, cmd, scenario, duration, syscalls=False):
    port = port_for(name, scenario)
    proc = start_proxy(cmd, port=port)
    try:
        # Warm up pools and caches, uncounted.
        run_client(scenario, port, 1)
        pids = pids_of(proc)
        counting = start_syscall_count(pids) if syscalls else None
        before = cpu_time(pids)
        result = run_client(scenario, port, duration)
        cpu, user, kernel = cpu_seconds(before, cpu_time(pids))
        result["user_share"] = user / (user + kernel) if user + kernel > 0 else float("nan")
        if counting:
            result["syscalls"] = stop_syscall_count(counting)
        result["cpu_s"] = cpu
        result["per_cpu_s"] = result["requests"] / cpu if cpu > 0 else float("nan")
        result["mib_per_cpu_s"] = result["bytes"] / 2**20 / cpu if cpu > 0 else float("nan")
        result["rss_mib"] = peak_rss_kib(pids) / 1024
        return result
    finally:
        stop_proxy(proc)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--scenarios", default=",".join(s.key for s in SCENARIOS),
                        help="comma-separated scenario keys to run, of: " + ", ".join(f"{s.key} ({s.title})" for s in SCENARIOS))
    parser.add_argument("--port-base", type=int, default=18000, help="listen on 127.0.0.1 ports BASE+1, +2, +43, +70, +80, +82")
    parser.add_argument("--proxies", default="fulcrum,nginx,haproxy",
                        help="comma-separated proxies to run, of: fulcrum, nginx, haproxy (TCP scenarios add nginx's HTTP proxy "
                             "as nginx-http whenever nginx runs); ratios need fulcrum and the other")
    parser.add_argument("--haproxy-splice", action="store_true",
                        help="TCP scenarios: HAProxy splicing both ways (`option splice-request`, `splice-response`; off by default, as HAProxy has it)")
    parser.add_argument("--syscalls", action="store_true",
                        help="count the proxy's system calls (by kind, and those returning EAGAIN) and context switches per request "
                             "with `perf stat` on kernel tracepoints (installs linux-perf if missing)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE[;…]",
                        help="also run Fulcrum as NAME with these environment variables (HTTP scenarios), "
                             "interleaved with the others: an A/B comparison within one run; `BIN=path` runs another "
                             "build (say, the commit before a change); separate variables with `;`; may be repeated")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    unknown = [k for k in keys if k not in {s.key for s in SCENARIOS}]
    if unknown or not keys:
        parser.error(f"unknown scenario {', '.join(unknown) or '(none given)'}; known: {', '.join(s.key for s in SCENARIOS)}")
    scenarios = [s for s in SCENARIOS if s.key in keys]
    chosen = [p.strip() for p in args.proxies.split(",") if p.strip()]
    if not chosen or any(p not in ("fulcrum", "nginx", "haproxy") for p in chosen):
        parser.error(f"--proxies takes fulcrum, nginx, haproxy, not {args.proxies!r}")
    set_ports(args.port_base)
    variants = {}  # name -> ["VAR=VALUE", ...]
    for spec in args.variant:
        name, _, env = spec.partition(":")
        if not name or not env or name in ("direct", "fulcrum", "nginx", "haproxy", "nginx-http"):
            parser.error(f"--variant takes NAME:VAR=VALUE[;VAR=VALUE…] with a new name, not {spec!r}")
        variants[name] = env.split(";")

    install(perf=args.syscalls)
    fulcrum = build_fulcrum() if "fulcrum" in chosen else "fulcrum"  # not run, not built
    work = tempfile.mkdtemp(prefix="fulcrum-bench-")
    os.chmod(work, 0o755)  # nginx workers drop to an unprivileged user and must read www/
    backend = start_backend(work)
    # One set of configs per way of serving TLS; scenarios without TLS use the first.
    configs = {tls: proxy_configs(work, fulcrum, tls=tls) for tls in TLS_VARIANTS}
    # TCP scenarios: the three relaying TCP, and nginx's HTTP proxy of the HTTP scenarios.
    configs["tcp"] = {**tcp_proxy_configs(work, fulcrum, haproxy_splice=args.haproxy_splice), "nginx-http": configs["resume"]["nginx"]}
    for variant in configs.values():
        if "fulcrum" in variant:
            variant.update({name: variant_command(variant["fulcrum"], env) for name, env in variants.items()})
    proxies_of = lambda scenario: [p for p in (L4_PROXIES if scenario.tcp else ("fulcrum", *variants, "nginx", "haproxy"))
                                   if p in chosen or p in variants or (p == "nginx-http" and "nginx" in chosen)]
    config_of = lambda scenario: "tcp" if scenario.tcp else scenario.tls or "resume"
    results = {}  # (scenario, proxy) -> [result]
    checks = {}  # (TLS variant, proxy) -> check_tls()
    tcp_checks = {}  # proxy -> check_tcp_relay()
    try:
        if "fulcrum" in chosen:
            for conf in sorted({cmd[-1] for variant in configs.values() for name, cmd in variant.items() if name == "fulcrum"}):
                sh(fulcrum, "check", "-c", conf, stdout=subprocess.DEVNULL)
        if any(s.tcp for s in scenarios):
            for name in [p for p in ("fulcrum", "nginx", "haproxy") if p in chosen]:
                proc = start_proxy(configs["tcp"][name], port=PROXY_TCP_PORT)
                try:
                    tcp_checks[name] = check_tcp_relay()
                except (OSError, RuntimeError) as e:
                    raise RuntimeError(f"{name} in TCP mode: {e}") from e
                finally:
                    stop_proxy(proc)
                print(f"TCP check {name:8} {tcp_checks[name]}", file=sys.stderr)
        for tls in [v for v in TLS_VARIANTS if any(s.tls == v for s in scenarios)]:
            for name, cmd in [(n, c) for n, c in configs[tls].items() if n in chosen]:
                proc = start_proxy(cmd)
                try:
                    wait_port(PROXY_TLS_PORT)
                    check = checks[(tls, name)] = check_tls(certificate(work), work)
                finally:
                    stop_proxy(proc)
                print(f"TLS check {name:8} {tls:7} {describe_tls(check)}", file=sys.stderr)
                want = 2 if tls == "resume" else 0
                if check["1.3"]["resumed"] != want or check["1.2"]["resumed"] != want or check["alpn"] != "h2":
                    raise RuntimeError(f"{name} ({tls}): resumed {check['1.3']['resumed']} (TLS 1.3) and {check['1.2']['resumed']} (TLS 1.2) "
                                       f"of 2 reconnects, ALPN {check['alpn']}: expected {want} and h2")
        for rnd in range(args.rounds):
            for scenario in scenarios:
                if scenario.tls is None:
                    # Direct run: the backend alone, the limit any proxy could reach.
                    direct = run_client(scenario, port_for("direct", scenario), args.duration)
                    results.setdefault((scenario.title, "direct"), []).append(direct)
                proxies = proxies_of(scenario)
                order = proxies if rnd % 2 == 0 else list(reversed(proxies))
                for name in order:
                    cmd = configs[config_of(scenario)][name]
                    r = measure(name, cmd, scenario, args.duration, syscalls=args.syscalls)
                    results.setdefault((scenario.title, name), []).append(r)
                    bulk = f" {r['mib_per_cpu_s']:8.0f} MiB/CPU-s" if scenario.path in BULK_PATHS else ""
                    print(f"round {rnd + 1} {scenario.title:32} {name:10} {r['rps']:10.0f} req/s {r['per_cpu_s']:10.0f} req/CPU-s{bulk}  "
                          f"user {r['user_share']:4.0%}  errors {r['errors']} {r['socket_errors']}", file=sys.stderr)
    finally:
        backend.send_signal(signal.SIGTERM)
        backend.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    med = lambda rs, key: statistics.median(r[key] for r in rs)
    per_cpu = lambda scenario, name: med(results[(scenario.title, name)], "per_cpu_s")
    ran = lambda scenario, *names: all((scenario.title, n) in results for n in names)
    # In TCP scenarios the table says how each proxy relays.
    tcp_labels = {"fulcrum": "fulcrum tcp", "nginx": "nginx stream", "nginx-http": "nginx http",
                  "haproxy": "haproxy tcp splice" if args.haproxy_splice else "haproxy tcp"}
    label = lambda scenario, name: tcp_labels[name] if scenario.tcp and name != "direct" else name
    lines = [
        f"Medians of {args.rounds} interleaved rounds of {args.duration}s each; proxy pinned to CPU 0, wrk (h2load for h2c and h2 over TLS) and the nginx backend to CPU 1.",
        "",
        "| scenario | proxy | req/s | p50 ms | p99 ms | req per CPU-s | peak RSS MiB | non-2xx |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    ratios, tcp_ratios, bulk, against_best = [], [], [], []
    for scenario in scenarios:
        title = scenario.title
        for name in ["direct", "fulcrum", *variants, "nginx", "haproxy", "nginx-http"]:
            if (title, name) not in results:
                continue  # TLS scenarios have no direct run, a proxy may be left out
            rs = results[(title, name)]
            per_cpu_s = f"{med(rs, 'per_cpu_s'):.0f}" if name != "direct" else "-"
            rss = f"{med(rs, 'rss_mib'):.1f}" if name != "direct" else "-"
            lines.append(f"| {title} | {label(scenario, name)} | {med(rs, 'rps'):.0f} | {med(rs, 'p50'):.2f} | {med(rs, 'p99'):.2f} | {per_cpu_s} | {rss} | {sum(r['errors'] for r in rs)} |")
            if scenario.path in BULK_PATHS:
                mib_cpu = f"{med(rs, 'mib_per_cpu_s'):.0f}" if name != "direct" else "-"
                bulk.append(f"| {title} | {label(scenario, name)} | {med(rs, 'mib_s'):.0f} | {mib_cpu} |")
        ratio = lambda a, b: f"{per_cpu(scenario, a) / per_cpu(scenario, b):.2f}" if ran(scenario, a, b) else "-"
        if scenario.tcp:
            tcp_ratios.append(f"| {title} | {ratio('fulcrum', 'nginx')} | {ratio('fulcrum', 'haproxy')} | {ratio('fulcrum', 'nginx-http')} "
                              f"| {ratio('haproxy', 'nginx-http')} | {ratio('nginx', 'nginx-http')} |")
        else:
            ratios.append(f"| {title} | {ratio('fulcrum', 'nginx')} | {ratio('fulcrum', 'haproxy')} |")
            others = [n for n in ("nginx", "haproxy") if ran(scenario, n)]
            if others:
                # Paired by round: this machine drifts by more than the differences sought,
                # and proxies measured within a minute of each other drift together.
                rounds = len(results[(title, others[0])])
                best = [max(results[(title, n)][i]["per_cpu_s"] for n in others) for i in range(rounds)]
                paired = lambda n: statistics.median(results[(title, n)][i]["per_cpu_s"] / best[i] for i in range(rounds))
                against_best.append(f"| {title} | " + " | ".join(f"{paired(n):.2f}" if ran(scenario, n) else "-"
                                                              for n in ("fulcrum", *variants)) + " |")
    if ratios:
        lines += ["", "Requests per CPU-second, Fulcrum relative to:", "", "| scenario | Fulcrum/nginx | Fulcrum/HAProxy |", "|---|---:|---:|", *ratios]
    if against_best and variants:
        lines += ["", "Requests per CPU-second relative to the better of nginx and HAProxy in the same round (median over rounds):", "",
                  "| scenario | " + " | ".join(("fulcrum", *variants)) + " |", "|---|" + "---:|" * (1 + len(variants)), *against_best]
    if tcp_ratios:
        lines += ["", "TCP relays, requests per CPU-second relative to one another and to nginx's HTTP proxy in the same scenario:", "",
                  "| scenario | Fulcrum/nginx stream | Fulcrum/HAProxy tcp | Fulcrum/nginx http | HAProxy tcp/nginx http | nginx stream/nginx http |",
                  "|---|---:|---:|---:|---:|---:|", *tcp_ratios]
    if bulk:
        lines += ["", "Bytes (what wrk read: bodies and heads), per second and per CPU-second of the proxy:", "",
                  "| scenario | proxy | MiB/s | MiB per CPU-s |", "|---|---|---:|---:|", *bulk]
    if args.syscalls:
        kinds = ["total", *SYSCALL_KINDS, "other", "eagain", "switches"]
        lines += ["", "System calls per request (medians; `eagain`: calls that returned EAGAIN, of any kind; `switches`: context switches):", "",
                  "| scenario | proxy | " + " | ".join(kinds) + " |", "|---|---|" + "---:|" * len(kinds)]
        for scenario in scenarios:
            for name in ["fulcrum", *variants, "nginx", "haproxy", "nginx-http"]:
                rs = [r for r in results.get((scenario.title, name), []) if "syscalls" in r]
                if rs:
                    per = lambda k: statistics.median(r["syscalls"][k] / max(r["requests"], 1) for r in rs)
                    lines.append(f"| {scenario.title} | {label(scenario, name)} | " + " | ".join(f"{per(k):.2f}" for k in kinds) + " |")
    if tcp_checks:
        lines += ["", "TCP relays checked before the rounds:", "", "| proxy | check |", "|---|---|"]
        lines += [f"| {name} | {check} |" for name, check in tcp_checks.items()]
    if checks:
        lines += ["", "TLS as negotiated with `openssl s_client` before the rounds (reconnects offering the session "
                  "of the one before; tickets: NewSessionTicket messages after a first and after a second connection, TLS 1.3):", "",
                  "| proxy | sessions | TLS 1.3, cipher, group, ALPN | resumed, TLS 1.3 | resumed, TLS 1.2 | tickets, full / resumed |",
                  "|---|---|---|---:|---:|---:|"]
        lines += [f"| {name} | {tls} | {describe_tls(check)} |" for (tls, name), check in checks.items()]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
