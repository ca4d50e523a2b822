#!/usr/bin/env python3
"""Memory per client connection: Fulcrum beside nginx and HAProxy.

Each proxy is set up as bench/run.py sets it up (one worker, pinned to CPU 0, access log
off, in front of the same nginx backend serving a 1 KiB file) and measured in three states:

  idle     each connection sent one `GET /1k`, read the whole response, and stays open,
           kept alive and idle;
  trickle  each connection sent only the start of a request head
           (`GET /1k HTTP/1.1\\r\\nHost: x\\r\\n`) and nothing more. With deferred accept
           (all three proxies) those first bytes are what gets the connection accepted.
  tls-idle as idle, over TLS to the proxy's HTTPS listener (run.py's, with session
           resumption as Fulcrum's defaults have it): a full TLS 1.3 handshake (Python's
           ssl, OpenSSL 3.0, X25519, ALPN http/1.1, the certificate checked), one request,
           its response and the session tickets read, then idle. Warm-up and "a little
           traffic" are over TLS too.

For every proxy and state a fresh proxy process is started and warmed up: --concurrency
connections make one request each at once (so the proxy's upstream pool is as full
before as after) and are closed; --settle seconds later comes "a little traffic" (ten
times --concurrency one-request connections, as below). Then its resident memory is read
(VmRSS in /proc/PID/status, summed over the process and its children: nginx's master and
worker). Then --connections client connections are put in the state, at most
--concurrency at a time; once all are in it the script checks that the proxy accepted
them all (from /proc/net/tcp), waits --settle seconds again (Fulcrum gives an idle
connection's buffers back after 1 s) and reads RSS again:

    KiB per connection = (RSS after - RSS before) / connections

Then, with those connections still open, a little traffic on fresh connections, and RSS
once more ("after a little traffic"). Fulcrum's allocator (mimalloc) hands freed pages
back to the system in the course of later allocations, and a worker whose connections all
idle makes none: measured, Fulcrum's idle figure without that traffic is either its peak
(all connections opened within its 1 s buffer linger, so no allocation follows the frees)
or near the figure after traffic (opening took longer), by timing alone. The figure after
traffic is the one that repeats. Kernel socket buffers are not in RSS; this is the proxy's own memory. RSS does not
depend on CPU load, so unlike run.py this is meaningful on a busy machine. The connections
are closed at the end and RSS read once more ("kept after close").

Usage: python3 bench/memory.py [--connections 4000] [--rounds 3] [--settle 3]
           [--concurrency 32] [--proxies fulcrum,nginx,haproxy] [--states idle,trickle,tls-idle]
           [--port-base 18100] [--out FILE]
Raises its own open-file limit (RLIMIT_NOFILE) for the client sockets; the proxies
inherit it, and their connection limits are set from --connections. All traffic is to
127.0.0.1; every phase has a time limit.
"""

import argparse
import asyncio
import os
import re
import resource
import shutil
import ssl
import statistics
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing run.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (bench/run.py: installs, configs, proxy start and stop)

STATES = {
    "idle": "idle kept-alive after one request",
    "trickle": "trickling header (partial request head)",
    "tls-idle": "idle kept-alive over TLS after one request",
}
REQUEST = b"GET /1k HTTP/1.1\r\nHost: x\r\n\r\n"
PARTIAL_HEAD = b"GET /1k HTTP/1.1\r\nHost: x\r\n"
PHASE_TIMEOUT = 60  # seconds for opening (or warming up) all connections
TLS_CONTEXT = None  # the client side of the tls-idle state, set up in main()


def port_of(state):
    """The proxy's port a state's connections go to: its HTTPS listener for TLS states."""
    return run.PROXY_TLS_PORT if state.startswith("tls") else run.PROXY_PORT


def one_request_state(state):
    """The state a warm-up (or a little traffic) uses for `state`: one request, over TLS or not."""
    return "tls-idle" if state.startswith("tls") else "idle"


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                m = re.search(r"VmRSS:\s+(\d+)", f.read())
            total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total


def server_side_sockets(port):
    """(established server-side sockets on port, connections waiting in its accept queue)."""
    established = queued = 0
    hex_port = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, state = fields[1], fields[3]
                    if not local.endswith(hex_port):
                        continue
                    if state == "01":
                        established += 1
                    elif state == "0A":  # LISTEN: rx_queue is the accept queue's length
                        queued += int(fields[4].split(":")[1], 16)
        except OSError:
            pass
    return established, queued


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected response: {head[:60]!r}")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if not length:
        raise RuntimeError("response without Content-Length")
    await reader.readexactly(int(length.group(1)))


async def open_connections(port, count, state, concurrency, conns):
    """Opens `count` connections into `state`, appending (reader, writer) to conns."""
    limit = asyncio.Semaphore(concurrency)

    async def one():
        async with limit:
            if state == "tls-idle":
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=TLS_CONTEXT, server_hostname="localhost")
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            conns.append((reader, writer))
            if state in ("idle", "tls-idle"):
                writer.write(REQUEST)
                await read_response(reader)
            else:
                writer.write(PARTIAL_HEAD)
                await writer.drain()

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), PHASE_TIMEOUT)


def close_all(conns):
    for _, writer in conns:
        writer.close()
    conns.clear()


async def wait_accepted(port, count, timeout=10):
    """Waits until the proxy has accepted `count` connections; returns how many it holds."""
    deadline = time.monotonic() + timeout
    while True:
        established, queued = server_side_sockets(port)
        accepted = established - queued
        if accepted >= count or time.monotonic() > deadline:
            return accepted
        await asyncio.sleep(0.1)


async def some_traffic(concurrency, state="idle"):
    """A little traffic on fresh connections: 10 times `concurrency` one-request connections.

    An allocator gives freed memory back to the system only when the thread that freed it
    allocates again; a worker whose connections all idle does not. Fulcrum frees an idle
    connection's buffers after 1 s, and whether RSS then shows it depends on whether other
    connections were still being opened then. After this, it does either way."""
    conns = []
    for _ in range(10):
        await open_connections(port_of(state), concurrency, one_request_state(state), concurrency, conns)
        close_all(conns)
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)


async def measure_state(pids, state, args):
    conns = []
    port = port_of(state)
    try:
        # Warm-up: as many connections at once as the run below has, one request each.
        await open_connections(port, args.concurrency, one_request_state(state), args.concurrency, conns)
        close_all(conns)
        await asyncio.sleep(args.settle)
        await some_traffic(args.concurrency, state)
        before = rss_kib(pids)
        baseline, _ = server_side_sockets(port)
        started = time.monotonic()
        await open_connections(port, args.connections, state, args.concurrency, conns)
        opened_in = time.monotonic() - started
        accepted = await wait_accepted(port, baseline + args.connections) - baseline
        await asyncio.sleep(args.settle)
        after = rss_kib(pids)
        still_open, _ = server_side_sockets(port)
        await some_traffic(args.concurrency, state)
        after_traffic = rss_kib(pids)
    finally:
        close_all(conns)
    await asyncio.sleep(args.settle)
    closed = rss_kib(pids)
    n = args.connections
    return {
        "before": before,
        "after": after,
        "after_traffic": after_traffic,
        "closed": closed,
        "per_conn": (after - before) / n,
        "traffic_per_conn": (after_traffic - before) / n,
        "kept_per_conn": (closed - before) / n,
        "accepted": accepted,
        "open_at_read": still_open - baseline,
        "opened_in": opened_in,
    }


def raise_fd_limit(needed):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(needed, hard), max(needed, hard)))
    except (ValueError, OSError):
        if hard < needed:
            sys.exit(f"need {needed} open files, hard limit is {hard}: run as root or raise it")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pick(parser, value, known, what):
    keys = [k.strip() for k in value.split(",") if k.strip()]
    unknown = [k for k in keys if k not in known]
    if unknown or not keys:
        parser.error(f"unknown {what} {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    return [k for k in known if k in keys]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3, help="median over this many fresh starts")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait before each RSS reading (< 30, Fulcrum's client_header timeout)")
    parser.add_argument("--concurrency", type=int, default=32, help="connections being opened at once")
    parser.add_argument("--proxies", default="fulcrum,nginx,haproxy")
    parser.add_argument("--states", default=",".join(STATES))
    parser.add_argument("--port-base", type=int, default=18100, help="listen on 127.0.0.1 ports BASE+1, +2, +43, +80, +82")
    parser.add_argument("--out", default=None, help="also write the markdown tables here")
    args = parser.parse_args()
    proxy_names = pick(parser, args.proxies, ["fulcrum", "nginx", "haproxy"], "proxy")
    states = pick(parser, args.states, list(STATES), "state")
    if not 0 < args.settle < 30:
        parser.error("--settle must be between 0 and 30 seconds")

    # Client sockets, plus what the proxies (which inherit the limit) need: a client and
    # an upstream socket each at worst.
    raise_fd_limit(2 * args.connections + 1000)
    run.set_ports(args.port_base)
    run.install()
    fulcrum = run.build_fulcrum()
    work = tempfile.mkdtemp(prefix="fulcrum-memory-")
    os.chmod(work, 0o755)  # nginx workers drop to an unprivileged user and must read www/
    backend = run.start_backend(work)
    proxies = run.proxy_configs(work, fulcrum, max_conns=args.connections + 1000)
    global TLS_CONTEXT
    TLS_CONTEXT = ssl.create_default_context(cafile=run.certificate(work)["ca"])
    TLS_CONTEXT.set_alpn_protocols(["http/1.1"])
    results = {}  # (state, proxy) -> [result]
    try:
        for rnd in range(args.rounds):
            for state in states:
                for name in proxy_names:
                    proc = run.start_proxy(proxies[name])
                    run.wait_port(port_of(state))
                    try:
                        r = asyncio.run(measure_state(run.pids_of(proc), state, args))
                    finally:
                        run.stop_proxy(proc)
                    results.setdefault((state, name), []).append(r)
                    warn = "" if r["accepted"] >= args.connections else f"  ONLY {r['accepted']} ACCEPTED"
                    print(f"round {rnd + 1} {state:8} {name:8} {r['before'] / 1024:6.1f} -> {r['after'] / 1024:6.1f} MiB "
                          f"{r['per_conn']:6.1f} KiB/conn, {r['traffic_per_conn']:6.1f} after traffic "
                          f"(opened in {r['opened_in']:.1f}s, {r['open_at_read']} open at reading){warn}", file=sys.stderr)
    finally:
        backend.terminate()
        backend.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    med = lambda rs, key: statistics.median(r[key] for r in rs)

    def spread(rs, key):
        """Median, with the range over rounds when they differ by 0.5 KiB or more."""
        lo, hi = min(r[key] for r in rs), max(r[key] for r in rs)
        return f"{med(rs, key):.1f}" + (f" ({lo:.1f}–{hi:.1f})" if hi - lo >= 0.5 else "")

    lines = [
        f"{args.connections} connections, median of {args.rounds} rounds (range when it is 0.5 or wider); "
        f"KiB per connection = (RSS after − RSS before) / {args.connections}.",
        "",
        "| proxy | " + " | ".join(f"{STATES[s]}, KiB/conn | same, after a little traffic" for s in states) + " |",
        "|---|" + "---:|---:|" * len(states),
    ]
    for name in proxy_names:
        lines.append(f"| {name} | " + " | ".join(f"{spread(results[(s, name)], 'per_conn')} | {spread(results[(s, name)], 'traffic_per_conn')}" for s in states) + " |")
    lines += [
        "",
        "| state | proxy | RSS before MiB | RSS after MiB | after traffic MiB | KiB/conn | after traffic | kept after close | accepted | opened in s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for state in states:
        for name in proxy_names:
            rs = results[(state, name)]
            lines.append(f"| {state} | {name} | {med(rs, 'before') / 1024:.1f} | {med(rs, 'after') / 1024:.1f} | {med(rs, 'after_traffic') / 1024:.1f} | "
                         f"{med(rs, 'per_conn'):.1f} | {med(rs, 'traffic_per_conn'):.1f} | {med(rs, 'kept_per_conn'):.1f} | "
                         f"{min(r['accepted'] for r in rs)} | {med(rs, 'opened_in'):.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
