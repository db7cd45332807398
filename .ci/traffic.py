#!/usr/bin/env python3
"""Loopback-only helpers for .ci/prometheus-check.sh.

  traffic.py ports N                      print N free TCP ports on 127.0.0.1
  traffic.py echo PORT_FILE               run a TCP echo origin on 127.0.0.1:0, write its port
  traffic.py drive PROXY ORIGIN_PORT ADMIN
                                          tunnels + refusals through veilgate, then check that
                                          the admin /metrics scrape counted them
  traffic.py background PROXY ORIGIN_PORT SECONDS
                                          hold two tunnels open and keep a trickle of new
                                          tunnels and refusals going, so rates are not zero

Every address used here is 127.0.0.1; the only name sent to the proxy is nothing.invalid,
which veilgate answers locally (RFC 6761) without a DNS query.
"""

import os
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.request

LOOPBACK = "127.0.0.1"
TIMEOUT = 5.0
PAYLOAD = 64 * 1024
TUNNELS = 8


def die(msg):
    print(f"traffic.py: {msg}", file=sys.stderr)
    sys.exit(1)


def hostport(s):
    host, _, port = s.rpartition(":")
    if host != LOOPBACK:
        die(f"refusing a non-loopback address: {s}")
    return host, int(port)


# ---------------------------------------------------------------- ports


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------- echo origin


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(120)
        try:
            while True:
                data = self.request.recv(65536)
                if not data:
                    break
                self.request.sendall(data)
            self.request.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def run_echo(port_file):
    srv = EchoServer((LOOPBACK, 0), EchoHandler)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(srv.server_address[1]))
    os.rename(tmp, port_file)
    srv.serve_forever()


# ---------------------------------------------------------------- proxy client


def read_head(sock):
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > 65536:
            break
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head.decode("latin-1"), rest


def request(proxy, raw):
    """Sends a request head; returns (status line, socket, bytes already read past the head)."""
    s = socket.create_connection(proxy, timeout=TIMEOUT)
    s.sendall(raw)
    head, rest = read_head(s)
    return head.split("\r\n", 1)[0], s, rest


def connect_head(target):
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


def tunnel(proxy, origin_port, size):
    status, s, rest = request(proxy, connect_head(f"{LOOPBACK}:{origin_port}"))
    try:
        if not status.startswith("HTTP/1.1 200"):
            raise AssertionError(f"CONNECT {LOOPBACK}:{origin_port}: got {status!r}, want HTTP/1.1 200")
        payload = os.urandom(size)
        s.sendall(payload)
        got = rest
        while len(got) < size:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        if got != payload:
            raise AssertionError(f"echo through the tunnel: sent {size} bytes, got {len(got)} back (or different)")
        # A clean close: half-close, wait for the origin's EOF through the tunnel.
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    finally:
        s.close()


def refusal(proxy, raw, want, what):
    status, s, _ = request(proxy, raw)
    s.close()
    if not status.startswith(f"HTTP/1.1 {want}"):
        raise AssertionError(f"{what}: got {status!r}, want HTTP/1.1 {want}")


def denied_port(origin_port):
    return 1 if origin_port != 1 else 2


REFUSALS = [
    # (request, status, refusal reason it must be counted under, description)
    (lambda o: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed", "GET"),
    (lambda o: connect_head(f"{LOOPBACK}:{denied_port(o)}"), 403, "port_denied", "CONNECT to a port not allowed"),
    (lambda o: connect_head(f"nothing.invalid:{o}"), 502, "dns_failed", "CONNECT nothing.invalid"),
]


# ---------------------------------------------------------------- metrics

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(admin):
    with urllib.request.urlopen(f"http://{admin[0]}:{admin[1]}/metrics", timeout=TIMEOUT) as r:
        text = r.read().decode()
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if m:
            labels = dict(LABEL.findall(m.group(2) or ""))
            samples.append((m.group(1), labels, float(m.group(3))))
    return samples


def total(samples, name, **labels):
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == x for k, x in labels.items()))


def expect_metrics(admin, expectations, deadline=5.0):
    """Polls /metrics until every (name, labels, minimum) holds or the deadline passes."""
    end = time.monotonic() + deadline
    while True:
        samples = scrape(admin)
        missing = []
        for name, labels, minimum in expectations:
            v = total(samples, name, **labels)
            if v < minimum:
                missing.append(f"{name}{labels or ''} = {v:g}, want >= {minimum:g}")
        if not missing or time.monotonic() > end:
            return missing
        time.sleep(0.25)


def drive(proxy, origin_port, admin):
    failures = []

    def check(what, fn):
        try:
            fn()
            print(f"  ok   {what}")
        except (AssertionError, OSError) as e:
            print(f"  FAIL {what}: {e}")
            failures.append(what)

    for i in range(TUNNELS):
        check(f"tunnel {i + 1}/{TUNNELS}: CONNECT -> 200, {PAYLOAD} bytes echoed",
              lambda: tunnel(proxy, origin_port, PAYLOAD))
    for raw, want, reason, what in REFUSALS:
        check(f"{what} -> {want}", lambda raw=raw, want=want, what=what: refusal(proxy, raw(origin_port), want, what))

    n = TUNNELS
    expectations = [
        ("veilgate_connections_accepted_total", {}, n + len(REFUSALS)),
        ("veilgate_tunnels_total", {"mode": "tunnel", "outcome": "closed"}, n),
        ("veilgate_tunnel_bytes_total", {"mode": "tunnel", "direction": "up"}, n * PAYLOAD),
        ("veilgate_tunnel_bytes_total", {"mode": "tunnel", "direction": "down"}, n * PAYLOAD),
        ("veilgate_upstream_connect_duration_seconds_count", {}, n),
        ("veilgate_tunnel_duration_seconds_count", {}, n),
        ("veilgate_config_max_tunnels", {}, 1000),
        ("veilgate_build_info", {}, 1),
    ] + [("veilgate_refusals_total", {"reason": reason}, 1) for _, _, reason, _ in REFUSALS]
    missing = expect_metrics(admin, expectations)
    for m in missing:
        print(f"  FAIL metric {m}")
    if not missing:
        print(f"  ok   /metrics counted the traffic ({len(expectations)} expectations)")
    return 1 if failures or missing else 0


# ---------------------------------------------------------------- background traffic


def background(proxy, origin_port, seconds):
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    end = time.monotonic() + seconds
    held = []
    for _ in range(2):
        status, s, _ = request(proxy, connect_head(f"{LOOPBACK}:{origin_port}"))
        if not status.startswith("HTTP/1.1 200"):
            die(f"background tunnel: got {status!r}")
        held.append(s)
    i = 0
    while not stop.is_set() and time.monotonic() < end:
        try:
            for s in held:
                s.sendall(b"x" * 1024)
                got = 0
                while got < 1024:
                    chunk = s.recv(1024 - got)
                    if not chunk:
                        raise OSError("held tunnel closed")
                    got += len(chunk)
            tunnel(proxy, origin_port, 4096)
            raw, want, _, what = REFUSALS[i % len(REFUSALS)]
            refusal(proxy, raw(origin_port), want, what)
        except (AssertionError, OSError) as e:
            print(f"traffic.py background: {e}", file=sys.stderr)
        i += 1
        stop.wait(0.5)
    for s in held:
        s.close()


def main(argv):
    if len(argv) < 2:
        die(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "ports":
        print(" ".join(map(str, free_ports(int(args[0])))))
    elif cmd == "echo":
        run_echo(args[0])
    elif cmd == "drive":
        sys.exit(drive(hostport(args[0]), int(args[1]), hostport(args[2])))
    elif cmd == "background":
        background(hostport(args[0]), int(args[1]), float(args[2]))
    else:
        die(f"unknown command {cmd!r}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv)
