"""A local stand-in of the Hugging Face Hub's upload API, for tests (the Hub is out of reach
here): a local HTTP server answering the endpoints an upload calls (create repo, validate the
card, preupload, commit), storing each committed file under its root. Point huggingface_hub at
it with `constants.ENDPOINT = stand_in.url` in-process, or `HF_ENDPOINT` for a child process.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = "someone/tiny-model"


class HubStandIn:
    """A local stand-in of the Hub's upload API; committed files land in `root/REPO/`."""

    def __init__(self, root: Path):
        self.root = root
        self.commits: list[tuple[str, str, list[str]]] = []
        """(repo, commit summary, paths), in the order the commits arrived."""
        self.requests: list[tuple[str, str, str | None]] = []
        """(method, path, Authorization header) of every request."""
        self.created: list[dict] = []
        self.fail: dict[str, int] = {}
        """Endpoint kind (create, preupload, commit) -> HTTP status to answer instead."""
        self.hold: set[str] = set()
        """Endpoint kinds that wait for `release` before answering."""
        self.release = threading.Event()
        self.arrived = threading.Event()
        """Set when a held request has arrived."""
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def files(self, repo: str = REPO) -> dict[str, bytes]:
        base = self.root / repo
        if not base.is_dir():
            return {}
        return {
            p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()
        }

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, method: str, path: str, auth: str | None, body: bytes):
        self.requests.append((method, path, auth))
        route = path.split("?")[0]
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/[^/]+", route)
        kind = "create" if route == "/api/repos/create" else match[2] if match else route
        if kind in self.hold:
            self.arrived.set()
            self.release.wait(timeout=60)
        if kind in self.fail:
            return self.fail[kind], {"error": f"stand-in refused {kind}"}
        if method == "POST" and kind == "create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            with self._lock:
                if any(c["repo"] == repo for c in self.created):
                    return 409, {"error": "You already created this model repo"}
                self.created.append({**payload, "repo": repo})
            return 200, {"url": f"{self.url}/{repo}", "name": repo}
        if route == "/api/validate-yaml":
            return 200, {}
        if kind == "preupload":
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
            ]
            return 200, {"files": modes}
        if kind == "commit":
            return self._commit(match[1], body)
        return 404, {"error": f"the stand-in has no {method} {route}"}

    def _commit(self, repo: str, body: bytes):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        summary = lines[0]["value"]["summary"]
        files = {
            item["value"]["path"]: base64.b64decode(item["value"]["content"])
            for item in lines[1:]
            if item["key"] == "file"
        }
        with self._lock:
            for name, data in files.items():
                target = self.root / repo / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            self.commits.append((repo, summary, sorted(files)))
        oid = f"{len(self.commits):040x}"
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, payload = hub._answer(
                    method, self.path, self.headers.get("Authorization"), body
                )
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                self._reply("POST")

            def do_GET(self) -> None:
                self._reply("GET")

        return Handler
