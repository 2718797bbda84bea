"""A local HTTP server for tests/test_download.py: files under any path, each route with a behaviour.

    server = FileServer().start()          # 127.0.0.1, a free port, a thread per request
    server.add("/org/repo/resolve/main/a.bin", body)            # honours Range (206)
    server.add("/files/b.bin", body, mode="norange")           # ignores Range (200)
    server.url("/files/b.bin"); server.hits("/files/b.bin")    # every request: headers and bytes sent
    server.stop()

Modes: "range", "norange", "drop_once" (the first answer announces the full length, sends half
and closes; later ones honour Range), "redirect" (302 to `body`, a path), or an HTTP status
code such as 404 / 500 / 401 (an error page).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    body: bytes
    mode: str = "range"
    content_type: str = "application/octet-stream"
    hits: list = field(default_factory=list)  # one dict per request: {"headers": {...}, "sent": bytes sent}


class FileServer:
    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.unrouted: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        # a short poll: stop() returns at once instead of after serve_forever's default 0.5 s
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def start(self) -> "FileServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, body: bytes | str, mode: str = "range", content_type: str = "application/octet-stream") -> str:
        self.routes[path] = Route(body.encode() if isinstance(body, str) else body, mode, content_type)
        return self.url(path)

    def hits(self, path: str) -> list:
        return self.routes[path].hits

    def total_requests(self) -> int:
        return sum(len(r.hits) for r in self.routes.values()) + len(self.unrouted)


def _handler(server: FileServer) -> type:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet tests
            pass

        def do_GET(self) -> None:
            route = server.routes.get(self.path)
            if route is None:
                server.unrouted.append(self.path)
                return self._send(404, b"no such route", "text/plain")
            hit = {"headers": dict(self.headers), "sent": 0}
            route.hits.append(hit)
            if route.mode.isdigit():
                return self._send(int(route.mode), b"<html><body>error</body></html>", "text/html")
            if route.mode == "redirect":
                self.send_response(302)
                self.send_header("Location", route.body.decode())
                self.send_header("Content-Length", "0")
                return self.end_headers()
            if route.mode == "drop_once" and len(route.hits) == 1:
                self.send_response(200)
                self.send_header("Content-Type", route.content_type)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                half = route.body[:len(route.body) // 2]
                self.wfile.write(half)
                hit["sent"] = len(half)
                self.close_connection = True
                return
            start = self._range_start() if route.mode in ("range", "drop_once") else None
            if start is None:
                hit["sent"] = len(route.body)
                return self._send(200, route.body, route.content_type)
            if start >= len(route.body):
                return self._send(416, b"", "text/plain", {"Content-Range": f"bytes */{len(route.body)}"})
            rest = route.body[start:]
            hit["sent"] = len(rest)
            self._send(206, rest, route.content_type,
                       {"Content-Range": f"bytes {start}-{len(route.body) - 1}/{len(route.body)}"})

        def _range_start(self):
            value = self.headers.get("Range", "")
            if value.startswith("bytes=") and value.endswith("-") and value[6:-1].isdigit():
                return int(value[6:-1])
            return None

        def _send(self, code: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

    return Handler
