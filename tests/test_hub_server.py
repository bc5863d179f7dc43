"""Self-tests of the fake Hub (tests/hub_server.py) driven by the real huggingface_hub client and CLI."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import (  # 2.4: no longer top-level names
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

REPO = "tester/tiny"
README = "---\nlicense: apache-2.0\nlibrary_name: inilora\ntags:\n- lora\n---\n\n# Tiny\n\nA test card.\n"


def _safetensors_bytes(metadata: dict[str, str]) -> bytes:
    """A valid two-tensor safetensors file, built by hand so the test needs no torch/numpy."""
    data = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0) + struct.pack("<2f", 5.0, 6.0)
    header = {
        "__metadata__": metadata,
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw + data


def _make_folder(root: Path) -> dict[str, bytes]:
    """Write a small model folder (safetensors, card, nested subfolder); return path -> bytes."""
    files = {
        "factors.safetensors": _safetensors_bytes({"method": "pissa", "rank": "2"}),
        "README.md": README.encode(),
        "sub/config.json": b'{"r": 2}\n',
        "sub/deeper/notes.txt": b"hello\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _read_tree(folder: Path) -> dict[str, bytes]:
    """All regular files under ``folder`` (following cache symlinks), skipping client metadata."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(folder).parts
    }


@pytest.fixture
def pushed(hub: SimpleNamespace, tmp_path: Path) -> dict[str, bytes]:
    """REPO created on the fake Hub with the folder from ``_make_folder`` pushed to main."""
    src = tmp_path / "src"
    files = _make_folder(src)
    hub.api.create_repo(REPO)
    hub.api.upload_folder(repo_id=REPO, folder_path=src, commit_message="add files")
    return files


def test_upload_then_download_is_byte_identical(hub: SimpleNamespace, pushed: dict[str, bytes]) -> None:
    repo = hub.store.repo(REPO)
    assert [c.title for c in repo.history("main")][-1] == "initial commit"
    assert {k: v for k, v in repo.files().items() if k != ".gitattributes"} == pushed

    snapshot = Path(hub.api.snapshot_download(REPO))
    assert snapshot.is_relative_to(hub.cache_dir)
    assert _read_tree(snapshot) == {**pushed, ".gitattributes": repo.files()[".gitattributes"]}

    # Re-pushing identical files is a no-op: the client compares preupload "oid" with its git sha1.
    hub.api.upload_folder(repo_id=REPO, folder_path=snapshot, ignore_patterns=[".gitattributes"])
    assert len(repo.history()) == 2

    single = hf_hub_download(REPO, "sub/deeper/notes.txt")  # module-level function: global endpoint
    assert Path(single).read_bytes() == pushed["sub/deeper/notes.txt"]
    # The per-file HEAD answered X-Repo-Commit = head of main, so the snapshot folder is named after it.
    assert snapshot.name == repo.head("main").oid


def test_old_commit_stays_downloadable(hub: SimpleNamespace) -> None:
    hub.api.create_repo(REPO)
    first = hub.api.upload_file(path_or_fileobj=b"v1", path_in_repo="w.bin", repo_id=REPO)
    second = hub.api.upload_file(path_or_fileobj=b"v2", path_in_repo="w.bin", repo_id=REPO)

    assert len(first.oid) == len(second.oid) == 40 and first.oid != second.oid
    assert hub.store.repo(REPO).commits[second.oid].parent == first.oid
    assert Path(hub.api.hf_hub_download(REPO, "w.bin", revision=first.oid)).read_bytes() == b"v1"
    assert Path(hub.api.hf_hub_download(REPO, "w.bin")).read_bytes() == b"v2"
    old_snapshot = Path(snapshot_download(REPO, revision=first.oid))
    assert (old_snapshot / "w.bin").read_bytes() == b"v1"
    assert [c.commit_id for c in hub.api.list_repo_commits(REPO)][:2] == [second.oid, first.oid]


def test_refs_tree_and_paths_info(hub: SimpleNamespace, pushed: dict[str, bytes]) -> None:
    api = hub.api
    head = api.model_info(REPO).sha
    api.create_tag(REPO, tag="v1")
    api.create_branch(REPO, branch="dev")
    api.upload_file(path_or_fileobj=b"new", path_in_repo="extra.txt", repo_id=REPO, revision="dev")

    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches}["main"] == head
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": head}
    assert api.file_exists(REPO, "extra.txt", revision="dev") and not api.file_exists(REPO, "extra.txt")

    top = {e.path: type(e).__name__ for e in api.list_repo_tree(REPO)}
    assert top == {
        ".gitattributes": "RepoFile",
        "README.md": "RepoFile",
        "factors.safetensors": "RepoFile",
        "sub": "RepoFolder",
    }
    deep = {e.path for e in api.list_repo_tree(REPO, path_in_repo="sub", recursive=True)}
    assert deep == {"sub/config.json", "sub/deeper", "sub/deeper/notes.txt"}
    info = {e.path: e for e in api.get_paths_info(REPO, ["README.md", "sub", "missing"], revision="v1")}
    assert set(info) == {"README.md", "sub"} and info["README.md"].size == len(pushed["README.md"])
    assert api.model_info(REPO, revision="v1").sha == head
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_tag(REPO, tag="v1")
    assert exc.value.response.status_code == 409


def _http(method: str, url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """Raw request with urllib (no HF client), returning status, headers and body."""
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_resolve_headers_range_and_error_codes(hub: SimpleNamespace, pushed: dict[str, bytes]) -> None:
    from huggingface_hub.utils.sha import git_hash  # the Hub's ETag for regular files is the git blob sha1

    repo, data = hub.store.repo(REPO), pushed["factors.safetensors"]
    url = f"{hub.url}/{REPO}/resolve/main/factors.safetensors"
    status, headers, body = _http("HEAD", url)
    assert (status, body) == (200, b"")
    assert headers["ETag"] == f'"{git_hash(data)}"' and headers["Content-Length"] == str(len(data))
    assert headers["X-Repo-Commit"] == repo.head().oid

    status, headers, body = _http("GET", url, Range="bytes=0-7")
    assert (status, body, headers["Content-Range"]) == (206, data[:8], f"bytes 0-7/{len(data)}")
    assert _http("GET", url, Range="bytes=-4")[2] == data[-4:]
    assert _http("GET", url, Range=f"bytes={len(data)}-")[0] == 416

    codes = {
        f"{hub.url}/tester/nope/resolve/main/x": "RepoNotFound",
        f"{hub.url}/{REPO}/resolve/nope/README.md": "RevisionNotFound",
        f"{hub.url}/{REPO}/resolve/main/nope.md": "EntryNotFound",
    }
    for bad_url, code in codes.items():
        status, headers, _ = _http("HEAD", bad_url)
        assert (status, headers.get("X-Error-Code")) == (404, code)
    assert _http("HEAD", f"{hub.url}/{REPO}/resolve/main/nope.md")[1]["X-Repo-Commit"] == repo.head().oid


def test_model_card_and_remote_safetensors_header(hub: SimpleNamespace, pushed: dict[str, bytes]) -> None:
    card = ModelCard.load(REPO)  # no endpoint argument: relies on the patched constants.ENDPOINT
    assert card.data.license == "apache-2.0" and card.data.tags == ["lora"]
    assert "A test card." in card.text

    # Reads only the header through HTTP Range requests (206 answers).
    meta = hub.api.parse_safetensors_file_metadata(REPO, "factors.safetensors")
    assert meta.metadata == {"method": "pissa", "rank": "2"}
    assert meta.tensors["a"].shape == [2, 2] and meta.parameter_count == {"F32": 6}


def test_cli_download_in_subprocess(hub: SimpleNamespace, pushed: dict[str, bytes], tmp_path: Path) -> None:
    hf = shutil.which("hf", path=str(Path(sys.executable).parent))
    cmd = [hf] if hf else [sys.executable, "-m", "huggingface_hub.cli.hf"]
    out = tmp_path / "out"
    proc = subprocess.run(
        [*cmd, "download", REPO, "--local-dir", str(out)], env=hub.env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert {k: v for k, v in _read_tree(out).items() if k != ".gitattributes"} == pushed
    assert ("GET", f"/{REPO}/resolve/{hub.store.repo(REPO).head().oid}/factors.safetensors") in hub.store.requests


def test_error_mapping(hub: SimpleNamespace, pushed: dict[str, bytes]) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hub.api.hf_hub_download("tester/nope", "README.md")
    with pytest.raises(RepositoryNotFoundError):
        hub.api.model_info("tester/nope")
    with pytest.raises(RemoteEntryNotFoundError) as missing:
        hub.api.hf_hub_download(REPO, "missing.txt")
    assert isinstance(missing.value, EntryNotFoundError)
    with pytest.raises(RevisionNotFoundError):
        hub.api.hf_hub_download(REPO, "README.md", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hub.api.snapshot_download(REPO, revision="f" * 40)
    with pytest.raises(HfHubHTTPError) as conflict:
        hub.api.create_repo(REPO)
    assert conflict.value.response.status_code == 409
    assert hub.api.create_repo(REPO, exist_ok=True).repo_id == REPO  # reads "url" from the 409 body


def test_push_without_token_is_401(hub: SimpleNamespace, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    hub.api.create_repo(REPO)
    anonymous = HfApi(endpoint=hub.url, token=False)  # token=False: send no Authorization header
    with pytest.raises(HfHubHTTPError) as exc:
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert exc.value.response.status_code == 401
    assert "Invalid username or password." in str(exc.value)
    with pytest.raises(HfHubHTTPError) as exc:
        anonymous.create_repo("tester/other")
    assert exc.value.response.status_code == 401
    assert len(hub.store.repo(REPO).history()) == 1 and ("model", "tester/other") not in hub.store.repos


def test_offline_mode(hub: SimpleNamespace, pushed: dict[str, bytes]) -> None:
    with hub.offline():
        with pytest.raises(LocalEntryNotFoundError):
            hf_hub_download(REPO, "README.md")
        with pytest.raises(LocalEntryNotFoundError):
            snapshot_download(REPO)

    online = snapshot_download(REPO)
    seen = len(hub.store.requests)
    with hub.offline():
        assert snapshot_download(REPO) == online
        assert Path(hf_hub_download(REPO, "README.md")).read_bytes() == pushed["README.md"]
    assert len(hub.store.requests) == seen  # offline really sent nothing


def test_cli_offline_uses_cache(hub: SimpleNamespace, pushed: dict[str, bytes]) -> None:
    online = hub.api.snapshot_download(REPO)
    hub.store.requests.clear()
    proc = subprocess.run(
        [sys.executable, "-m", "huggingface_hub.cli.hf", "download", REPO, "--quiet"],
        env=hub.offline_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == online and hub.store.requests == []


def test_commit_operations_pr_and_private(hub: SimpleNamespace, pushed: dict[str, bytes]) -> None:
    api, head = hub.api, hub.store.repo(REPO).head().oid
    info = api.create_commit(
        REPO,
        [CommitOperationDelete("sub/"), CommitOperationAdd("n.txt", b"n")],
        commit_message="via PR",
        create_pr=True,
    )
    assert info.pr_url.endswith("/discussions/1") and hub.store.repo(REPO).head().oid == head
    pr_files = hub.store.repo(REPO).files("refs/pr/1")
    assert "n.txt" in pr_files and not any(p.startswith("sub/") for p in pr_files)
    assert [r.ref for r in api.list_repo_refs(REPO, include_pull_requests=True).pull_requests] == ["refs/pr/1"]

    api.create_repo("tester/secret", private=True)
    assert api.model_info("tester/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/secret", token=False)


def test_dataset_repo_roundtrip(hub: SimpleNamespace) -> None:
    hub.api.create_repo("tester/data", repo_type="dataset")
    hub.api.upload_file(
        path_or_fileobj=b'{"x": 1}\n', path_in_repo="train.jsonl", repo_id="tester/data", repo_type="dataset"
    )
    path = hub.api.hf_hub_download("tester/data", "train.jsonl", repo_type="dataset")
    assert Path(path).read_bytes() == b'{"x": 1}\n'
    assert "datasets--tester--data" in path
    with pytest.raises(RepositoryNotFoundError):
        hub.api.hf_hub_download("tester/data", "train.jsonl")  # wrong repo type
