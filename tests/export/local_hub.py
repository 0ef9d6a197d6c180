"""A tiny local HTTP server speaking the few Hub endpoints an upload uses (create repo, preupload, commit).

It stores what is committed, so tests assert on the files that really arrived through ``huggingface_hub``'s client.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "files": {path: bytes}, "commits": [msg]}
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _reply(self, code: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                hub.requests.append(("POST", self.path))
                if self.headers.get("authorization") != "Bearer hf_local_test_token":
                    return self._reply(401, {"error": "bad token"})
                if self.path == "/api/repos/create":
                    data = json.loads(body)
                    repo_id = f"{data.get('organization') or 'tester'}/{data['name']}"
                    private = data["private"] if "private" in data else data.get("visibility") == "private"
                    hub.repos.setdefault(repo_id, {"private": private, "files": {}, "commits": []})
                    return self._reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                parts = self.path.split("/")  # /api/models/<ns>/<name>/<op>/<rev>
                repo_id, op = f"{parts[3]}/{parts[4]}", parts[5]
                if repo_id not in hub.repos:
                    return self._reply(404, {"error": f"repo {repo_id} not found"})
                if op == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})
                if op == "commit":
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            hub.repos[repo_id]["commits"].append(item["value"]["summary"])
                        elif item["key"] == "file":
                            content = base64.b64decode(item["value"]["content"])
                            hub.repos[repo_id]["files"][item["value"]["path"]] = content
                    oid = f"{len(hub.repos[repo_id]['commits']):040x}"
                    return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}",
                                             "commitOid": oid})
                return self._reply(404, {"error": f"unknown endpoint {self.path}"})

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path))
                self._reply(404, {"error": f"unknown endpoint {self.path}"})

        return Handler
