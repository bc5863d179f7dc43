"""Faults on the wire: the loopback Hub fails requests on purpose (`tests/hub_server.Fault`) and `push`, `pull`,
`inilora_init(factors="org/repo")` and the stock `hf download` either retry to a correct result or fail with one
clear line naming the repo and what to do. The Hub never holds a partial commit, and neither the HF cache nor this
package's cache keeps a partial factor set that a later run would trust."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load as load_safetensors

from inilora_hf import FactorSet, ModuleFactors, inilora_init
from inilora_hf.cli.app import main
from inilora_hf.errors import FactorSetCorruptError, FactorSetHubError
from inilora_hf.factorsets.cache import MANIFEST_NAME, verify_manifest
from inilora_hf.factorsets.publish import download_factor_set, push_factor_set
from inilora_hf.hub import transport as inilora_hub

REPO = "tester/tiny-llama-pissa-r8"
BASE_ID = "tester/tiny-llama"  # created on the fake Hub, so that the card links it and pushes log no warning
COMMIT = rf"/api/models/{REPO}/commit/main"
FACTORS_GET = rf"/{REPO}/resolve/[0-9a-f]{{40}}/factors\.safetensors"
METADATA_GET = rf"/{REPO}/resolve/[^/]+/inilora_factors\.json"
HF_CLI = str(Path(sys.executable).with_name("hf"))
CLIENT_TIMEOUT_S = 1  # HF_HUB_DOWNLOAD_TIMEOUT / HF_HUB_ETAG_TIMEOUT in these tests; a "slow" answer waits 2 s
TRIES = 3  # inilora_hf.hub.transport.TRIES: tries in all for what huggingface_hub does not retry
REPO_FILES = {
    ".gitattributes",
    "README.md",
    "factors.safetensors",
    "inilora_factors.json",
    "init_adapter/adapter_config.json",
    "init_adapter/adapter_model.safetensors",
}

FAULTS: dict[str, dict] = {
    "500 once": {"kind": "status", "status": 500},
    "429 Retry-After 1": {"kind": "status", "status": 429, "retry_after": 1},
    "connection dropped": {"kind": "drop"},
    "truncated body": {"kind": "truncate"},
    "corrupted body": {"kind": "corrupt"},
    "slow answer": {"kind": "slow", "delay": 2 * CLIENT_TIMEOUT_S},
}
# An altered byte in a JSON answer to an API call is not a failure HTTPS lets through; corruption is a download fault.
PUSH_FAULTS = [name for name in FAULTS if name != "corrupted body"]


@pytest.fixture(scope="module")
def factor_set(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FactorSet:
    """A PiSSA factor set of the tiny Llama (deterministic and quick), recorded for the Hub id `BASE_ID`."""
    factor_set = inilora_init(tiny_base_dir, variant="pissa", cache_dir=tmp_path_factory.mktemp("fs")).prepare()
    factor_set.base_model = BASE_ID
    return factor_set


@pytest.fixture(scope="module")
def other_factor_set(factor_set: FactorSet) -> FactorSet:
    """A different factor set for the same base (the factors negated)."""
    negated = {m: ModuleFactors(-f.lora_A, -f.lora_B, dict(f.extra)) for m, f in factor_set.factors.items()}
    return dataclasses.replace(factor_set, factors=negated)


@pytest.fixture(autouse=True)
def short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process, inilora_hf's own backoff starts at 50 ms instead of 1 s (then doubles), to keep the file fast;
    a `Retry-After` is still honoured in full, and subprocesses use the real waits."""
    monkeypatch.setattr(inilora_hub, "_FIRST_WAIT_S", 0.05)


@pytest.fixture
def faulty_hub(hub: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The fake Hub with the base model's repo, and download / metadata timeouts of `CLIENT_TIMEOUT_S` (in-process
    and in `hub.env` for subprocesses)."""
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", CLIENT_TIMEOUT_S)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", CLIENT_TIMEOUT_S)
    hub.env.update(HF_HUB_DOWNLOAD_TIMEOUT=str(CLIENT_TIMEOUT_S), HF_HUB_ETAG_TIMEOUT=str(CLIENT_TIMEOUT_S))
    hub.api.create_repo(BASE_ID)
    return hub


@pytest.fixture
def pushed(faulty_hub: SimpleNamespace, factor_set: FactorSet) -> str:
    """`factor_set` pushed to REPO without faults; the commit sha."""
    return push_factor_set(factor_set, REPO).oid


# ------------------------------------------------------------------------------------------------ checks


def _assert_same_factors(tensors: dict[str, torch.Tensor], expected: FactorSet) -> None:
    """`tensors` (flat `<module>.lora_A` / `.lora_B`) hold exactly the factors of `expected`."""
    assert sorted(tensors) == sorted(f"{m}.{ab}" for m in expected.factors for ab in ("lora_A", "lora_B"))
    for module, factors in expected.factors.items():
        assert torch.equal(tensors[f"{module}.lora_A"], factors.lora_A), module
        assert torch.equal(tensors[f"{module}.lora_B"], factors.lora_B), module


def _flat(factor_set: FactorSet) -> dict[str, torch.Tensor]:
    return {f"{m}.{ab}": getattr(f, ab) for m, f in factor_set.factors.items() for ab in ("lora_A", "lora_B")}


def _assert_repo_holds(hub: SimpleNamespace, expected: FactorSet, commits: int) -> None:
    """The repo's `main` has `commits` commits and holds the complete factor set: no partial commit."""
    repo = hub.store.repo(REPO)
    assert len(repo.history()) == commits
    files = repo.files()
    assert set(files) == REPO_FILES
    _assert_same_factors(load_safetensors(files["factors.safetensors"]), expected)
    recorded = json.loads(files["inilora_factors.json"])["files"]
    assert recorded == {"factors.safetensors": hashlib.sha256(files["factors.safetensors"]).hexdigest()}


def _assert_hf_cache_trustworthy(cache_dir: Path) -> None:
    """No partial download is left, and every blob's bytes hash to its name (the Hub's ETag: git blob sha1 for a
    regular file, sha256 for LFS), so a later `snapshot_download` / `hf download` that reuses a blob gets the real
    file."""
    assert not [p for p in cache_dir.rglob("*") if p.name.endswith(".incomplete")]
    for blob in cache_dir.glob("models--*/blobs/*"):
        data = blob.read_bytes()
        git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        assert blob.name in (git_sha1, hashlib.sha256(data).hexdigest()), f"{blob} holds other bytes than its name says"


def _assert_factor_cache_trustworthy(cache_dir: Path) -> None:
    """Every factor-set entry of this package's cache is complete (its manifest checks out)."""
    for entry in cache_dir.glob("*") if cache_dir.is_dir() else []:
        if (entry / MANIFEST_NAME).exists() or (entry / "inilora_factors.json").exists():
            verify_manifest(entry)


def _assert_later_run_is_correct(hub: SimpleNamespace, expected: FactorSet, factor_cache: Path) -> None:
    """With no fault left, a later pull gives the exact factors, and no cache holds anything it should not."""
    _assert_same_factors(_flat(FactorSet.from_pretrained(REPO)), expected)
    _assert_hf_cache_trustworthy(hub.cache_dir)
    _assert_factor_cache_trustworthy(factor_cache)


def _one_error_line(stderr: str) -> str:
    """The single line a failing command printed on stderr; no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def _run(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=120, check=False)


# ------------------------------------------------------------------------------------------------ push


@pytest.mark.parametrize("fault", PUSH_FAULTS)
@pytest.mark.parametrize("operation", ["FactorSet.push_to_hub", "inilora-hf push"])
def test_push_survives_a_fault_on_the_commit(
    faulty_hub: SimpleNamespace, factor_set: FactorSet, tmp_path: Path, capsys, operation: str, fault: str
) -> None:
    injected = faulty_hub.store.inject(method="POST", path=COMMIT, **FAULTS[fault])
    factor_set.save_pretrained(tmp_path / "fs")
    started = time.monotonic()
    if operation == "FactorSet.push_to_hub":
        oid = factor_set.push_to_hub(REPO).oid
    else:
        assert main(["push", str(tmp_path / "fs"), REPO]) == 0
        oid = capsys.readouterr().out.split("(commit ")[1].split(")")[0]
    assert time.monotonic() - started >= (injected.retry_after or 0)  # the Hub's Retry-After was honoured
    assert injected.hits == 1
    assert oid == faulty_hub.store.repo(REPO).head().oid
    # One commit on top of the initial one, also where the first commit landed and only its answer was lost.
    _assert_repo_holds(faulty_hub, factor_set, commits=2)


def test_a_push_that_keeps_failing_commits_nothing_and_says_so(
    faulty_hub: SimpleNamespace, factor_set: FactorSet, pushed: str, other_factor_set: FactorSet
) -> None:
    injected = faulty_hub.store.inject("status", "POST", COMMIT, times=TRIES, status=503)
    with pytest.raises(FactorSetHubError, match=rf"{REPO}.*HTTP 503.*run the push again") as raised:
        other_factor_set.push_to_hub(REPO)
    assert "\n" not in str(raised.value)
    assert injected.hits == TRIES
    _assert_repo_holds(faulty_hub, factor_set, commits=2)  # still the earlier, complete factor set


def test_the_push_command_that_keeps_failing_prints_one_line(
    faulty_hub: SimpleNamespace, factor_set: FactorSet, tmp_path: Path, capfd
) -> None:
    factor_set.save_pretrained(tmp_path / "fs")
    injected = faulty_hub.store.inject("drop", "POST", r"/api/repos/create", times=TRIES)
    capfd.readouterr()
    assert main(["push", str(tmp_path / "fs"), REPO]) == 2  # the console script's entry point, in-process
    line = _one_error_line(capfd.readouterr().err)
    assert line.startswith("inilora-hf push: error: ") and REPO in line and "run the push again" in line
    assert injected.hits == TRIES
    assert ("POST", COMMIT) not in faulty_hub.store.requests


def test_a_rate_limit_longer_than_a_minute_fails_at_once_naming_the_wait(
    faulty_hub: SimpleNamespace, factor_set: FactorSet
) -> None:
    injected = faulty_hub.store.inject("status", "POST", COMMIT, status=429, retry_after=3600)
    with pytest.raises(FactorSetHubError, match=r"HTTP 429 .*Retry-After: 3600 s"):
        factor_set.push_to_hub(REPO)
    assert injected.hits == 1 and len(faulty_hub.store.repo(REPO).history()) == 1


def test_a_pull_request_whose_answer_was_lost_is_not_opened_twice(
    faulty_hub: SimpleNamespace, factor_set: FactorSet
) -> None:
    faulty_hub.api.create_repo(REPO)
    faulty_hub.store.inject("drop", "POST", COMMIT)
    with pytest.raises(FactorSetHubError, match=r"pull requests"):
        factor_set.push_to_hub(REPO, create_pr=True)
    assert list(faulty_hub.store.repo(REPO).pull_requests) == ["refs/pr/1"]


# ------------------------------------------------------------------------------------------------ download


def _download(operation: str, hub: SimpleNamespace, base_dir: Path, capsys) -> dict[str, torch.Tensor] | None:
    """Fetch REPO's factor set the way `operation` does; its factors, or None where the command failed."""
    if operation == "inilora-hf pull":
        assert main(["pull", REPO]) == 0
        return _flat(FactorSet.from_pretrained(capsys.readouterr().out.strip().splitlines()[-1]))
    if operation == "inilora_init":
        model = inilora_init(base_dir, factors=REPO)()
        layers = {m: model.get_submodule(f"base_model.model.{m}") for m in model.factor_set.factors}
        return {
            f"{m}.{ab}": getattr(layer, ab)["default"].weight.detach()
            for m, layer in layers.items()
            for ab in ("lora_A", "lora_B")
        }
    run = _run(HF_CLI, "download", REPO, "--quiet", env=hub.env)
    if run.returncode != 0:
        return None
    files = Path(run.stdout.strip().splitlines()[-1])
    return load_safetensors((files / "factors.safetensors").read_bytes())


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("operation", ["inilora-hf pull", "inilora_init", "hf download"])
def test_download_survives_a_fault_or_leaves_nothing_it_would_trust(
    faulty_hub: SimpleNamespace,
    factor_set: FactorSet,
    pushed: str,
    tiny_base_dir: Path,
    isolated_factor_cache: Path,
    capsys,
    operation: str,
    fault: str,
) -> None:
    injected = faulty_hub.store.inject(method="GET", path=FACTORS_GET, **FAULTS[fault])
    tensors = _download(operation, faulty_hub, tiny_base_dir, capsys)
    assert injected.hits == 1
    if operation != "hf download":  # inilora_hf: always retried to the exact factors
        _assert_same_factors(tensors, factor_set)
    # The stock CLI may fail, or (on a corrupted body, which it cannot detect) cache a damaged blob: the next
    # inilora_hf run must neither trust that nor fail on it.
    _assert_later_run_is_correct(faulty_hub, factor_set, isolated_factor_cache)
    assert faulty_hub.store.repo(REPO).head().oid == pushed


def test_a_damaged_metadata_file_is_fetched_again_not_trusted(
    faulty_hub: SimpleNamespace, factor_set: FactorSet, pushed: str, isolated_factor_cache: Path
) -> None:
    # inilora_factors.json has no recorded checksum of its own: it is checked against its Hub ETag.
    injected = faulty_hub.store.inject("corrupt", "GET", METADATA_GET)
    _assert_same_factors(_flat(FactorSet.from_pretrained(REPO)), factor_set)
    assert injected.hits == 1
    _assert_later_run_is_correct(faulty_hub, factor_set, isolated_factor_cache)


def test_a_dropped_metadata_request_is_retried(faulty_hub: SimpleNamespace, factor_set: FactorSet, pushed: str) -> None:
    injected = faulty_hub.store.inject("drop", "HEAD", METADATA_GET)  # huggingface_hub does not retry this one
    _assert_same_factors(_flat(FactorSet.from_pretrained(REPO)), factor_set)
    assert injected.hits == 1


def test_a_download_that_keeps_arriving_damaged_is_refused_and_not_kept(
    faulty_hub: SimpleNamespace, factor_set: FactorSet, pushed: str, isolated_factor_cache: Path
) -> None:
    injected = faulty_hub.store.inject("corrupt", "GET", FACTORS_GET, times=TRIES)
    with pytest.raises(FactorSetCorruptError, match=rf"factors\.safetensors of the factor set '{REPO}'.*Push"):
        download_factor_set(REPO)
    assert injected.hits == TRIES
    _assert_hf_cache_trustworthy(faulty_hub.cache_dir)
    _assert_later_run_is_correct(faulty_hub, factor_set, isolated_factor_cache)


@pytest.mark.parametrize("operation", ["inilora_init", "hf download"])
def test_a_download_that_keeps_failing_fails_cleanly_and_keeps_no_partial_file(
    faulty_hub: SimpleNamespace,
    factor_set: FactorSet,
    pushed: str,
    tiny_base_dir: Path,
    isolated_factor_cache: Path,
    operation: str,
) -> None:
    injected = faulty_hub.store.inject("status", "GET", FACTORS_GET, times=TRIES, status=500)
    if operation == "inilora_init":
        with pytest.raises(FactorSetHubError, match=rf"{REPO}.*HTTP 500.*no partial file") as raised:
            inilora_init(tiny_base_dir, factors=REPO)()
        assert "\n" not in str(raised.value) and injected.hits == TRIES
    else:
        run = _run(HF_CLI, "download", REPO, "--quiet", env=faulty_hub.env)
        assert run.returncode != 0 and "500" in run.stderr
    assert not list(faulty_hub.cache_dir.glob(f"models--*/snapshots/{pushed}/factors.safetensors"))
    _assert_hf_cache_trustworthy(faulty_hub.cache_dir)
    injected.times = injected.hits  # the Hub recovers
    _assert_later_run_is_correct(faulty_hub, factor_set, isolated_factor_cache)


def test_the_pull_command_that_keeps_failing_prints_one_line(
    faulty_hub: SimpleNamespace, factor_set: FactorSet, pushed: str, capfd
) -> None:
    injected = faulty_hub.store.inject("truncate", "GET", FACTORS_GET, times=TRIES)
    capfd.readouterr()
    assert main(["pull", REPO]) == 2  # the console script's entry point, in-process
    line = _one_error_line(capfd.readouterr().err)
    assert line.startswith("inilora-hf pull: error: ") and REPO in line and "Consistency check failed" in line
    assert "run again" in line and injected.hits == TRIES
    _assert_hf_cache_trustworthy(faulty_hub.cache_dir)
