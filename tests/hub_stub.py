"""A local stand-in for the Hugging Face Hub HTTP API on 127.0.0.1, for offline push / download tests.

It answers what ``create_repo``, ``upload_folder`` (every file uploaded inline, no LFS / xet), ``ModelCard.load``,
``hf_hub_download`` and ``from_pretrained("user/repo")`` ask; files land in ``root/<user>/<repo>/`` and every commit
is counted per repo, so a test can check that one push made one commit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REVISION = "0" * 40


def serve(root: Path) -> tuple[ThreadingHTTPServer, Counter]:
    """Start the stub in a daemon thread; returns the server (``server_address[1]`` is the port) and commit counts."""
    commits: Counter = Counter()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def reply(self, code: int, body: bytes | dict | list = b"", headers: dict | None = None) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                               **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            host = f"http://{self.headers['Host']}"
            if self.path == "/api/repos/create":
                request = json.loads(body)
                repo = f"{request.get('organization') or 'user'}/{request['name']}"
                (root / repo).mkdir(parents=True, exist_ok=True)
                return self.reply(200, {"url": f"{host}/{repo}", "name": repo})
            if self.path == "/api/validate-yaml":
                return self.reply(200, {})
            if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/[^/]+", self.path):
                files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                         for f in json.loads(body)["files"]]
                return self.reply(200, {"files": files, "commitOid": REVISION})
            if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/[^/]+", self.path):
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        target = root / match[1] / item["value"]["path"]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(base64.b64decode(item["value"]["content"]))
                commits[match[1]] += 1
                return self.reply(200, {"commitUrl": f"{host}/{match[1]}/commit/{REVISION}",
                                        "commitOid": REVISION, "success": True})
            return self.reply(404, {"error": "unknown route"}, {"X-Error-Code": "RepoNotFound"})

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path):
                repo = root / match[1]
                if not repo.is_dir():
                    return self.reply(404, {"error": "repo not found"}, {"X-Error-Code": "RepoNotFound"})
                files = [{"rfilename": str(p.relative_to(repo))} for p in repo.rglob("*") if p.is_file()]
                return self.reply(200, {"id": match[1], "sha": REVISION, "siblings": files})
            if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path):
                target = root / match[1] / match[2]
                if not target.is_file():
                    return self.reply(404, {"error": "entry not found"}, {"X-Error-Code": "EntryNotFound"})
                data = target.read_bytes()
                return self.reply(200, data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                              "X-Repo-Commit": REVISION, "Content-Type": "application/octet-stream"})
            return self.reply(404, {"error": "unknown route"}, {"X-Error-Code": "RepoNotFound"})

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, commits
