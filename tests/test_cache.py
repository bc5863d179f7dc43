"""Tests for inilora_hf.factorsets.cache: keys, atomic builds, locking across processes, corruption."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from inilora_hf.factorsets import cache
from inilora_hf.factorsets.cache import (
    MANIFEST_NAME,
    CacheEntryCorruptError,
    CacheLookup,
    default_cache_dir,
    entry_path,
    get_or_build,
    remove,
    resumable_dir,
    verify_manifest,
    write_manifest,
)

CACHE_PY = Path(cache.__file__).resolve()
#: The logger that get_or_build warns through.
ENTRIES_LOGGER = "inilora_hf.factorsets.cache.entries"
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, deterministic


class CountingBuild:
    """A build callable that records how often it ran."""

    def __init__(self, payload: bytes = PAYLOAD) -> None:
        self.calls = 0
        self.payload = payload

    def __call__(self, tmp: Path) -> None:
        self.calls += 1
        (tmp / "A.bin").write_bytes(self.payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "meta.json").write_text(json.dumps({"rank": 8}))


def _visible_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and not p.name.endswith(".lock"))


def _tmp_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-"))


# ----------------------------------------------------------------------- basics


def test_miss_then_hit(tmp_path: Path) -> None:
    build = CountingBuild()
    first = get_or_build("k1", build, cache_dir=tmp_path)
    assert isinstance(first, CacheLookup)
    assert first.hit is False
    assert first.path == tmp_path / "k1" == entry_path("k1", tmp_path)
    assert build.calls == 1

    second = get_or_build("k1", build, cache_dir=tmp_path)
    assert second.hit is True
    assert second.path == first.path
    assert build.calls == 1
    assert (second.path / "A.bin").read_bytes() == PAYLOAD
    assert json.loads((second.path / "sub" / "meta.json").read_text()) == {"rank": 8}
    manifest = json.loads((second.path / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"A.bin", "sub/meta.json"}
    assert manifest["files"]["A.bin"]["size"] == len(PAYLOAD)
    assert not (tmp_path / "k1.lock").exists(), "the lock file is removed when the lock is released"
    assert _visible_entries(tmp_path) == ["k1"]
    assert _tmp_dirs(tmp_path) == []


def test_validate_called_on_hit_and_failure_triggers_rebuild(tmp_path: Path, caplog) -> None:
    build = CountingBuild()
    seen: list[Path] = []

    def validate(path: Path) -> None:
        seen.append(path)
        if (path / "poison").exists():  # files not in the manifest are ignored by verify_manifest
            raise RuntimeError("bad tensor shapes")

    entry = get_or_build("kv", build, cache_dir=tmp_path, validate=validate).path
    assert len(seen) == 1 and seen[0].name.startswith(".tmp-kv-")  # fresh build validated before publishing
    assert get_or_build("kv", build, cache_dir=tmp_path, validate=validate).hit is True
    assert seen[-1] == entry and build.calls == 1

    (entry / "poison").write_text("")
    with caplog.at_level(logging.WARNING, logger=ENTRIES_LOGGER):
        res = get_or_build("kv", build, cache_dir=tmp_path, validate=validate)
    assert res.hit is False and build.calls == 2
    assert not (res.path / "poison").exists()
    assert "bad tensor shapes" in caplog.text and "'kv'" in caplog.text and str(entry) in caplog.text


def test_build_raising_leaves_no_entry(tmp_path: Path) -> None:
    def failing(tmp: Path) -> None:
        (tmp / "A.bin").write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        get_or_build("kf", failing, cache_dir=tmp_path)
    assert not (tmp_path / "kf").exists()
    assert _visible_entries(tmp_path) == []
    assert _tmp_dirs(tmp_path) == []

    build = CountingBuild()
    res = get_or_build("kf", build, cache_dir=tmp_path)
    assert res.hit is False and build.calls == 1
    assert (res.path / "A.bin").read_bytes() == PAYLOAD


def test_validate_failing_on_fresh_build_caches_nothing(tmp_path: Path) -> None:
    def validate(path: Path) -> None:
        raise ValueError("never valid")

    with pytest.raises(ValueError, match="never valid"):
        get_or_build("kx", CountingBuild(), cache_dir=tmp_path, validate=validate)
    assert not (tmp_path / "kx").exists()
    assert _tmp_dirs(tmp_path) == []


# ------------------------------------------------------------------- corruption


def _corrupt_flip(entry: Path) -> None:
    data = bytearray((entry / "A.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (entry / "A.bin").write_bytes(bytes(data))


def _corrupt_truncate(entry: Path) -> None:
    with open(entry / "A.bin", "r+b") as fh:
        fh.truncate(1000)


def _corrupt_drop_manifest(entry: Path) -> None:
    (entry / MANIFEST_NAME).unlink()


def _corrupt_drop_file(entry: Path) -> None:
    (entry / "sub" / "meta.json").unlink()


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (_corrupt_flip, "checksum mismatch"),
        (_corrupt_truncate, "size mismatch"),
        (_corrupt_drop_manifest, "missing"),
        (_corrupt_drop_file, "meta.json is missing"),
    ],
    ids=["bitflip", "truncate", "no-manifest", "missing-file"],
)
def test_corruption_is_detected_logged_and_rebuilt(tmp_path: Path, caplog, corrupt, expected: str) -> None:
    build = CountingBuild()
    entry = get_or_build("kc", build, cache_dir=tmp_path).path
    corrupt(entry)

    with caplog.at_level(logging.WARNING, logger=ENTRIES_LOGGER):
        res = get_or_build("kc", build, cache_dir=tmp_path)
    assert res.hit is False
    assert build.calls == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == ENTRIES_LOGGER]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "'kc'" in msg and str(entry) in msg and expected in msg
    # The rebuilt entry is intact and passes verification; no leftovers.
    assert (res.path / "A.bin").read_bytes() == PAYLOAD
    verify_manifest(res.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kc"]
    # ...and is a hit again afterwards.
    assert get_or_build("kc", build, cache_dir=tmp_path).hit is True
    assert build.calls == 2


def test_check_hashes_false_skips_checksum_but_not_size(tmp_path: Path) -> None:
    build = CountingBuild()
    entry = get_or_build("kh", build, cache_dir=tmp_path).path
    _corrupt_flip(entry)
    assert get_or_build("kh", build, cache_dir=tmp_path, check_hashes=False).hit is True
    _corrupt_truncate(entry)
    assert get_or_build("kh", build, cache_dir=tmp_path, check_hashes=False).hit is False
    assert build.calls == 2


def test_verify_manifest_messages(tmp_path: Path) -> None:
    d = tmp_path / "fs"
    d.mkdir()
    with pytest.raises(CacheEntryCorruptError, match="missing"):
        verify_manifest(d)
    (d / "x.safetensors").write_bytes(b"0123456789")
    manifest = write_manifest(d)
    assert manifest["files"]["x.safetensors"]["size"] == 10
    verify_manifest(d)
    (d / "extra.txt").write_text("unlisted files are ignored")
    verify_manifest(d)

    (d / "x.safetensors").write_bytes(b"0123456780")
    with pytest.raises(CacheEntryCorruptError, match=r"x\.safetensors: sha256 checksum mismatch"):
        verify_manifest(d)
    verify_manifest(d, check_hashes=False)  # same size -> only the hash differs
    (d / "x.safetensors").write_bytes(b"01")
    with pytest.raises(CacheEntryCorruptError, match=r"x\.safetensors: size mismatch \(expected 10 bytes, found 2\)"):
        verify_manifest(d)
    (d / "x.safetensors").unlink()
    with pytest.raises(CacheEntryCorruptError, match=r"x\.safetensors is missing"):
        verify_manifest(d)
    (d / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CacheEntryCorruptError, match="not valid JSON"):
        verify_manifest(d)
    (d / MANIFEST_NAME).write_text(json.dumps({"files": {"../evil": {"size": 1, "sha256": "0"}}}))
    with pytest.raises(CacheEntryCorruptError, match="outside the directory"):
        verify_manifest(d)
    assert issubclass(CacheEntryCorruptError, ValueError)


# ------------------------------------------------------------------- resumable


def test_resumable_dir_survives_failure_and_is_removed_after_success(tmp_path: Path) -> None:
    work = resumable_dir("kr", cache_dir=tmp_path)
    assert work == tmp_path / ".partial-kr" and work.is_dir()
    computed: list[int] = []

    def build(tmp: Path, fail_after: int | None) -> None:
        w = resumable_dir("kr", cache_dir=tmp_path)
        for i in range(3):
            chunk = w / f"group-{i:03d}.bin"
            if not chunk.exists():
                computed.append(i)
                chunk.write_bytes(bytes([i]) * 10)
            if fail_after is not None and i == fail_after:
                raise KeyboardInterrupt  # simulated interruption (BaseException)
        for i in range(3):
            os.replace(w / f"group-{i:03d}.bin", tmp / f"group-{i:03d}.bin")

    with pytest.raises(KeyboardInterrupt):
        get_or_build("kr", lambda t: build(t, fail_after=1), cache_dir=tmp_path)
    assert computed == [0, 1]
    assert sorted(p.name for p in work.iterdir()) == ["group-000.bin", "group-001.bin"]
    assert not (tmp_path / "kr").exists()

    res = get_or_build("kr", lambda t: build(t, fail_after=None), cache_dir=tmp_path)
    assert res.hit is False
    assert computed == [0, 1, 2]  # chunks 0 and 1 were resumed, not recomputed
    assert (res.path / "group-002.bin").read_bytes() == b"\x02" * 10
    assert not work.exists()


def test_remove(tmp_path: Path) -> None:
    build = CountingBuild()
    get_or_build("kd", build, cache_dir=tmp_path)
    resumable_dir("kd", cache_dir=tmp_path)
    assert remove("kd", tmp_path) is True
    assert not (tmp_path / "kd").exists() and not (tmp_path / ".partial-kd").exists()
    assert remove("kd", tmp_path) is False
    assert remove("kd", tmp_path / "does-not-exist") is False
    assert get_or_build("kd", build, cache_dir=tmp_path).hit is False
    assert build.calls == 2


# ------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    "key",
    ["", "a/b", "a\\b", "..", "a..b", "../x", ".hidden", "sp ace", "ümlaut", "x:y", "k.lock", "a" * 201],
)
def test_invalid_keys_raise(tmp_path: Path, key: str) -> None:
    build = CountingBuild()
    with pytest.raises(ValueError, match="Invalid cache key") as info:
        get_or_build(key, build, cache_dir=tmp_path)
    assert repr(key) in str(info.value)
    with pytest.raises(ValueError, match="Invalid cache key"):
        entry_path(key, tmp_path)
    with pytest.raises(ValueError, match="Invalid cache key"):
        resumable_dir(key, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="Invalid cache key"):
        remove(key, tmp_path)
    assert build.calls == 0
    assert list(tmp_path.iterdir()) == []


def test_valid_key_characters(tmp_path: Path) -> None:
    key = "Qwen2.5-0.5B_inilora-r16.v1"
    assert get_or_build(key, CountingBuild(), cache_dir=tmp_path).path == tmp_path / key


# ------------------------------------------------------------------- cache dir


def test_default_cache_dir_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("INILORA_HF_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "inilora"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "huggingface" / "inilora"

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert default_cache_dir() == tmp_path / "hf" / "inilora"

    monkeypatch.setenv("HF_HOME", "~/hfhome")
    assert default_cache_dir() == tmp_path / "home" / "hfhome" / "inilora"

    monkeypatch.setenv("INILORA_HF_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"

    build = CountingBuild()
    res = get_or_build("kenv", build, validate=None)
    assert res.path == tmp_path / "explicit" / "kenv" and res.hit is False
    assert entry_path("kenv") == res.path


def test_default_cache_dir_matches_huggingface_hub_when_env_unchanged(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("INILORA_HF_CACHE", raising=False)
    assert default_cache_dir() == Path(constants.HF_HOME) / "inilora"


# ------------------------------------------------------------ multi-process


_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path

    from inilora_hf.factorsets import cache as mod

    root, key, mode, sync = Path(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5])

    def build(tmp):
        with open(root.parent / "counter.txt", "a") as fh:
            fh.write(f"{os.getpid()}\\n")
        (tmp / "A.bin").write_bytes(b"x" * 4096)
        if mode == "hang":
            (sync / "building").write_text(str(tmp))
            time.sleep(60)
        else:
            time.sleep(1.0)
        (tmp / "B.bin").write_bytes(str(os.getpid()).encode())

    # Barrier: announce readiness, then wait until every worker is ready.
    n = int(sys.argv[6])
    (sync / f"ready-{os.getpid()}").touch()
    deadline = time.time() + 30
    while len(list(sync.glob("ready-*"))) < n and time.time() < deadline:
        time.sleep(0.005)
    res = mod.get_or_build(key, build, cache_dir=root)
    print(json.dumps({"path": str(res.path), "hit": res.hit, "pid": os.getpid()}))
    """
)


def _spawn(tmp_path: Path, root: Path, key: str, mode: str, n: int) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    if not script.exists():
        script.write_text(_WORKER)
    sync = tmp_path / "sync"
    sync.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(script), str(CACHE_PY), str(root), key, mode, str(sync), str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_processes_build_once(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    procs = [_spawn(tmp_path, root, "shared", "normal", 2) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))

    lines = (tmp_path / "counter.txt").read_text().splitlines()
    assert len(lines) == 1
    assert results[0]["path"] == results[1]["path"] == str(root / "shared")
    assert sorted(r["hit"] for r in results) == [False, True]
    builder = next(r for r in results if not r["hit"])
    assert lines == [str(builder["pid"])]
    assert (root / "shared" / "B.bin").read_bytes() == str(builder["pid"]).encode()
    verify_manifest(root / "shared")
    assert _tmp_dirs(root) == []


def test_sigkill_during_build_leaves_no_entry(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    proc = _spawn(tmp_path, root, "killed", "hang", 1)
    marker = tmp_path / "sync" / "building"
    deadline = time.time() + 30
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "worker never started building"
        time.sleep(0.01)
    stale_tmp = Path(marker.read_text())
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    assert stale_tmp.is_dir() and stale_tmp.name.startswith(".tmp-killed-")
    assert not (root / "killed").exists()

    build = CountingBuild()
    res = get_or_build("killed", build, cache_dir=root)  # the dead process's lock is released
    assert res.hit is False and build.calls == 1
    assert not stale_tmp.exists()
    assert _tmp_dirs(root) == []
    assert (res.path / "A.bin").read_bytes() == PAYLOAD


def test_stale_cleanup_does_not_touch_other_keys(tmp_path: Path) -> None:
    # ".tmp-a-b-..." belongs to key "a-b", not to key "a".
    other = tmp_path / f".tmp-a-b-123-{'0' * 32}"
    other.mkdir(parents=True)
    mine = tmp_path / f".tmp-a-456-{'f' * 32}"
    mine.mkdir()
    get_or_build("a", CountingBuild(), cache_dir=tmp_path)
    assert other.exists()
    assert not mine.exists()


def test_lock_timeout(tmp_path: Path) -> None:
    from filelock import FileLock, Timeout

    with FileLock(str(tmp_path / "kt.lock")):
        start = time.monotonic()
        with pytest.raises(Timeout):
            get_or_build("kt", CountingBuild(), cache_dir=tmp_path, lock_timeout=0.2)
        assert time.monotonic() - start < 5
    assert not (tmp_path / "kt").exists()
