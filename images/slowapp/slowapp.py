"""slowapp: a small HTTP service that is slow to become ready.

Stands in for services whose start-up is dominated by initialisation (JVM warm-up,
loading a model, building caches): it spends --init-seconds building an in-memory table
(a SHA-256 hash chain, 32 bytes per row, tens of MB per second of init), and only
then listens on --host:--port.

  GET /        200 "rows=N sha256=HEX\n": the table's checksum computed at init (cheap)
  GET /verify  recomputes the checksum over the live table: 200 "ok rows=N sha256=HEX\n"
               when it matches, 500 "mismatch ...\n" when memory no longer matches
  GET /health  200 "ok\n"

Once listening it prints "slowapp: ready on HOST:PORT ..." on stdout and, with
--ready-file PATH, writes "rows=N sha256=HEX" there.

Responses close the connection (HTTP/1.0), so no TCP connection stays open between
requests: a checkpoint never finds an established connection.
"""
import argparse
import hashlib
import http.server
import signal
import sys
import time

SEED = b"stasis-slowapp"


def build_table(seconds):
    table = bytearray()
    h = hashlib.sha256(SEED).digest()
    sha = hashlib.sha256
    deadline = time.monotonic() + seconds
    rows = 0
    while rows == 0 or time.monotonic() < deadline:
        for _ in range(4096):
            h = sha(h).digest()
            table += h
        rows += 4096
    return table, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--init-seconds", type=float, default=3.0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--ready-file", default="", help="written (rows and checksum) once listening")
    a = ap.parse_args()
    # as a container's pid 1 the kernel drops signals without a handler: exit on TERM/INT
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))

    t0 = time.monotonic()
    table, rows = build_table(a.init_seconds)
    digest = hashlib.sha256(table).hexdigest()
    summary = "rows=%d sha256=%s\n" % (rows, digest)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def _send(self, code, body):
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/":
                self._send(200, summary)
            elif path == "/health":
                self._send(200, "ok\n")
            elif path == "/verify":
                now = hashlib.sha256(table).hexdigest()
                if now == digest and len(table) == rows * 32:
                    self._send(200, "ok " + summary)
                else:
                    self._send(500, "mismatch rows=%d sha256=%s expected %s" % (len(table) // 32, now, summary))
            else:
                self._send(404, "not found\n")

        def log_message(self, fmt, *args):
            pass

    http.server.HTTPServer.allow_reuse_address = True
    srv = http.server.HTTPServer((a.host, a.port), Handler)
    if a.ready_file:
        with open(a.ready_file, "w") as f:
            f.write(summary)
    print("slowapp: ready on %s:%d after %.2fs, %s" % (a.host, a.port, time.monotonic() - t0, summary.strip()), flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
