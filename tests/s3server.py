"""A real S3-compatible server for the remote-storage tests: moto's standalone server on
127.0.0.1 (a free port), plus a small HTTP proxy in front of it that injects faults (503
SlowDown, 500, dropped connections) on request. No traffic leaves 127.0.0.1."""

from __future__ import annotations

import http.client
import http.server
import os
import threading
import time
import uuid

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class _Counting:
    """WSGI wrapper that counts requests in progress and stamps the last one's start, so a
    test can wait until the server has finished what a killed client had already sent."""

    def __init__(self, app) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.busy = 0
        self.last_start = time.monotonic()

    def __call__(self, environ, start_response):
        with self.lock:
            self.busy += 1
            self.last_start = time.monotonic()
        try:
            result = self.app(environ, start_response)
            try:
                return list(result)  # the body is produced here, inside the count
            finally:
                getattr(result, "close", lambda: None)()
        finally:
            with self.lock:
                self.busy -= 1

    def idle_for(self) -> float:
        """Seconds since the last request started, or 0 while one is in progress."""
        with self.lock:
            return 0.0 if self.busy else time.monotonic() - self.last_start


class S3Server:
    """moto's ThreadedMotoServer on 127.0.0.1; ``endpoint`` is its URL."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        wsgi = self.server._server  # werkzeug's server; its handlers call ``wsgi.app``
        self.counter = _Counting(wsgi.app)
        wsgi.app = self.counter
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def quiesce(self, quiet: float = 0.5, timeout: float = 60.0) -> None:
        """Wait until no request is in progress and none started for ``quiet`` seconds.

        A killed client's last request may already sit in the server's socket; the server
        still completes it (as S3 does), so a test that checks the bucket right after a kill
        waits here first, or it races the dead writer's final PUT."""
        deadline = time.monotonic() + timeout
        while self.counter.idle_for() < quiet:
            if time.monotonic() > deadline:
                raise TimeoutError(f"S3 server at {self.endpoint} still busy after {timeout} s")
            time.sleep(0.05)

    def env(self) -> dict[str, str]:
        """Environment that points boto/s3fs (in this or a child process) at the server."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def options(self, endpoint: str | None = None, attempts: int | None = None) -> dict:
        """fsspec storage_options for the server (or the fault proxy in front of it)."""
        opts: dict = {"client_kwargs": {"endpoint_url": endpoint or self.endpoint}}
        if attempts is not None:
            opts["config_kwargs"] = {"retries": {"max_attempts": attempts, "mode": "standard"}}
        return opts

    def new_bucket(self) -> str:
        """A fresh, empty bucket's name."""
        import s3fs

        name = f"tk-{uuid.uuid4().hex[:12]}"
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint})
        fs.mkdir(name)
        return name

    def stop(self) -> None:
        self.server.stop()


class FaultProxy:
    """Forwards HTTP to ``target``; ``fail(status, times)`` answers the next ``times`` requests
    (matching ``method``) with ``status``; ``drop(times)`` closes their connections unanswered."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.lock = threading.Lock()
        self.mode: tuple[str, int, int, str | None] | None = None  # kind, status, left, method
        self.path_part: str | None = None  # faults only for request paths containing this
        self.after = 0  # faults start after this many more requests
        self.code = "SlowDown"
        self.requests = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any  # noqa: N815

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def fail(
        self,
        status: int,
        times: int,
        method: str | None = None,
        path: str | None = None,
        code: str = "SlowDown",
    ) -> None:
        """Answer ``times`` requests with ``status`` and an S3 error body naming ``code``."""
        with self.lock:
            self.mode, self.path_part, self.after = ("status", status, times, method), path, 0
            self.code = code

    def drop(self, times: int, method: str | None = None, after: int = 0) -> None:
        """Close the connections of ``times`` requests, once ``after`` more went through (a
        server that goes away in the middle of an upload)."""
        with self.lock:
            self.mode, self.path_part, self.after = ("drop", 0, times, method), None, after

    def clear(self) -> None:
        with self.lock:
            self.mode = None

    def _fault(self, method: str, path: str) -> tuple[str, int] | None:
        with self.lock:
            self.requests += 1
            if self.mode is None:
                return None
            kind, status, left, only = self.mode
            if only is not None and only != method:
                return None
            if self.path_part is not None and self.path_part not in path:
                return None
            if self.after > 0:
                self.after -= 1
                return None
            if left <= 0:
                return None
            self.mode = (kind, status, left - 1, only)
            return kind, status

    def handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else None
        fault = self._fault(req.command, req.path)
        if fault is not None and fault[0] == "drop":
            req.close_connection = True
            req.connection.close()
            return
        if fault is not None:
            payload = f"<Error><Code>{self.code}</Code><Message>injected</Message></Error>".encode()
            req.send_response(fault[1])
            req.send_header("Content-Length", str(len(payload)))
            req.end_headers()
            req.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(*self.target, timeout=60)
        headers = {k: v for k, v in req.headers.items() if k.lower() != "connection"}
        conn.request(req.command, req.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        req.send_response(resp.status)
        head = req.command == "HEAD"  # keeps the object's Content-Length
        for key, value in resp.getheaders():
            if key.lower() in ("connection", "transfer-encoding"):
                continue
            if key.lower() == "content-length" and not head:
                continue
            req.send_header(key, value)
        if not head:
            req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(data)
        conn.close()

    def stop(self) -> None:
        self.httpd.shutdown()


def apply_env(server: S3Server) -> None:
    os.environ.update(server.env())
