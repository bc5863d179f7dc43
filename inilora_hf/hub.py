"""Factor-set repos on the Hugging Face Hub: push (one commit) and pull (through the standard HF cache).

Layout of a factor-set repo (see `push_factor_set`):

```
README.md                  model card (YAML: base_model, base_model_relation: adapter, library_name: peft, tags)
inilora_factors.json       InitConfig, base-model identity and fingerprints, fit statistics, file checksums
factors.safetensors        lora_A / lora_B per target module (or factors-0000k-of-0000n.safetensors + index)
init_adapter/              the same initial A/B as a plain PEFT LoRA adapter (adapter_config.json with
                           init_lora_weights: true, adapter_model.safetensors), loadable without inilora_hf
```

Every function takes `endpoint=` and `token=`; by default `HfApi` reads `HF_ENDPOINT`, `HF_TOKEN` (or the token
stored by `hf auth login`) and honours `HF_HUB_OFFLINE=1`.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_token
from safetensors.torch import save_file

from .errors import (
    FactorSetCorruptError,
    FactorSetError,
    FactorSetNotFoundError,
    HubAuthenticationError,
)
from .factors import METADATA_NAME, read_metadata
from .log import get_logger

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from .factors import FactorSet

logger = get_logger(__name__)

ADAPTER_SUBFOLDER = "init_adapter"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# Files a push owns in the repo: stale ones (e.g. old shards, a residual dropped since) are deleted in the
# same commit. Anything else in the repo (user files, .gitattributes) is left alone.
_MANAGED_FILE = re.compile(rf"factors[^/]*\.safetensors(\.index\.json)?|{ADAPTER_SUBFOLDER}/.+")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


def push_factor_set(
    factor_set: FactorSet,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    create_pr: bool = False,
    include_residual: bool = False,
    license: str | None = None,
) -> CommitInfo:
    """Upload a factor set to a Hub model repo in a single commit, creating the repo if needed.

    The commit holds the factor files and `inilora_factors.json` (as written by `FactorSet.save_pretrained`),
    a generated `README.md` model card, and `init_adapter/`, a plain PEFT LoRA adapter of the initial factors.
    Factor files and `init_adapter/` files left over from an earlier push are deleted in the same commit, so a
    revision never mixes two factor sets. Pushing an unchanged factor set creates no commit.

    Args:
        factor_set: The factor set to publish.
        repo_id: `"org/name"` (or `"name"` for your own namespace).
        private: Visibility when the repo is created (an existing repo keeps its visibility).
        revision: Branch to commit to (created from `main` if missing). Default: `main`.
        commit_message: Default: `"Upload <variant> r<rank> factor set for <base model>"`.
        token: A write token. Default: `HF_TOKEN`, else the token saved by `hf auth login`.
        endpoint: Hub endpoint. Default: `HF_ENDPOINT`, else https://huggingface.co.
        create_pr: Open a pull request instead of committing to the branch.
        include_residual: Also upload the stored residual `R` (only needed for quantized bases, where it cannot
            be recomputed from the base weights). Raises if the factor set stores none.
        license: License id for the card (default: the base model's license when its card declares one).

    Returns:
        The `CommitInfo` (`.oid` is the commit sha to pull by, `.pr_url` with `create_pr=True`).

    Raises:
        HubAuthenticationError: No token, or the Hub refused it.

    Example:
        >>> from inilora_hf import inilora_init
        >>> factor_set = inilora_init("meta-llama/Llama-3.2-1B", variant="inilora").prepare()   # doctest: +SKIP
        >>> info = push_factor_set(factor_set, "my-org/llama-3.2-1b-inilora-r8")                  # doctest: +SKIP
        >>> info.oid                                                                               # doctest: +SKIP
        '5f0c4a...'
    """
    from .model_card import is_hub_id

    if include_residual and not factor_set.has_residual:
        raise ValueError(
            "include_residual=True, but this factor set stores no residual: for full-precision bases it is "
            "recomputed exactly from the base weights on load. Push without include_residual."
        )
    api = HfApi(endpoint=endpoint, token=token)
    if token is False or (token is None and get_token() is None):
        raise HubAuthenticationError(
            f"Pushing to {repo_id!r} on {api.endpoint} needs a Hugging Face token with write access, and none was "
            "found. Run `hf auth login`, set the HF_TOKEN environment variable, or pass token=."
        )
    with _translated_hub_errors("push", repo_id, revision, api.endpoint):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision not in (None, "main") and not create_pr:
            branches = {ref.name for ref in api.list_repo_refs(repo_id).branches}
            if revision not in branches:
                api.create_branch(repo_id, branch=revision)
        link_base_model = _base_model_on_hub(api, factor_set)
        if license is None and link_base_model:
            license = _base_model_license(api, factor_set)
        with tempfile.TemporaryDirectory(prefix="inilora-push-") as tmp:
            folder = Path(tmp)
            write_repo_folder(
                factor_set,
                folder,
                repo_id,
                include_residual=include_residual,
                license=license,
                link_base_model=link_base_model,
            )
            additions = sorted(
                (path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()),
            )
            deletions = _stale_files(api, repo_id, revision, set(additions))
            operations = [CommitOperationDelete(path) for path in deletions]
            operations += [CommitOperationAdd(path, folder / path) for path in additions]
            message = commit_message or (
                f"Upload {factor_set.config.variant} r{factor_set.config.rank} factor set"
                + (f" for {factor_set.base_model}" if is_hub_id(factor_set.base_model) else "")
            )
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=message,
                revision=revision,
                create_pr=create_pr,
            )
    logger.info("Pushed %d modules to %s (commit %s).", len(factor_set.factors), info.repo_url, info.oid)
    return info


def write_repo_folder(
    factor_set: FactorSet,
    folder: str | os.PathLike,
    repo_id: str,
    *,
    include_residual: bool = False,
    license: str | None = None,
    link_base_model: bool = True,
) -> Path:
    """Write the files of a factor-set repo into `folder` (what `push_factor_set` uploads).

    `link_base_model=False` keeps `base_model` out of the card's metadata (the Hub rejects a card whose
    `base_model` is not an existing model).

    Example:
        >>> write_repo_folder(factor_set, "./repo", "my-org/llama-inilora-r8")   # doctest: +SKIP
        PosixPath('repo')
    """
    from .model_card import factor_set_card

    folder = Path(folder)
    factor_set.save_pretrained(folder, include_residual=include_residual)
    if not factor_set.variant_extras:
        write_init_adapter(factor_set, folder / ADAPTER_SUBFOLDER)
    else:
        logger.info(
            "Variant %r stores extra tensors (%s) that a plain LoRA adapter cannot hold: no %s/ written.",
            factor_set.config.variant,
            sorted(factor_set.variant_extras),
            ADAPTER_SUBFOLDER,
        )
    factor_set_card(factor_set, repo_id, license=license, link_base_model=link_base_model).save(folder / "README.md")
    return folder


def write_init_adapter(factor_set: FactorSet, directory: str | os.PathLike) -> Path:
    """Write the initial A/B as a standard PEFT LoRA adapter that `PeftModel.from_pretrained` loads.

    `adapter_config.json` declares `init_lora_weights: true` (so PEFT never re-runs an init that would change
    the base weights again), `base_model_name_or_path` = the base model's Hub id, and the exact module names as
    `target_modules`. Tensors are named `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`.

    Example:
        >>> write_init_adapter(factor_set, "./init_adapter")                              # doctest: +SKIP
        >>> PeftModel.from_pretrained(residual_model, "./init_adapter", is_trainable=True)  # doctest: +SKIP
    """
    from .apply import lora_config_for
    from .model_card import is_hub_id

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = lora_config_for(factor_set)
    config.base_model_name_or_path = factor_set.base_model if is_hub_id(factor_set.base_model) else None
    config.revision = factor_set.base_revision if config.base_model_name_or_path else None
    config.save_pretrained(str(directory))
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(factor_set.factors):
        factors = factor_set.factors[name]
        tensors[f"base_model.model.{name}.lora_A.weight"] = factors.lora_A.detach().cpu().contiguous().clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = factors.lora_B.detach().cpu().contiguous().clone()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def download_factor_set(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """Download the factor set of a Hub repo into the standard HF cache and return its snapshot directory.

    Only `inilora_factors.json` and the files it lists are fetched (not the card or `init_adapter/`). The
    snapshot directory is `.../models--org--name/snapshots/<commit>`, so `snapshot_commit(path)` gives the exact
    commit that was resolved. Once downloaded, it works offline (`HF_HUB_OFFLINE=1` or `local_files_only=True`).

    Args:
        repo_id: `"org/name"` of a factor-set repo.
        revision: Branch, tag or commit sha (default `main`). Pull by commit sha for reproducibility.
        token: For private repos. Default: `HF_TOKEN`, else the token saved by `hf auth login`.
        endpoint: Hub endpoint. Default: `HF_ENDPOINT`, else https://huggingface.co.
        cache_dir: HF hub cache. Default: `HF_HUB_CACHE` (`~/.cache/huggingface/hub`).
        local_files_only: Never touch the network; use the cache only.

    Raises:
        FactorSetNotFoundError: The repo or revision does not exist (or is private), the repo holds no
            `inilora_factors.json`, or it is not cached while offline.
        FactorSetCorruptError: `inilora_factors.json` lists a file the repo does not contain.

    Example:
        >>> path = download_factor_set("my-org/llama-3.2-1b-inilora-r8", revision="v1")   # doctest: +SKIP
        >>> FactorSet.from_pretrained(path).config.variant                                # doctest: +SKIP
        'inilora'
    """
    api = HfApi(endpoint=endpoint, token=token)
    with _translated_hub_errors("download", repo_id, revision, api.endpoint):
        metadata_file = Path(
            api.hf_hub_download(
                repo_id, METADATA_NAME, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
            )
        )
        snapshot = metadata_file.parent
        commit = snapshot_commit(snapshot) or revision
        document = read_metadata(snapshot)
        files = sorted(document["files"])
        folder = Path(
            api.snapshot_download(
                repo_id,
                revision=commit,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                allow_patterns=[METADATA_NAME, *files],
            )
        )
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise FactorSetCorruptError(
            f"{repo_id} (commit {commit}) lists {missing[0]!r} in {METADATA_NAME}, but the repo has no such file: "
            "the factor set was only partly uploaded. Push it again with `push_factor_set` / `inilora-hf push`."
        )
    logger.info("Factor set %s (commit %s) is in %s.", repo_id, commit, folder)
    return folder


def snapshot_commit(path: str | os.PathLike) -> str | None:
    """The commit sha of an HF-cache snapshot directory (`.../snapshots/<sha>`), or None for other paths.

    Example:
        >>> snapshot_commit("/cache/models--org--x/snapshots/" + "a" * 40)
        'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'
        >>> snapshot_commit("./factors") is None
        True
    """
    path = Path(path)
    if path.parent.name == "snapshots" and _COMMIT_SHA.match(path.name):
        return path.name
    return None


def hub_source(repo_id: str, path: str | os.PathLike) -> dict[str, str]:
    """`{"source_repo", "source_revision"}` for `FactorSet.info` of a factor set pulled from the Hub.

    `path` is what `download_factor_set` returned; the revision recorded is the resolved commit sha.

    Example:
        >>> hub_source("org/x", "/cache/models--org--x/snapshots/" + "b" * 40)["source_revision"][:4]
        'bbbb'
    """
    source = {"source_repo": repo_id}
    commit = snapshot_commit(path)
    if commit:
        source["source_revision"] = commit
    return source


# ------------------------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _translated_hub_errors(action: str, repo_id: str, revision: str | None, endpoint: str) -> Iterator[None]:
    """Re-raise huggingface_hub errors as `FactorSetHubError`s that name the repo, the revision and the fix."""
    where = f"{repo_id!r} (revision {revision or 'main'!r}) on {endpoint}"
    try:
        yield
    except FactorSetError:
        raise
    except HFValidationError as error:
        raise FactorSetNotFoundError(
            f"{repo_id!r} is neither an existing directory nor a valid Hub repo id ('org/name'): {error}"
        ) from error
    except GatedRepoError as error:
        raise FactorSetNotFoundError(
            f"{repo_id!r} on {endpoint} is gated: accept its conditions on the repo page, then pass a token "
            "(token= or HF_TOKEN)."
        ) from error
    except RepositoryNotFoundError as error:
        raise FactorSetNotFoundError(
            f"Repository {repo_id!r} was not found on {endpoint}. Check the spelling; for a private repo pass a "
            "token with read access (token=, HF_TOKEN, or `hf auth login`)."
        ) from error
    except RevisionNotFoundError as error:
        raise FactorSetNotFoundError(
            f"Revision {revision or 'main'!r} does not exist in {repo_id!r} on {endpoint}. Use a branch, tag or full "
            f"commit sha of that repo (list them with `HfApi().list_repo_refs({repo_id!r})`)."
        ) from error
    except LocalEntryNotFoundError as error:
        raise FactorSetNotFoundError(
            f"The factor set {where} is not in the local Hugging Face cache, and the Hub cannot be reached "
            "(offline mode: HF_HUB_OFFLINE=1 or local_files_only=True, or no network). Download it once while "
            f"online (`inilora-hf pull {repo_id}` or `hf download {repo_id}`), or unset HF_HUB_OFFLINE."
        ) from error
    except EntryNotFoundError as error:
        raise FactorSetNotFoundError(
            f"{where} has no {METADATA_NAME}: it is not an inilora_hf factor-set repo. If it is a base model, pass "
            "it as the model, not as `factors=`; factor-set repos are created with `FactorSet.push_to_hub` or "
            "`inilora-hf push`."
        ) from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status not in (401, 403):
            raise
        if action == "push":
            raise HubAuthenticationError(
                f"The Hub refused the token for a push to {where} (HTTP {status}). Use a token with write access "
                "to that namespace: `hf auth login`, HF_TOKEN, or token=."
            ) from error
        raise FactorSetNotFoundError(
            f"The Hub refused access to {where} (HTTP {status}). Pass a token with read access (token=, HF_TOKEN "
            "or `hf auth login`)."
        ) from error


def _stale_files(api: HfApi, repo_id: str, revision: str | None, keep: set[str]) -> list[str]:
    """Files of an earlier push (old shards, init_adapter files) that the new commit must delete."""
    try:
        existing = api.list_repo_files(repo_id, revision=revision)
    except RevisionNotFoundError:
        return []
    return [path for path in existing if _MANAGED_FILE.fullmatch(path) and path not in keep]


def _base_model_on_hub(api: HfApi, factor_set: FactorSet) -> bool:
    """Whether the recorded base model is an existing Hub repo (only then may the card's YAML name it)."""
    from .model_card import is_hub_id

    if is_hub_id(factor_set.base_model) and api.repo_exists(factor_set.base_model):
        return True
    logger.warning(
        "The factor set's base model %r is not a model on %s: the model card will not link it. Set "
        "`factor_set.base_model = 'org/name'` (its Hub id) before pushing to place the repo in the base model's tree.",
        factor_set.base_model,
        api.endpoint,
    )
    return False


def _base_model_license(api: HfApi, factor_set: FactorSet) -> str | None:
    """The license declared in the base model's card, when that card can be read."""
    from huggingface_hub import ModelCard

    try:
        readme = api.hf_hub_download(factor_set.base_model, "README.md", revision=factor_set.base_revision)
        return ModelCard.load(readme, ignore_metadata_errors=True).data.get("license")
    except (HfHubHTTPError, EntryNotFoundError, OSError, ValueError) as error:
        logger.debug("No license found for base model %s: %s", factor_set.base_model, error)
        return None

