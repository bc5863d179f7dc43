"""A small, stateful fake of the Hugging Face Hub HTTP API for tests (stdlib only).

It speaks just enough of the Hub protocol for the *real* ``huggingface_hub`` 2.4 client and
the real ``hf`` CLI to create repos, push commits, tag/branch and download files over
127.0.0.1.  State lives in memory: every commit is a full snapshot of the repo, so old
commits stay downloadable by sha.

Deliberate simplifications (compared with huggingface.co):

* preupload answers ``uploadMode: "regular"`` for every file, so file bytes travel base64
  inside the commit NDJSON and neither Xet nor git-LFS is needed (the stock client with
  ``hf_xet`` installed works unchanged).  ``lfsFile`` commit lines are rejected (400).
* any ``Authorization: Bearer <anything>`` is accepted as user ``tester``; write routes
  without it get 401.  Private repos are 404 ``RepoNotFound`` without a token.
* no YAML parsing (``cardData`` is never returned), no pagination, no ``lastCommit`` expansion.

Faults on the wire: ``store.inject(kind, method, path_regex, times=1, ...)`` makes the next ``times`` matching
requests fail (a 5xx/429 answer, a connection reset mid-answer, a truncated or altered body, a late answer);
the returned :class:`Fault` counts the requests it failed (``fault.hits``).  See :class:`Fault`.

Usage::

    server = serve()                 # daemon thread, random free port
    api = HfApi(endpoint=server.url, token="hf_anything")
    ...
    server.store.repo("tester/x").history("main")   # inspect commits
    server.shutdown()
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

USER = "tester"
# Plural URL segment -> repo type, as used by the Hub in /api/{type}s/... and resolve URLs.
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub uses as ETag/oid for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    """Timestamp in the one format ``huggingface_hub.utils.parse_datetime`` accepts."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An HTTP error answered the way the Hub does (JSON body + X-Error-* headers)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


@dataclass
class Commit:
    """One commit: a full snapshot of the repo's files (path -> bytes)."""

    oid: str
    parent: str | None
    title: str
    message: str
    files: dict[str, bytes]
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    """An in-memory repo with branches, tags, pull-request refs and commit objects."""

    repo_id: str
    repo_type: str = "model"
    private: bool = False
    gated: bool = False
    created_at: str = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[str, str] = field(default_factory=dict)  # "refs/pr/N" -> oid

    def resolve(self, rev: str) -> Commit:
        """Map a branch, tag, ``refs/pr/N`` or full commit sha to its commit."""
        oid = self.branches.get(rev) or self.tags.get(rev) or self.pull_requests.get(rev)
        if oid is None and rev in self.commits:
            oid = rev
        if oid is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return self.commits[oid]

    def head(self, branch: str = "main") -> Commit:
        """The commit a branch points to."""
        return self.commits[self.branches[branch]]

    def history(self, rev: str = "main") -> list[Commit]:
        """Commits reachable from ``rev`` by following parents, newest first."""
        out, commit = [], self.resolve(rev)
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out

    def files(self, rev: str = "main") -> dict[str, bytes]:
        """File contents of the snapshot at ``rev``."""
        return dict(self.resolve(rev).files)


FAULT_KINDS = ("status", "drop", "truncate", "corrupt", "slow")


@dataclass
class Fault:
    """A failure injected into the next ``times`` requests whose method is ``method`` and whose URL path (without
    the query) fully matches the regex ``path``.

    Kinds:

    * ``"status"``: answer ``status`` (default 500) with a Hub-style JSON error, plus ``Retry-After: retry_after``
      when set; the request is *not* processed.
    * ``"drop"``: the request is processed (a commit lands), the headers announce the whole body, half of it is
      sent, then the connection is reset (TCP RST): the client never gets the complete answer.
    * ``"truncate"``: the request is processed and a complete-looking answer is sent whose body is the first half
      of the real one, with a matching ``Content-Length``.
    * ``"corrupt"``: the request is processed; the body keeps its length but one byte in the middle is changed.
    * ``"slow"``: the answer is held back ``delay`` seconds (set it past the client's timeout), then sent in full.

    ``hits`` counts the requests this fault has failed so far.
    """

    kind: str
    method: str
    path: str
    times: int = 1
    status: int = 500
    retry_after: int | None = None
    delay: float = 2.0
    hits: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"Unknown fault kind {self.kind!r}; use one of {FAULT_KINDS}.")
        self._pattern = re.compile(self.path)

    def matches(self, method: str, path: str) -> bool:
        """Whether this fault still has failures left for a ``method`` request to ``path``."""
        return self.hits < self.times and method == self.method and self._pattern.fullmatch(path) is not None


class HubStore:
    """All server state; safe to inspect from tests (mutations happen under ``lock``)."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path without query), in arrival order
        self.faults: list[Fault] = []
        self.lock = threading.RLock()
        self._counter = itertools.count()

    def inject(self, kind: str, method: str, path: str, *, times: int = 1, **options: Any) -> Fault:
        """Fail the next ``times`` ``method`` requests to URL paths matching the regex ``path`` (see :class:`Fault`).

        Example: ``store.inject("status", "POST", r"/api/models/tester/x/commit/main", status=429, retry_after=1)``.
        """
        fault = Fault(kind, method, path, times=times, **options)
        with self.lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, method: str, path: str) -> Fault | None:
        """The first injected fault that applies to this request, with its ``hits`` counted; None if none does."""
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """Return an existing repo (KeyError if missing)."""
        return self.repos[(repo_type, repo_id)]

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo with an initial commit holding ``.gitattributes`` (as the Hub does)."""
        repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private)
        first = self._new_commit(None, "initial commit", "", {".gitattributes": GITATTRIBUTES})
        repo.commits[first.oid] = first
        repo.branches["main"] = first.oid
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def commit(self, repo: Repo, ref: str, title: str, message: str, files: dict[str, bytes]) -> Commit:
        """Record a snapshot on top of ``ref`` (a branch or PR ref) and move the ref."""
        refs = repo.pull_requests if ref.startswith("refs/pr/") else repo.branches
        new = self._new_commit(refs[ref], title, message, files)
        repo.commits[new.oid] = new
        refs[ref] = new.oid
        return new

    def _new_commit(self, parent: str | None, title: str, message: str, files: dict[str, bytes]) -> Commit:
        # Hash the content plus a counter so that identical snapshots still get distinct shas.
        h = hashlib.sha1(f"{parent}\n{title}\n{message}\n{next(self._counter)}\n{time.time_ns()}".encode())
        for path in sorted(files):
            h.update(f"{path}\0{git_blob_sha1(files[path])}\n".encode())
        return Commit(h.hexdigest(), parent, title, message, files)


def _tree_entries(files: dict[str, bytes], base: str, recursive: bool) -> list[dict[str, Any]]:
    """Tree listing (files and directories) under ``base`` like GET /api/.../tree."""
    prefix = base.strip("/") + "/" if base.strip("/") else ""
    dirs: set[str] = set()
    entries: list[dict[str, Any]] = []
    for path in sorted(p for p in files if p.startswith(prefix)):
        parts = path[len(prefix) :].split("/")
        if recursive:
            dirs.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
            entries.append(_file_entry(path, files[path]))
        elif len(parts) == 1:
            entries.append(_file_entry(path, files[path]))
        else:
            dirs.add(prefix + parts[0])
    entries += [{"type": "directory", "path": d, "oid": _dir_oid(files, d), "size": 0} for d in dirs]
    return sorted(entries, key=lambda e: e["path"])


def _file_entry(path: str, data: bytes) -> dict[str, Any]:
    return {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}


def _dir_oid(files: dict[str, bytes], directory: str) -> str:
    """A stable fake tree id: hash of the (path, blob id) pairs under the directory."""
    h = hashlib.sha1()
    for path in sorted(p for p in files if p.startswith(directory + "/")):
        h.update(f"{path}\0{git_blob_sha1(files[path])}\n".encode())
    return h.hexdigest()


def _is_dir(files: dict[str, bytes], path: str) -> bool:
    return any(p.startswith(path.rstrip("/") + "/") for p in files)


class HubHandler(BaseHTTPRequestHandler):
    """Routes one request; the shared state is ``self.server.store``."""

    protocol_version = "HTTP/1.1"  # keep-alive: the client pools connections
    timeout = 30  # drop idle keep-alive connections eventually
    disable_nagle_algorithm = True  # headers and body go out in two writes: avoid the 40 ms delayed-ACK stall
    server: _Server

    # ----- plumbing -------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log; ``store.requests`` records traffic instead."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        store = self.server.store
        store.requests.append((method, split.path))
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.body = self._read_body()
        if self.body is None:  # the client hung up mid-upload: never act on a partial request
            self.close_connection = True
            return
        fault = store.take_fault(method, split.path)
        # Split the *raw* path first: revisions and tree paths arrive with "/" quoted as %2F.
        segs = [unquote(s) for s in split.path.split("/")[1:]]
        try:
            if fault is not None and fault.kind == "status":
                retry = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                raise HubError(fault.status, f"Injected fault: HTTP {fault.status}", headers=retry)
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.delay)
            with store.lock:
                status, payload, headers = self._route(method, segs)
        except HubError as err:
            status, payload = err.status, {"error": err.message}
            headers = dict(err.headers, **({"X-Error-Code": err.code} if err.code else {}))
            headers["X-Error-Message"] = err.message
        except Exception as err:  # a bug or a malformed request: answer 500 instead of dropping the socket
            status, payload, headers = 500, {"error": f"{type(err).__name__}: {err}"}, {}
        try:
            self._send(method, status, payload, headers, fault)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. timed out on a slow answer)
            self.close_connection = True

    def _read_body(self) -> bytes | None:
        """The request body, or None when the connection ended before all of it arrived."""
        try:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunk = self.rfile.read(size)
                    if len(chunk) < size:
                        return None
                    chunks.append(chunk)
                    self.rfile.readline()
                self.rfile.readline()  # trailer terminator
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
        except (ConnectionError, ValueError):
            return None
        return body if len(body) == length else None

    def _send(self, method: str, status: int, payload: Any, headers: dict[str, str], fault: Fault | None) -> None:
        if isinstance(payload, bytes):
            body = payload
        else:
            body = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        kind = fault.kind if fault is not None else None
        if kind == "truncate":
            body = body[: len(body) // 2]
            headers.pop("Content-Length", None)
            if "Content-Range" in headers:  # a range answer shrinks with its body
                start = int(headers["Content-Range"].split()[1].split("-")[0])
                total = headers["Content-Range"].rsplit("/", 1)[1]
                headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{total}"
        elif kind == "corrupt" and body:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0x01]) + body[middle + 1 :]
        if kind == "drop" and method == "HEAD":  # nothing to cut short: reset before the answer
            self._reset_connection()
            return
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "drop":
            self.wfile.write(body[: len(body) // 2])
            self._reset_connection()
        elif method != "HEAD":
            self.wfile.write(body)

    def _reset_connection(self) -> None:
        """Close the socket with SO_LINGER 0: the peer gets a TCP reset (ECONNRESET), not an orderly end."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _json(self) -> Any:
        return json.loads(self.body or b"{}")

    def _has_token(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and len(auth) > len("Bearer ")

    def _require_token(self) -> None:
        if not self._has_token():
            raise HubError(401, "Invalid username or password.")

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        """Look up a readable repo or raise the Hub's RepoNotFound 404."""
        repo = self.server.store.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._has_token()):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.server.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # ----- routing --------------------------------------------------------------------------

    def _route(self, method: str, segs: list[str]) -> tuple[int, Any, dict[str, str]]:
        if segs[:1] == ["api"]:
            return self._route_api(method, segs[1:])
        if "resolve" in segs and method in ("GET", "HEAD"):
            i = segs.index("resolve")
            typed = segs[0] in ("datasets", "spaces")  # model URLs carry no type prefix
            repo_type = TYPES[segs[0]] if typed else "model"
            repo_id = "/".join(segs[1:i] if typed else segs[:i])
            if i + 1 < len(segs):
                return self._resolve(method, repo_type, repo_id, segs[i + 1], "/".join(segs[i + 2 :]))
        raise HubError(404, f"Not found: {self.path}")

    def _route_api(self, method: str, segs: list[str]) -> tuple[int, Any, dict[str, str]]:
        simple = {
            ("GET", "whoami-v2"): self._whoami,
            ("POST", "validate-yaml"): lambda: (200, {"errors": [], "warnings": []}, {}),
            ("GET", "agent-harnesses"): lambda: (200, {"standardEnvVars": [], "harnesses": {}}, {}),
            ("POST", "repos/create"): self._create_repo,
            ("DELETE", "repos/delete"): self._delete_repo,
        }
        if (method, "/".join(segs)) in simple:
            return simple[(method, "/".join(segs))]()
        if len(segs) < 3 or segs[0] not in TYPES:
            raise HubError(404, f"Not found: {self.path}")
        repo_type, repo_id, rest = TYPES[segs[0]], f"{segs[1]}/{segs[2]}", segs[3:]
        repo = self._repo(repo_type, repo_id)
        action, arg = (rest[0] if rest else ""), (rest[1] if len(rest) > 1 else "main")
        routes = {
            ("GET", ""): lambda: self._info(repo, "main"),
            ("GET", "revision"): lambda: self._info(repo, arg),
            ("GET", "tree"): lambda: self._tree(repo, arg, "/".join(rest[2:])),
            ("POST", "paths-info"): lambda: self._paths_info(repo, arg),
            ("GET", "refs"): lambda: self._refs(repo),
            ("GET", "commits"): lambda: self._commits(repo, arg),
            ("POST", "preupload"): lambda: self._preupload(repo, arg),
            ("POST", "commit"): lambda: self._commit(repo, arg),
            ("POST", "tag"): lambda: self._create_tag(repo, arg),
            ("DELETE", "tag"): lambda: self._delete_ref(repo.tags, arg),
            ("POST", "branch"): lambda: self._create_branch(repo, arg),
            ("DELETE", "branch"): lambda: self._delete_ref(repo.branches, arg),
        }
        if (method, action) not in routes:
            raise HubError(404, f"Not found: {self.path}")
        if method in ("POST", "DELETE") and action != "paths-info":
            self._require_token()
        return routes[(method, action)]()

    # ----- account / repo management --------------------------------------------------------

    def _whoami(self) -> tuple[int, Any, dict[str, str]]:
        if not self._has_token():
            raise HubError(401, "Invalid credentials in Authorization header")
        role = {"displayName": "test-token", "role": "write"}
        return (
            200,
            {
                "type": "user",
                "name": USER,
                "fullname": "Test User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": role},
            },
            {},
        )

    def _create_repo(self) -> tuple[int, Any, dict[str, str]]:
        self._require_token()
        data = self._json()
        repo_type = data.get("type") or "model"
        repo_id = f"{data.get('organization') or USER}/{data['name']}"
        url = f"{self.server.url}/{URL_PREFIX[repo_type]}{repo_id}"
        store = self.server.store
        if (repo_type, repo_id) in store.repos:
            # The client reads "url" from the 409 body when exist_ok=True.
            return 409, {"error": f"You already created this {repo_type} repo", "url": url}, {}
        private = data.get("visibility") == "private" or bool(data.get("private"))
        store.create_repo(repo_id, repo_type, private=private)
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _delete_repo(self) -> tuple[int, Any, dict[str, str]]:
        data = self._json()
        repo_type = data.get("type") or "model"
        repo = self._repo(repo_type, f"{data.get('organization') or USER}/{data['name']}")
        del self.server.store.repos[(repo_type, repo.repo_id)]
        return 200, {}, {}

    # ----- read routes ----------------------------------------------------------------------

    def _info(self, repo: Repo, rev: str) -> tuple[int, Any, dict[str, str]]:
        commit = repo.resolve(rev)
        siblings = [
            {"rfilename": p, "size": len(b), "blobId": git_blob_sha1(b)} for p, b in sorted(commit.files.items())
        ]
        info = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated and "auto",
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return 200, info, {}

    def _tree(self, repo: Repo, rev: str, path: str) -> tuple[int, Any, dict[str, str]]:
        commit = repo.resolve(rev)
        if path and not _is_dir(commit.files, path):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        return 200, _tree_entries(commit.files, path, recursive), {}

    def _paths_info(self, repo: Repo, rev: str) -> tuple[int, Any, dict[str, str]]:
        files = repo.resolve(rev).files
        form = parse_qs(self.body.decode())
        paths = form.get("paths", []) or self._json_paths()
        out = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                out.append(_file_entry(path, files[path]))
            elif _is_dir(files, path):
                out.append({"type": "directory", "path": path, "oid": _dir_oid(files, path), "size": 0})
        return 200, out, {}

    def _json_paths(self) -> list[str]:
        """paths-info also accepts a JSON body ``{"paths": [...]}`` on the real Hub."""
        try:
            return list(self._json().get("paths", []))
        except (ValueError, AttributeError):
            return []

    def _refs(self, repo: Repo) -> tuple[int, Any, dict[str, str]]:
        def ref(kind: str, name: str, oid: str) -> dict[str, str]:
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}

        out: dict[str, Any] = {
            "branches": [ref("heads", n, o) for n, o in sorted(repo.branches.items())],
            "tags": [ref("tags", n, o) for n, o in sorted(repo.tags.items())],
            "converts": [],
        }
        if self.query.get("include_prs") in ("1", "true", "True"):
            out["pullRequests"] = [{"name": n, "ref": n, "targetCommit": o} for n, o in repo.pull_requests.items()]
        return 200, out, {}

    def _commits(self, repo: Repo, rev: str) -> tuple[int, Any, dict[str, str]]:
        return (
            200,
            [
                {"id": c.oid, "title": c.title, "message": c.message, "date": c.date, "authors": [{"user": USER}]}
                for c in repo.history(rev)
            ],
            {},
        )

    def _resolve(self, method: str, repo_type: str, repo_id: str, rev: str, path: str) -> tuple[int, Any, dict]:
        """HEAD/GET /{repo}/resolve/{rev}/{path}: file bytes plus the headers the client requires."""
        repo = self._repo(repo_type, repo_id)
        commit = repo.resolve(rev)
        if repo.gated:
            raise HubError(403, f"Access to {repo_type} {repo_id} is restricted.", "GatedRepo")
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data = commit.files[path]
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{git_blob_sha1(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        byte_range = self._parse_range(len(data))
        if byte_range is None:
            return 200, data, headers
        start, end = byte_range
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return 206, data[start : end + 1], headers

    def _parse_range(self, size: int) -> tuple[int, int] | None:
        """Parse a single ``Range: bytes=a-b`` / ``a-`` / ``-n`` header (416 if unsatisfiable)."""
        spec = self.headers.get("Range", "")
        if not spec.startswith("bytes=") or "," in spec:
            return None
        first, _, last = spec[len("bytes=") :].strip().partition("-")
        if first:
            start, end = int(first), min(int(last) if last else size - 1, size - 1)
        else:
            start, end = max(size - int(last), 0), size - 1
        if start >= size or start > end:
            raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
        return start, end

    # ----- write routes ---------------------------------------------------------------------

    def _writable_ref(self, repo: Repo, rev: str) -> str:
        """Commits may only target a branch or a PR ref, never a tag or a sha."""
        if rev in repo.branches or rev in repo.pull_requests:
            return rev
        repo.resolve(rev)  # raises RevisionNotFound for unknown revisions
        raise HubError(400, f"Cannot commit to {rev!r}: not a branch")

    def _preupload(self, repo: Repo, rev: str) -> tuple[int, Any, dict[str, str]]:
        files = repo.files(self._writable_ref(repo, rev))
        answer = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None,
            }
            for f in self._json().get("files", [])
        ]
        return 200, {"files": answer, "commitOid": repo.resolve(rev).oid}, {}

    def _commit(self, repo: Repo, rev: str) -> tuple[int, Any, dict[str, str]]:
        ref = self._writable_ref(repo, rev)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "First NDJSON line must be the commit header")
        header = lines[0]["value"]
        store, pr_url = self.server.store, None
        parent = header.get("parentCommit")
        if parent and parent != repo.resolve(ref).oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        if self.query.get("create_pr") in ("1", "true", "True"):
            number = len(repo.pull_requests) + 1
            repo.pull_requests[f"refs/pr/{number}"] = repo.resolve(ref).oid
            ref, pr_url = f"refs/pr/{number}", f"{self._repo_url(repo)}/discussions/{number}"
        files = _apply_operations(repo.files(ref), lines[1:])
        commit = store.commit(repo, ref, header.get("summary", ""), header.get("description", ""), files)
        url = f"{self._repo_url(repo)}/commit/{commit.oid}"
        return 200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": pr_url}, {}

    def _create_tag(self, repo: Repo, rev: str) -> tuple[int, Any, dict[str, str]]:
        tag = self._json()["tag"]
        commit = repo.resolve(rev)
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = commit.oid
        return 200, {}, {}

    def _create_branch(self, repo: Repo, branch: str) -> tuple[int, Any, dict[str, str]]:
        if branch.startswith("refs/"):
            raise HubError(400, f"Invalid branch name: {branch}")
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        repo.branches[branch] = repo.resolve(self._json().get("startingPoint") or "main").oid
        return 200, {}, {}

    def _delete_ref(self, refs: dict[str, str], name: str) -> tuple[int, Any, dict[str, str]]:
        if name not in refs or name == "main":
            raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
        del refs[name]
        return 200, {}, {}


def _apply_operations(files: dict[str, bytes], ops: list[dict[str, Any]]) -> dict[str, bytes]:
    """Apply NDJSON commit operations (file / deletedFile / deletedFolder) to a snapshot copy."""
    for op in ops:
        key, value = op.get("key"), op.get("value", {})
        path = value.get("path", "").strip("/")
        if key == "file":
            content = value.get("content", "")
            files[path] = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            for p in [p for p in files if p.startswith(path + "/")]:
                del files[p]
        else:
            raise HubError(400, f"Unsupported commit operation {key!r} (the fake Hub only does regular files)")
    return files


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    store: HubStore
    url: str


class HubServer:
    """Handle on a running fake Hub: ``url``, ``store`` and ``shutdown()``."""

    def __init__(self, httpd: _Server, thread: threading.Thread):
        self._httpd, self._thread = httpd, thread
        self.url: str = httpd.url
        self.store: HubStore = httpd.store

    def shutdown(self) -> None:
        """Stop serving and close the listening socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def serve(host: str = "127.0.0.1", port: int = 0) -> HubServer:
    """Start a fake Hub on ``host:port`` (0 = any free port) in a daemon thread."""
    httpd = _Server((host, port), HubHandler)
    httpd.store = HubStore()
    httpd.url = f"http://{host}:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True)
    thread.start()
    return HubServer(httpd, thread)
