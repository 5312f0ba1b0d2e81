"""A loopback stand-in for the Hugging Face Hub (stdlib only), serving the routes huggingface_hub 2.x
uses for model_info / snapshot_download / hf_hub_download (see ECOSYSTEM.md section 3.3):

    GET  /api/models/{org}/{name}[/revision/{rev}]       -> {"id", "sha", "siblings", "private", "gated"}
    GET  /api/models/{org}/{name}/tree/{rev}[/{path}]    -> [{"type": "file", "path", "oid", "size"}]
    HEAD/GET /{org}/{name}/resolve/{rev}/{path}          -> bytes + X-Repo-Commit, ETag, Content-Length
    errors: 404 + X-Error-Code RepoNotFound | RevisionNotFound | EntryNotFound, 401 for private repos
    without "Authorization: Bearer <token>", 403 + GatedRepo for gated repos.

Usage:
    hub = FakeHub(); hub.create_repo("org/name", private=False)
    sha = hub.commit("org/name", folder, branch="main")       # snapshot of a folder's files
    hub.tag("org/name", "v1", sha)
    with hub.serve() as url: ...                              # http://127.0.0.1:<port>
    hub.requests                                              # [(method, path)] seen, for assertions
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    repo_id: str
    private: bool = False
    gated: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}
    refs: dict[str, str] = field(default_factory=dict)  # branch / tag / refs/pr/N -> sha


class FakeHub:
    def __init__(self, tokens: set[str] | None = None):
        self.repos: dict[str, FakeRepo] = {}
        self.tokens = set(tokens or {"hf_test_token"})
        self.requests: list[tuple[str, str]] = []
        self.on_request = None  # optional callable(method, path), run after each request is answered
        self._conns: set = set()
        self._lock = threading.Lock()
        self._n = 0

    # ------------------------------------------------------------ repo content

    def create_repo(self, repo_id: str, *, private: bool = False, gated: bool = False) -> FakeRepo:
        repo = FakeRepo(repo_id, private=private, gated=gated)
        self.repos[repo_id] = repo
        return repo

    def commit(self, repo_id: str, folder: str | os.PathLike, *, branch: str = "main",
               files: dict[str, bytes] | None = None) -> str:
        """Snapshot every file under `folder` (plus `files`) as a new commit on `branch`; return its sha."""
        content: dict[str, bytes] = {}
        for dirpath, _dirs, names in os.walk(folder):
            for n in names:
                full = os.path.join(dirpath, n)
                rel = os.path.relpath(full, folder).replace(os.sep, "/")
                with open(full, "rb") as f:
                    content[rel] = f.read()
        content.update(files or {})
        self._n += 1
        h = hashlib.sha1(f"{repo_id}\0{branch}\0{self._n}".encode())
        for p in sorted(content):
            h.update(p.encode() + b"\0" + hashlib.sha1(content[p]).digest())
        sha = h.hexdigest()
        repo = self.repos[repo_id]
        repo.commits[sha] = content
        repo.refs[branch] = sha
        return sha

    def tag(self, repo_id: str, tag: str, sha: str) -> None:
        self.repos[repo_id].refs[tag] = sha

    # ------------------------------------------------------------ server

    @contextlib.contextmanager
    def serve(self):
        self.start()
        try:
            yield self.url
        finally:
            self.stop()

    def start(self):
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self._server

    def stop(self):
        """Stop like a dead host: stop listening and cut keep-alive connections the client still holds."""
        import socket

        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                c.close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------ lookups

    def resolve(self, repo: FakeRepo, rev: str | None) -> str | None:
        rev = rev or "main"
        if rev in repo.refs:
            return repo.refs[rev]
        if rev in repo.commits:
            return rev
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        with self.fake._lock:
            self.fake._conns.add(self.connection)

    def finish(self):
        with contextlib.suppress(OSError):
            super().finish()
        with self.fake._lock:
            self.fake._conns.discard(self.connection)

    # ------------------------------------------------------------ helpers

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None, head: bool = False):
        body = json.dumps(obj).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head)

    def _repo(self, repo_id: str, head: bool) -> FakeRepo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
            return None
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if repo.private and token not in self.fake.tokens:
            # the real Hub answers 401 for private repos without a valid token
            self._error(401, "RepoNotFound", "Repository not found", head)
            return None
        if repo.gated and token not in self.fake.tokens:
            self._error(403, "GatedRepo", "Access to this model is restricted", head)
            return None
        return repo

    # ------------------------------------------------------------ routes

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    def _route(self, head: bool):
        raw_path = urlsplit(self.path).path
        with self.fake._lock:
            self.fake.requests.append((self.command, self.path))
        parts = raw_path.strip("/").split("/")
        try:
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                self._api(parts[2:], head)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(parts, head)
            else:
                self._error(404, None, "Not found", head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if self.fake.on_request is not None:
            with self.fake._lock:
                self.fake.on_request(self.command, self.path)

    def _api(self, parts: list[str], head: bool):
        repo = self._repo(f"{parts[0]}/{parts[1]}", head)
        if repo is None:
            return
        rest = parts[2:]
        if not rest or rest[0] == "revision":
            rev = unquote(rest[1]) if len(rest) >= 2 else None
            sha = self.fake.resolve(repo, rev)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            files = repo.commits[sha]
            return self._json(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                                    "gated": "auto" if repo.gated else False,
                                    "siblings": [{"rfilename": p} for p in sorted(files)]}, head=head)
        if rest[0] == "tree" and len(rest) >= 2:
            sha = self.fake.resolve(repo, unquote(rest[1]))
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rest[1])}", head)
            prefix = "/".join(unquote(p) for p in rest[2:])
            files = repo.commits[sha]
            items, dirs = [], set()
            for p in sorted(files):
                if prefix and not p.startswith(prefix + "/"):
                    continue
                items.append({"type": "file", "path": p, "oid": hashlib.sha1(files[p]).hexdigest(),
                              "size": len(files[p])})
                segs = p.split("/")[:-1]
                for i in range(1, len(segs) + 1):
                    dirs.add("/".join(segs[:i]))
            items += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0}
                      for d in sorted(dirs) if not prefix or d.startswith(prefix + "/")]
            return self._json(200, items, head=head)
        return self._error(404, None, "Not found", head)

    def _resolve(self, parts: list[str], head: bool):
        repo = self._repo(f"{parts[0]}/{parts[1]}", head)
        if repo is None:
            return
        rev = unquote(parts[3])
        sha = self.fake.resolve(repo, rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        path = "/".join(unquote(p) for p in parts[4:])
        data = repo.commits[sha].get(path)
        if data is None:
            return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha,
                                                        "X-Error-Message": "Entry not found"}, head)
        etag = hashlib.sha256(data).hexdigest() if path.endswith(".safetensors") else hashlib.sha1(data).hexdigest()
        self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"},
                   head)


def closed_port() -> int:
    """A loopback port with nothing listening (bound then released)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
