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
stored by `hf auth login`) and honours `HF_HUB_OFFLINE=1`. Retries, error translation and cache checks come from
`inilora_hf.hub.transport`.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import RevisionNotFoundError
from huggingface_hub.utils import get_token
from safetensors.torch import save_file

from inilora_hf.errors import FactorSetCorruptError, HubAuthenticationError
from inilora_hf.hub.transport import (
    DamagedDownload,
    base_model_license,
    base_model_on_hub,
    discard_cached,
    file_sha256,
    is_hub_id,
    matches_blob_name,
    snapshot_commit,
    translated_hub_errors,
    with_retries,
)
from inilora_hf.log import get_logger

from .card import factor_set_card
from .format import METADATA_NAME, FactorSetData, read_metadata
from .lora_config import lora_config_for

logger = get_logger(__name__)

ADAPTER_SUBFOLDER = "init_adapter"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# Files a push owns in the repo: stale ones (e.g. old shards, a residual dropped since) are deleted in the
# same commit. Anything else in the repo (user files, .gitattributes) is left alone.
_MANAGED_FILE = re.compile(rf"factors[^/]*\.safetensors(\.index\.json)?|{ADAPTER_SUBFOLDER}/.+")


def push_factor_set(
    factor_set: FactorSetData,
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

    A failure that huggingface_hub does not retry itself (a 5xx or 429 answer to an API call such as the
    commit, a connection lost or an answer cut short) repeats the whole push, up to 3 tries in all, waiting as
    a `Retry-After` header asks. That is safe: the commit is atomic, and one that landed although its answer
    was lost makes the next try a no-op (with `create_pr=True` such an unknown outcome is not retried, since
    each try would open another pull request).

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
        FactorSetHubError: The Hub or the network kept failing; the repo holds its previous revision or the
            complete new one, never a part, and pushing again is safe.

    Example:
        >>> from inilora_hf import inilora_init
        >>> factor_set = inilora_init("meta-llama/Llama-3.2-1B", variant="inilora").prepare()   # doctest: +SKIP
        >>> info = push_factor_set(factor_set, "my-org/llama-3.2-1b-inilora-r8")                  # doctest: +SKIP
        >>> info.oid                                                                               # doctest: +SKIP
        '5f0c4a...'
    """
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
    with translated_hub_errors(
        "push", repo_id, revision, api.endpoint, required_file=METADATA_NAME, create_pr=create_pr
    ):
        info = with_retries(
            f"push to {repo_id}",
            lambda: _push_once(
                api,
                factor_set,
                repo_id,
                private=private,
                revision=revision,
                commit_message=commit_message,
                create_pr=create_pr,
                include_residual=include_residual,
                license=license,
            ),
            # A second try repeats the whole push: a commit that landed although its answer was lost makes the
            # second one a no-op. Not so with create_pr: each try would open another pull request.
            outcome_may_be_unknown=not create_pr,
        )
    logger.info("Pushed %d modules to %s (commit %s).", len(factor_set.factors), info.repo_url, info.oid)
    return info


def _push_once(
    api: HfApi,
    factor_set: FactorSetData,
    repo_id: str,
    *,
    private: bool | None,
    revision: str | None,
    commit_message: str | None,
    create_pr: bool,
    include_residual: bool,
    license: str | None,
) -> CommitInfo:
    """One try of `push_factor_set`: create the repo (and branch), write the files, commit them in one go."""
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision not in (None, "main") and not create_pr:
        branches = {ref.name for ref in api.list_repo_refs(repo_id).branches}
        if revision not in branches:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    link_base_model = base_model_on_hub(api, factor_set.base_model)
    if license is None and link_base_model and factor_set.base_model is not None:
        license = base_model_license(api, factor_set.base_model, factor_set.base_revision)
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
        operations: list[CommitOperationAdd | CommitOperationDelete] = [CommitOperationDelete(p) for p in deletions]
        operations += [CommitOperationAdd(path, folder / path) for path in additions]
        message = commit_message or (
            f"Upload {factor_set.config.variant} r{factor_set.config.rank} factor set"
            + (f" for {factor_set.base_model}" if is_hub_id(factor_set.base_model) else "")
        )
        return api.create_commit(repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr)


def write_repo_folder(
    factor_set: FactorSetData,
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


def write_init_adapter(factor_set: FactorSetData, directory: str | os.PathLike) -> Path:
    """Write the initial A/B as a standard PEFT LoRA adapter that `PeftModel.from_pretrained` loads.

    `adapter_config.json` declares `init_lora_weights: true` (so PEFT never re-runs an init that would change
    the base weights again), `base_model_name_or_path` = the base model's Hub id, and the exact module names as
    `target_modules`. Tensors are named `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`.

    Example:
        >>> write_init_adapter(factor_set, "./init_adapter")                              # doctest: +SKIP
        >>> PeftModel.from_pretrained(residual_model, "./init_adapter", is_trainable=True)  # doctest: +SKIP
    """
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

    Every file is checked before it is returned: `inilora_factors.json` against its Hub ETag, the factor files
    against the sha256 it records. A file that arrives damaged is deleted from the cache and downloaded again.
    Failures huggingface_hub does not retry itself (a 5xx answer to a file download or an API call, a
    connection lost or a body cut short outside its resume loop) are retried up to 3 times in all, waiting as a
    `Retry-After` header asks.

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
        FactorSetCorruptError: `inilora_factors.json` lists a file the repo does not contain, or a file still
            arrives damaged on the last try (the copy on the Hub is bad: push the factor set again).
        FactorSetHubError: The Hub or the network kept failing; the cache holds no partial file, so running
            again later is safe.

    Example:
        >>> path = download_factor_set("my-org/llama-3.2-1b-inilora-r8", revision="v1")   # doctest: +SKIP
        >>> FactorSet.from_pretrained(path).config.variant                                # doctest: +SKIP
        'inilora'
    """
    api = HfApi(endpoint=endpoint, token=token)
    with translated_hub_errors("download", repo_id, revision, api.endpoint, required_file=METADATA_NAME):
        folder, commit = with_retries(
            f"download of {repo_id}",
            lambda: _download_once(api, repo_id, revision, cache_dir=cache_dir, local_files_only=local_files_only),
        )
    logger.info("Factor set %s (commit %s) is in %s.", repo_id, commit, folder)
    return folder


def _download_once(
    api: HfApi,
    repo_id: str,
    revision: str | None,
    *,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
) -> tuple[Path, str | None]:
    """One try of `download_factor_set`: the metadata, then the files it lists, each checked before it is trusted.

    A file whose bytes do not match (the metadata: its Hub ETag, i.e. the name of its cache blob; a factor file:
    the sha256 recorded in the metadata) is removed from the cache and `DamagedDownload` is raised, so that the
    next try, or a later run, downloads it again instead of trusting it."""
    cache = Path(cache_dir) if cache_dir is not None else None
    metadata_file = Path(
        api.hf_hub_download(
            repo_id, METADATA_NAME, revision=revision, cache_dir=cache, local_files_only=local_files_only
        )
    )
    snapshot = metadata_file.parent
    commit = snapshot_commit(snapshot) or revision
    if not matches_blob_name(metadata_file):
        raise DamagedDownload(repo_id, commit, [discard_cached(metadata_file)])
    document = read_metadata(snapshot)
    files = document["files"]
    folder = Path(
        api.snapshot_download(
            repo_id,
            revision=commit,
            cache_dir=cache,
            local_files_only=local_files_only,
            allow_patterns=[METADATA_NAME, *files],
        )
    )
    missing = [name for name in sorted(files) if not (folder / name).is_file()]
    if missing:
        raise FactorSetCorruptError(
            f"{repo_id} (commit {commit}) lists {missing[0]!r} in {METADATA_NAME}, but the repo has no such file: "
            "the factor set was only partly uploaded. Push it again with `push_factor_set` / `inilora-hf push`."
        )
    damaged = [discard_cached(folder / n) for n, digest in sorted(files.items()) if file_sha256(folder / n) != digest]
    if damaged:
        raise DamagedDownload(repo_id, commit, damaged)
    return folder, commit


def _stale_files(api: HfApi, repo_id: str, revision: str | None, keep: set[str]) -> list[str]:
    """Files of an earlier push (old shards, init_adapter files) that the new commit must delete."""
    try:
        existing = api.list_repo_files(repo_id, revision=revision)
    except RevisionNotFoundError:
        return []
    return [path for path in existing if _MANAGED_FILE.fullmatch(path) and path not in keep]
