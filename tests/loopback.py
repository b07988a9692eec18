"""Test infrastructure, not part of onion: real servers on loopback for the tests and the benchmarks.
An S3-compatible HTTP server (moto's standalone server, in its own process), a fault-injecting HTTP
proxy to put in front of it, and Ray nodes started with ``ray start`` that form a cluster.

It lives beside ``helpers.py``, outside the installed packages: tests import it as ``loopback``
(pytest puts ``tests/`` on ``sys.path``); the benchmarks that start these servers put ``tests/`` on
``sys.path`` first. No module of ``shards``, ``pipeline`` or ``trainer`` may import it
(``test_layering.py``). It imports only the standard library at module level: moto (the ``test``
extra) and Ray are used only by the functions that start their servers."""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = "onion-test-secret-key-never-printed"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def aws_environment(endpoint: str) -> dict[str, str]:
    """What a user sets for an S3-compatible store: the standard AWS variables, nothing onion-specific."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "onion-test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def moto_server() -> Iterator[str]:
    """Start ``python -m moto.server`` on a free loopback port; yields its endpoint URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server on port {port} did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class FaultyProxy:
    """Forwards HTTP requests to ``upstream``; request number n (1-based, counted over all
    connections) is answered with a 500 InternalError when ``n % error_every == 0``, or has its
    connection dropped without an answer when ``n % drop_every == 0``."""

    def __init__(self, upstream: str, error_every: int = 0, drop_every: int = 0) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.error_every, self.drop_every = error_every, drop_every
        self.requests = self.errors = self.drops = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultyProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            n = self.requests
            if self.drop_every and n % self.drop_every == 0:
                self.drops += 1
                return "drop"
            if self.error_every and n % self.error_every == 0:
                self.errors += 1
                return "error"
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    raw = b""
                    while True:  # keep the chunked framing as sent: the upstream decodes it
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0], 16)
                        raw += self.rfile.read(size + 2)
                        if size == 0:
                            return raw
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                fault = proxy._fault()
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "error":
                    message = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    self.wfile.write(message)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(name, value)
                length = answer.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler


RAY = [sys.executable, "-m", "ray.scripts.scripts"]


# Ray >= 2.52 protects clusters made by ``ray start`` with a token (~/.ray/auth_token, made by the head
# if missing); nodes and drivers joining one say so with RAY_AUTH_MODE=token.
RAY_CLUSTER_ENV = {"RAY_AUTH_MODE": "token", "RAY_ADDRESS": ""}


def start_ray_node(args: list[str], log: str, cpus: int = 1) -> subprocess.Popen:
    """``ray start ... --block`` in its own process group, so exactly this node can be stopped
    (``ray stop`` would also stop a test session's embedded Ray)."""
    # A node given SIGTERM first drains for up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (for Serve
    # replicas; 30 s by default, which stop_ray_node waited out); these nodes have nothing to drain.
    with open(log, "wb") as output:
        return subprocess.Popen([*RAY, "start", *args, "--num-cpus", str(cpus), "--block", "--disable-usage-stats"],
                                stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **RAY_CLUSTER_ENV, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})


def stop_ray_node(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=30)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def wait_for_ray_nodes(address: str, count: int, timeout: float = 120) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True, timeout=120,
                                env={**os.environ, **RAY_CLUSTER_ENV})
        if result.returncode == 0 and result.stdout.strip() == str(count):
            return
        time.sleep(1)
    raise RuntimeError(f"the loopback Ray cluster at {address} did not reach {count} nodes")


def host_address() -> str:
    """The address Ray gives the nodes of this machine."""
    from ray.util import get_node_ip_address

    return get_node_ip_address()


class LoopbackRayCluster:
    """Ray nodes on this machine: a head, then ``add_node()`` for each further one; each node has one
    CPU and a custom resource of its own (``node0``, ``node1``, ...). Ray names nodes by the host's
    address, so ``address`` is that address and the head's port."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.address = f"{host_address()}:{free_port()}"
        self.nodes: list[subprocess.Popen] = []

    def __enter__(self) -> LoopbackRayCluster:
        try:
            self.add_node()
        except BaseException:
            self.__exit__()
            raise
        return self

    def add_node(self) -> None:
        number = len(self.nodes)
        role = ["--head", "--port", self.address.split(":")[1], "--include-dashboard", "false"] if number == 0 \
            else ["--address", self.address]
        self.nodes.append(start_ray_node([*role, "--resources", f'{{"node{number}": 1}}'],
                                         os.path.join(self.log_dir, f"node{number}.log")))
        wait_for_ray_nodes(self.address, len(self.nodes))

    def __exit__(self, *exc: object) -> None:
        for node in reversed(self.nodes):
            stop_ray_node(node)
