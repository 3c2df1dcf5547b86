"""A fault-injecting HTTP server on loopback, for image URLs (blip_ops.http_fetch and the decode tasks).

A test registers, per path, the answers the server gives in turn (the last one repeats): a
status, headers, a body, and faults: a delay before answering, a body that trickles in, a body
cut short of its ``Content-Length``, a body with no length at all. Every request is logged, so a
test can count how often a URL was fetched. ``latency`` delays every answer (the benchmark's
50 ms per request).

The server runs in a thread of the test process; Ray workers reach it over loopback, so a run
must opt in with ``http_allow_private`` (the default refuses loopback, as it should).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    delay: float = 0.0  # seconds before the status line
    trickle: float = 0.0  # seconds between body bytes (a slow body)
    truncate: int | None = None  # send only this many body bytes, then close (Content-Length says more)
    no_length: bool = False  # no Content-Length: the body ends when the connection closes
    claimed_length: int | None = None  # a Content-Length to state instead of the real one


class FaultServer:
    def __init__(self, latency: float = 0.0):
        self.latency = latency
        self.routes: dict[str, list[Answer]] = {}
        self.requests: Counter = Counter()
        self.user_agents: list[str] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.requests[path] += 1
                    server.user_agents.append(self.headers.get("User-Agent", ""))
                    answers = server.routes.get(path)
                    answer = (answers.pop(0) if len(answers) > 1 else answers[0]) if answers else Answer(404, b"no such path")
                time.sleep(server.latency + answer.delay)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                close = answer.no_length or answer.truncate is not None
                if not answer.no_length:
                    length = answer.claimed_length if answer.claimed_length is not None else len(answer.body)
                    self.send_header("Content-Length", str(length))
                if close:
                    self.send_header("Connection", "close")
                self.end_headers()
                body = answer.body if answer.truncate is None else answer.body[: answer.truncate]
                try:
                    if answer.trickle:
                        for i in range(len(body)):
                            self.wfile.write(body[i:i + 1])
                            self.wfile.flush()
                            time.sleep(answer.trickle)
                    else:
                        self.wfile.write(body)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                if close:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # a client that hung up is no news
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def route(self, path: str, *answers: Answer) -> str:
        with self._lock:
            self.routes[path] = list(answers)
        return self.url(path)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
