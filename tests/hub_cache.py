"""A Hugging Face Hub cache written by hand, and a fake Hub on the loopback interface, for tests/test_hub.py.

The cache layout is huggingface_hub's own (``file_download.py``, "Understand caching" in its docs)::

    HF_HUB_CACHE/models--ORG--REPO/
        refs/main                      the commit hash of the branch or tag, no newline
        blobs/<etag>                   the bytes: etag = sha256 for LFS files, git's blob sha1 for others
        snapshots/<commit>/<path>      a relative symbolic link to ../../blobs/<etag> (depth of <path>)
        .no_exist/<commit>/<path>      an empty file: the Hub answered 404 for it

``FakeHub`` answers ``HEAD`` and ``GET /ORG/REPO/resolve/REVISION/PATH`` the way huggingface.co does
(``X-Repo-Commit``, ``ETag``, ``Content-Length``; ``X-Error-Code`` on a 401 or 404), so the online path
of ``atmoe.hub`` runs for real, against 127.0.0.1 only, nothing from the network.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


def commit_of(label: str) -> str:
    """A 40-hex commit hash, fixed per label."""
    return hashlib.sha1(label.encode()).hexdigest()


def etag_of(path: str, data: bytes) -> str:
    if path.endswith(".safetensors"):  # an LFS file: its sha256
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """``{prefix/relative path: bytes}`` of every file under ``folder``."""
    return {
        (f"{prefix}/" if prefix else "") + p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def repo_dir(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def cache_commit(cache: Path, repo_id: str, commit: str, files: Mapping[str, bytes], refs: Sequence[str] = ()) -> Path:
    """Write ``files`` (path in the repo -> bytes) as snapshot ``commit`` of ``repo_id``; point ``refs`` at it."""
    root = repo_dir(cache, repo_id)
    for path, data in files.items():
        blob = root / "blobs" / etag_of(path, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        pointer = root / "snapshots" / commit / path
        pointer.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    (root / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    for ref in refs:
        ref_file = root / "refs" / ref
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(commit)
    return root


def mark_missing(cache: Path, repo_id: str, commit: str, path: str) -> None:
    """Record, as huggingface_hub does after a 404, that ``path`` does not exist at ``commit``."""
    marker = repo_dir(cache, repo_id) / ".no_exist" / commit / path
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]]  # commit -> path -> bytes
    refs: dict[str, str]  # branch or tag -> commit
    gated: bool = False
    private: bool = False


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""

    def answer(self, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
        self.requests.append((method, path))
        parts = path.split("/")
        if len(parts) < 6 or parts[0] != "" or parts[3] != "resolve":
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""
        repo_id, revision, file = f"{parts[1]}/{parts[2]}", unquote(parts[4]), unquote("/".join(parts[5:]))
        repo = self.repos.get(repo_id)
        if repo is None or repo.private:
            return 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""
        if repo.gated:
            message = "Access to model is restricted. You must have access to it and be authenticated to access it."
            return 401, {"X-Error-Code": "GatedRepo", "X-Error-Message": message}, b""
        commit = repo.refs.get(revision, revision if revision in repo.commits else None)
        if commit is None:
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b""
        data = repo.commits[commit].get(file)
        if data is None:
            headers = {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": commit}
            return 404, headers, b""
        return 200, {"X-Repo-Commit": commit, "ETag": f'"{etag_of(file, data)}"'}, data


@contextmanager
def serve(hub: FakeHub) -> Iterator[FakeHub]:
    """Run ``hub`` on 127.0.0.1 (a free port) while the block runs; ``hub.url`` is its endpoint."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, body: bool) -> None:
            status, headers, data = hub.answer(self.command, self.path)
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's names
            self._reply(body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._reply(body=True)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
