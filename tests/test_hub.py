"""Factor-set repos on a (fake, loopback) Hub: push, `hf download`, pull by revision, offline, model card,
plain-PEFT consumption of `init_adapter/`, and the errors users hit."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from inilora_hf import FactorSet, InitConfig, inilora_init
from inilora_hf.errors import (
    FactorSetCorruptError,
    FactorSetMismatchError,
    FactorSetNotFoundError,
    HubAuthenticationError,
)
from inilora_hf.factorsets.card import MAX_TABLE_ROWS, factor_set_card
from inilora_hf.factorsets.publish import download_factor_set, push_factor_set
from inilora_hf.hub.transport import snapshot_commit
from tests.conftest import tiny_llama

REPO = "tester/tiny-llama-inilora-r8"
BASE_ID = "org/tiny-llama"
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
HF_CLI = str(Path(sys.executable).with_name("hf"))


def _factor_set(base_dir: Path, tmp: Path, variant: str = "inilora") -> FactorSet:
    options = {"steps": 200} if variant == "inilora" else {}
    factor_set = inilora_init(base_dir, variant=variant, cache_dir=tmp, **options).prepare()
    factor_set.base_model = BASE_ID
    return factor_set


@pytest.fixture(scope="module")
def factor_set(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FactorSet:
    """An IniLoRA factor set of the tiny Llama, recorded as computed for the Hub id `org/tiny-llama`."""
    return _factor_set(tiny_base_dir, tmp_path_factory.mktemp("factor-cache"))


@pytest.fixture(scope="module")
def other_factor_set(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FactorSet:
    """A second, different factor set for the same base (PiSSA: deterministic and fast)."""
    return _factor_set(tiny_base_dir, tmp_path_factory.mktemp("factor-cache-2"), variant="pissa")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def _assert_same_tensors(actual: FactorSet, expected: FactorSet) -> None:
    assert sorted(actual.factors) == sorted(expected.factors)
    for name, factors in expected.factors.items():
        assert torch.equal(actual.factors[name].lora_A, factors.lora_A), name
        assert torch.equal(actual.factors[name].lora_B, factors.lora_B), name


def _hf(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HF_CLI, *args], env=env, capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------------------------ round trip


def test_push_hf_download_and_reload_reproduce_the_init(hub, factor_set: FactorSet, tiny_base_dir: Path) -> None:
    info = push_factor_set(factor_set, REPO)

    repo = hub.store.repo(REPO)
    assert next(c.oid for c in repo.history()) == info.oid
    assert len(repo.history()) == 2, "factors, metadata, card and init_adapter/ must arrive in ONE commit"
    assert sorted(repo.files()) == [
        ".gitattributes",
        "README.md",
        "factors.safetensors",
        "inilora_factors.json",
        "init_adapter/adapter_config.json",
        "init_adapter/adapter_model.safetensors",
    ]

    # The stock CLI downloads the whole repo into the standard cache.
    result = _hf(hub.env, "download", REPO, "--quiet")
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert folder.is_relative_to(hub.cache_dir) and folder.name == info.oid
    downloaded = FactorSet.from_pretrained(folder)
    _assert_same_tensors(downloaded, factor_set)
    with hub.offline():  # what `hf download` cached is enough for a pull by repo id
        assert download_factor_set(REPO) == folder
    assert downloaded.config == factor_set.config and downloaded.stats == factor_set.stats

    expected = _logits(inilora_init(tiny_base_dir, factors=factor_set)())
    assert torch.equal(_logits(inilora_init(tiny_base_dir, factors=folder)()), expected)

    # By repo id, through the fixture's endpoint: records where it came from (the resolved commit).
    pulled = FactorSet.from_pretrained(REPO)
    _assert_same_tensors(pulled, factor_set)
    assert pulled.info["source_repo"] == REPO
    assert pulled.info["source_revision"] == info.oid
    model = inilora_init(tiny_base_dir, factors=REPO)()
    assert torch.equal(_logits(model), expected)
    assert model.init_report.max_reconstruction_error < 1e-5


def test_pushing_the_same_factor_set_again_creates_no_commit(hub, factor_set: FactorSet) -> None:
    first = push_factor_set(factor_set, REPO)
    second = push_factor_set(factor_set, REPO)
    assert second.oid == first.oid
    assert len(hub.store.repo(REPO).history()) == 2


def test_push_replaces_files_of_an_earlier_factor_set(hub, factor_set: FactorSet) -> None:
    hub.api.create_repo(REPO)
    for stale in ("factors-00001-of-00002.safetensors", "factors.safetensors.index.json", "init_adapter/old.bin"):
        hub.api.upload_file(repo_id=REPO, path_or_fileobj=b"old", path_in_repo=stale)
    hub.api.upload_file(repo_id=REPO, path_or_fileobj=b"mine", path_in_repo="NOTES.md")
    commits = len(hub.store.repo(REPO).history())

    push_factor_set(factor_set, REPO)
    assert len(hub.store.repo(REPO).history()) == commits + 1
    assert sorted(hub.store.repo(REPO).files()) == [
        ".gitattributes",
        "NOTES.md",
        "README.md",
        "factors.safetensors",
        "inilora_factors.json",
        "init_adapter/adapter_config.json",
        "init_adapter/adapter_model.safetensors",
    ]


def test_explicit_endpoint_and_token_are_used(hub, factor_set: FactorSet, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("HF_TOKEN")
    info = push_factor_set(factor_set, REPO, endpoint=hub.url, token=hub.token, private=True)
    assert info.oid == hub.store.repo(REPO).head().oid and hub.store.repo(REPO).private
    with pytest.raises(FactorSetNotFoundError, match="not found.*private repo"):  # invisible without a token
        download_factor_set(REPO, endpoint=hub.url, token=False)
    path = download_factor_set(REPO, endpoint=hub.url, token=hub.token)
    assert snapshot_commit(path) == info.oid


# ------------------------------------------------------------------------------------------ plain PEFT


def _upload_base_model(hub, base_dir: Path) -> None:
    """Publish the tiny base as `org/tiny-llama` with a card declaring a license (inherited by the factor card)."""
    hub.api.create_repo(BASE_ID)
    (readme := base_dir.parent / "base-readme.md").write_text("---\nlicense: apache-2.0\n---\n# tiny llama\n")
    hub.api.upload_folder(repo_id=BASE_ID, folder_path=base_dir)
    hub.api.upload_file(repo_id=BASE_ID, path_or_fileobj=readme, path_in_repo="README.md")


def test_init_adapter_loads_with_plain_peft_as_the_card_says(hub, factor_set: FactorSet, tiny_base_dir: Path) -> None:
    _upload_base_model(hub, tiny_base_dir)
    push_factor_set(factor_set, REPO)
    snapshot = Path(hub.api.snapshot_download(REPO))
    expected = _logits(inilora_init(tiny_base_dir, factors=factor_set)())

    config = json.loads((snapshot / "init_adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    assert config["base_model_name_or_path"] == BASE_ID
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 8, False)
    assert sorted(config["target_modules"]) == sorted(factor_set.factors)
    tensors = load_file(snapshot / "init_adapter" / "adapter_model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(tensors[f"base_model.model.{name}.lora_A.weight"], factor_set.factors[name].lora_A)

    # By hand: residual W - s·B0·A0, then PeftModel.from_pretrained on the local snapshot.
    residual_model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    with torch.no_grad():
        for module, factors in factor_set.factors.items():
            weight = residual_model.get_submodule(module).weight
            weight -= factor_set.config.scaling * (factors.lora_B @ factors.lora_A)
    plain = PeftModel.from_pretrained(residual_model, snapshot, subfolder="init_adapter", is_trainable=True)
    assert torch.allclose(_logits(plain), expected, rtol=0, atol=1e-6)
    assert {n for n, p in plain.named_parameters() if p.requires_grad} == {
        f"base_model.model.{m}.lora_{ab}.default.weight" for m in factor_set.factors for ab in "AB"
    }

    # The card's "without inilora_hf" snippet, run verbatim against the Hub (base and factors by repo id).
    card = ModelCard.load(snapshot / "README.md")
    snippet = re.search(r"Without inilora_hf.*?```python\n(.*?)```", card.text, re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, "model-card-snippet", "exec"), namespace)
    assert isinstance(namespace["model"], PeftModel)
    assert torch.allclose(_logits(namespace["model"]), expected, rtol=0, atol=1e-6)
    assert card.data.license == "apache-2.0", "the base model's license is inherited"


# ------------------------------------------------------------------------------------------ revisions / offline


def test_pull_by_commit_returns_that_revisions_factors(hub, factor_set: FactorSet, other_factor_set: FactorSet) -> None:
    old = push_factor_set(factor_set, REPO)
    new = push_factor_set(other_factor_set, REPO, commit_message="PiSSA instead")
    assert old.oid != new.oid
    assert [c.oid for c in hub.store.repo(REPO).history()][:2] == [new.oid, old.oid]
    assert hub.store.repo(REPO).head().title == "PiSSA instead"

    _assert_same_tensors(FactorSet.from_pretrained(REPO, revision=old.oid), factor_set)
    _assert_same_tensors(FactorSet.from_pretrained(REPO), other_factor_set)
    assert FactorSet.from_pretrained(REPO, revision=old.oid).info["source_revision"] == old.oid

    pr = push_factor_set(factor_set, REPO, create_pr=True)
    assert pr.pr_url and hub.store.repo(REPO).head().oid == new.oid, "a pull request leaves main alone"
    _assert_same_tensors(FactorSet.from_pretrained(REPO, revision="refs/pr/1"), factor_set)

    branch = push_factor_set(factor_set, REPO, revision="experiment")  # branch created from main on demand
    assert hub.store.repo(REPO).branches["experiment"] == branch.oid
    _assert_same_tensors(FactorSet.from_pretrained(REPO, revision="experiment"), factor_set)
    _assert_same_tensors(FactorSet.from_pretrained(REPO, revision="main"), other_factor_set)


def test_offline_works_after_one_pull_and_fails_clearly_before(hub, factor_set: FactorSet, tiny_base_dir: Path) -> None:
    info = push_factor_set(factor_set, REPO)
    with hub.offline(), pytest.raises(FactorSetNotFoundError) as error:
        FactorSet.from_pretrained(REPO)
    message = str(error.value)
    assert REPO in message and "HF_HUB_OFFLINE" in message and f"inilora-hf pull {REPO}" in message

    path = download_factor_set(REPO)
    assert snapshot_commit(path) == info.oid
    requests_before = len(hub.store.requests)
    with hub.offline():
        assert download_factor_set(REPO) == path
        _assert_same_tensors(FactorSet.from_pretrained(REPO), factor_set)
        model = inilora_init(tiny_base_dir, factors=REPO)()
        assert torch.equal(_logits(model), _logits(inilora_init(tiny_base_dir, factors=factor_set)()))
    assert len(hub.store.requests) == requests_before, "offline mode must not touch the network"
    with pytest.raises(FactorSetNotFoundError, match="not in the local Hugging Face cache"):
        download_factor_set("tester/never-pulled", local_files_only=True)


# ------------------------------------------------------------------------------------------ model card


def test_model_card_metadata_and_body(hub, factor_set: FactorSet, tiny_base_dir: Path) -> None:
    # The Hub rejects a card whose base_model does not exist: unlinked until the base model is published.
    push_factor_set(factor_set, REPO)
    card = ModelCard.load(hub.api.hf_hub_download(REPO, "README.md"))
    assert card.data.base_model is None and card.data.get("base_model_relation") is None
    assert f"`{BASE_ID}`" in card.text and f'from_pretrained("{BASE_ID}"' in card.text

    _upload_base_model(hub, tiny_base_dir)
    push_factor_set(factor_set, REPO, license="mit")  # an explicit license wins over the base model's
    card = ModelCard.load(hub.api.hf_hub_download(REPO, "README.md"))
    assert card.content.startswith("---\n")
    assert card.data.base_model == BASE_ID
    assert card.data.base_model_relation == "adapter"
    assert card.data.library_name == "peft"
    assert card.data.license == "mit"
    assert {"inilora", "lora", "peft", factor_set.config.variant} <= set(card.data.tags)
    assert card.data.inilora["target_modules"] == sorted(factor_set.factors)

    config_block = re.search(r"## Configuration.*?```json\n(.*?)```", card.text, re.S).group(1)
    assert InitConfig.from_dict(json.loads(config_block)) == factor_set.config
    for name, stats in factor_set.stats.items():
        row = next(line for line in card.text.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"{stats['mse']:.4g}" in row and f"{stats['mse_ratio']:.4g}" in row
    assert f'inilora_init("{BASE_ID}", factors="{REPO}")' in card.text
    assert f"hf download {REPO}" in card.text
    assert f"{factor_set.info['compute_device']}" in card.text
    assert "xue2025inilora" in card.text  # the method's citation


def test_model_card_for_local_base_and_huge_models(factor_set: FactorSet) -> None:
    local = dataclasses.replace(factor_set, base_model="/data/models/my-llama")
    card = ModelCard(str(factor_set_card(local, "me/x")))
    assert card.data.base_model is None and card.data.get("base_model_relation") is None
    assert "/data/models" not in card.content, "no local paths leak into a public card"

    names = [f"model.layers.{i}.self_attn.{kind}" for i in range(40) for kind in ("q_proj", "v_proj")]
    stats = {n: {"mse": 1.0, "optimal_mse": 0.5, "mse_ratio": 2.0} for n in names}
    fingerprints = {n: {"shape": [64, 64], "sha256": "0" * 64} for n in names}
    huge = dataclasses.replace(factor_set, stats=stats, fingerprints=fingerprints)
    text = factor_set_card(huge, "me/x").text
    assert sum(line.startswith("| `model.layers.") for line in text.splitlines()) == MAX_TABLE_ROWS
    assert f"and {len(names) - MAX_TABLE_ROWS} more modules" in text
    assert "| `q_proj` | 40 |" in text  # per-module-type summary

    plain_lora = dataclasses.replace(factor_set, config=InitConfig("lora", target_modules=["q_proj", "v_proj"]))
    text = factor_set_card(plain_lora, "me/x").text
    assert "W <- W - s" not in text and 'subfolder="init_adapter"' in text  # nothing to subtract: base unchanged
    assert "W <- W - s" in factor_set_card(factor_set, "me/x").text


# ------------------------------------------------------------------------------------------ residual option


def test_residual_is_uploaded_only_when_asked(hub, factor_set: FactorSet, tiny_base_dir: Path) -> None:
    with pytest.raises(ValueError, match="stores no residual"):
        push_factor_set(factor_set, REPO, include_residual=True)

    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    factors = {}
    for name, module in factor_set.factors.items():
        weight = base.get_submodule(name).weight.detach()
        residual = weight - factor_set.config.scaling * (module.lora_B @ module.lora_A)
        factors[name] = dataclasses.replace(module, extra={"residual": residual})
    with_residual = dataclasses.replace(factor_set, factors=factors)

    push_factor_set(with_residual, REPO)
    assert not any(k.endswith(".residual") for k in load_file(hub.api.hf_hub_download(REPO, "factors.safetensors")))
    push_factor_set(with_residual, REPO, include_residual=True)
    pulled = FactorSet.from_pretrained(REPO)
    assert pulled.has_residual
    assert torch.equal(pulled.factors[name].extra["residual"], factors[name].extra["residual"])


# ------------------------------------------------------------------------------------------ errors


def test_missing_repo_and_revision_name_the_repo(hub, factor_set: FactorSet) -> None:
    with pytest.raises(FactorSetNotFoundError, match=r"'tester/nope' was not found on http://127\.0\.0\.1"):
        FactorSet.from_pretrained("tester/nope")
    with pytest.raises(FactorSetNotFoundError, match="neither an existing directory nor a valid Hub repo id"):
        FactorSet.from_pretrained("./no/such/factors")
    push_factor_set(factor_set, REPO)
    with pytest.raises(FactorSetNotFoundError, match=r"Revision 'v9' does not exist in 'tester/tiny-llama-inilora"):
        FactorSet.from_pretrained(REPO, revision="v9")


def test_repo_that_is_not_a_factor_set(hub, tiny_base_dir: Path) -> None:
    hub.api.create_repo(BASE_ID)
    hub.api.upload_folder(repo_id=BASE_ID, folder_path=tiny_base_dir)
    with pytest.raises(FactorSetNotFoundError, match="has no inilora_factors.json: it is not an inilora_hf"):
        inilora_init(tiny_base_dir, factors=BASE_ID).prepare()


def test_repo_missing_a_listed_factor_file(hub, factor_set: FactorSet, tmp_path: Path) -> None:
    factor_set.save_pretrained(tmp_path / "fs")
    hub.api.create_repo(REPO)
    hub.api.upload_file(
        repo_id=REPO, path_or_fileobj=tmp_path / "fs" / "inilora_factors.json", path_in_repo="inilora_factors.json"
    )
    with pytest.raises(FactorSetCorruptError, match=f"{REPO} .*'factors.safetensors'.*Push it again"):
        FactorSet.from_pretrained(REPO)


def test_factor_repo_for_another_base_is_refused(hub, factor_set: FactorSet, tmp_path: Path) -> None:
    push_factor_set(factor_set, REPO)
    other_base = tmp_path / "other-base"
    tiny_llama(seed=1).save_pretrained(other_base)
    with pytest.raises(FactorSetMismatchError, match="different weights"):
        inilora_init(other_base, factors=REPO)()


def test_push_without_token(hub, factor_set: FactorSet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubAuthenticationError, match=r"tester/x.*HF_TOKEN"):
        push_factor_set(factor_set, "tester/x")
    assert hub.store.repos == {}, "nothing may be created without a token"
    with pytest.raises(HubAuthenticationError):
        push_factor_set(factor_set, "tester/x", token=False)


def test_push_with_a_refused_token(hub, factor_set: FactorSet, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self, repo_id, **kwargs):
        response = httpx2.Response(401, request=httpx2.Request("POST", f"{self.endpoint}/api/repos/create"))
        raise HfHubHTTPError("401 Client Error: Unauthorized", response=response)

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(HubAuthenticationError, match=r"refused the token.*'tester/x'.*HTTP 401.*write access"):
        push_factor_set(factor_set, "tester/x")


# ------------------------------------------------------------------------------------------ CLI


def test_cli_push_and_pull(hub, factor_set: FactorSet, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from inilora_hf.cli.app import main

    factor_set.save_pretrained(tmp_path / "fs")
    assert main(["push", str(tmp_path / "fs"), REPO, "--private", "--revision", "v1"]) == 0
    repo = hub.store.repo(REPO)
    assert repo.private and "inilora_factors.json" in repo.files("v1")
    assert "README.md" in repo.files("v1") and "inilora_factors.json" not in repo.files("main")
    capsys.readouterr()

    assert main(["pull", REPO, "--revision", "v1"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert snapshot_commit(path) == repo.branches["v1"]
    _assert_same_tensors(FactorSet.from_pretrained(path), factor_set)

    assert main(["pull", "tester/nope"]) == 2
    assert "tester/nope" in capsys.readouterr().err


def test_card_of_a_factor_set_with_variant_tensors_has_no_plain_peft_snippet(factor_set: FactorSet) -> None:
    with_core = dataclasses.replace(
        factor_set,
        factors={
            name: dataclasses.replace(module, extra={"lora_core": torch.eye(module.lora_A.shape[0])})
            for name, module in factor_set.factors.items()
        },
    )
    assert with_core.variant_extras == {"lora_core"} and not factor_set.variant_extras
    text = str(factor_set_card(with_core, "org/tiny-core"))
    assert "there is no `init_adapter/`" in text
    assert "PeftModel.from_pretrained" not in text and "`<module>.lora_core`" in text
    assert "PeftModel.from_pretrained" in str(factor_set_card(factor_set, "org/tiny"))
