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

Faults on the wire: what huggingface_hub does not retry itself (5xx and 429 answers to API calls and to file
downloads, connections reset or answers cut short outside its resume loop) is retried here, 3 tries in all with
backoff or the `Retry-After` the Hub asks for; a downloaded file is checked before it is trusted and fetched again
if damaged; a final failure is a `FactorSetHubError` naming the repo and saying what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import httpx2
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard
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
from huggingface_hub.utils.sha import git_hash
from safetensors.torch import save_file

from .apply import lora_config_for
from .errors import (
    FactorSetCorruptError,
    FactorSetError,
    FactorSetHubError,
    FactorSetNotFoundError,
    HubAuthenticationError,
)
from .factors import METADATA_NAME, file_sha256, read_metadata
from .log import get_logger
from .model_card import factor_set_card, is_hub_id

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
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Retries of what huggingface_hub does not retry itself: tries in all, the first wait, the longest Retry-After
# honoured (a longer one fails at once, naming the wait the Hub asked for).
_TRIES = 3
_FIRST_WAIT_S = 1.0
_MAX_RETRY_AFTER_S = 60.0
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_TRANSPORT = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)
_Result = TypeVar("_Result")


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
    with _translated_hub_errors("push", repo_id, revision, api.endpoint, create_pr=create_pr):
        info = _with_retries(
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
    factor_set: FactorSet,
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
        operations: list[CommitOperationAdd | CommitOperationDelete] = [CommitOperationDelete(p) for p in deletions]
        operations += [CommitOperationAdd(path, folder / path) for path in additions]
        message = commit_message or (
            f"Upload {factor_set.config.variant} r{factor_set.config.rank} factor set"
            + (f" for {factor_set.base_model}" if is_hub_id(factor_set.base_model) else "")
        )
        return api.create_commit(repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr)


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
    with _translated_hub_errors("download", repo_id, revision, api.endpoint):
        folder, commit = _with_retries(
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
    the sha256 recorded in the metadata) is removed from the cache and `_DamagedDownload` is raised, so that the
    next try, or a later run, downloads it again instead of trusting it."""
    cache = Path(cache_dir) if cache_dir is not None else None
    metadata_file = Path(
        api.hf_hub_download(repo_id, METADATA_NAME, revision=revision, cache_dir=cache, local_files_only=local_files_only)
    )
    snapshot = metadata_file.parent
    commit = snapshot_commit(snapshot) or revision
    if not _matches_blob_name(metadata_file):
        raise _DamagedDownload(repo_id, commit, [_discard_cached(metadata_file)])
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
    damaged = [_discard_cached(folder / n) for n, digest in sorted(files.items()) if file_sha256(folder / n) != digest]
    if damaged:
        raise _DamagedDownload(repo_id, commit, damaged)
    return folder, commit


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
def _translated_hub_errors(
    action: str, repo_id: str, revision: str | None, endpoint: str, *, create_pr: bool = False
) -> Iterator[None]:
    """Re-raise huggingface_hub errors as `FactorSetHubError`s that name the repo, the revision and the fix."""
    where = f"{repo_id!r} (revision {revision or 'main'!r}) on {endpoint}"
    try:
        yield
    except FactorSetError:
        raise
    except _DamagedDownload as error:
        raise FactorSetCorruptError(
            f"{', '.join(error.names)} of the factor set {where} did not match the recorded checksum in {_TRIES} "
            "downloads and was removed from the cache: the copy on the Hub (or something between it and you) is "
            "damaged. Push the factor set again (`inilora-hf push` / `FactorSet.push_to_hub`), then pull it."
        ) from error
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
        if error.__cause__ is not None and _is_transient(error.__cause__):  # online, but the Hub kept failing
            raise _hub_failure(action, where, error.__cause__, create_pr=create_pr) from error
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
        if status in _TRANSIENT_STATUS:
            raise _hub_failure(action, where, error, create_pr=create_pr) from error
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
    except (httpx2.TransportError, OSError, ValueError) as error:
        if not _is_transient(error):
            raise
        raise _hub_failure(action, where, error, create_pr=create_pr) from error


def _hub_failure(action: str, where: str, error: BaseException, *, create_pr: bool) -> FactorSetHubError:
    """The error for a push or download that failed transiently on every try: what failed, and that repeating
    it is safe."""
    if action == "push":
        remedy = (
            "The repo holds its previous revision or the complete new one, never a part: run the push again later "
            "(it creates no commit when the factor set is already there)."
        )
        if create_pr:
            remedy += " With create_pr, first look at the repo's pull requests: the last try may have opened one."
    else:
        remedy = (
            "The Hugging Face cache holds no partial file of it: check the connection (and HF_ENDPOINT), then run "
            "again later; files that arrived intact are reused."
        )
    return FactorSetHubError(f"The {action} of {where} failed: {_describe(error).rstrip('.')}. {remedy}")


# ------------------------------------------------------------------------------------------------ faults


class _DamagedDownload(Exception):
    """Downloaded files whose bytes do not match their checksum (already removed from the cache)."""

    def __init__(self, repo_id: str, commit: str | None, names: list[str]) -> None:
        super().__init__(f"{', '.join(names)} of {repo_id} (commit {commit}) arrived damaged")
        self.names = names


def _with_retries(what: str, attempt: Callable[[], _Result], *, outcome_may_be_unknown: bool = True) -> _Result:
    """Run `attempt` up to `_TRIES` times while it fails in a way another try may not meet (see `_retry_wait`).

    `outcome_may_be_unknown=False`: do not retry a failure after which the request may have taken effect (a lost
    connection, an answer cut short), for requests that are not safe to repeat."""
    tries = 0
    while True:
        tries += 1
        try:
            return attempt()
        except (httpx2.HTTPError, OSError, ValueError, _DamagedDownload) as error:
            wait = _retry_wait(error, tries, outcome_may_be_unknown=outcome_may_be_unknown)
            if wait is None:
                raise
            logger.info("The %s failed (%s); try %d of %d in %g s.", what, _describe(error), tries + 1, _TRIES, wait)
            time.sleep(wait)


def _retry_wait(error: BaseException, tries: int, *, outcome_may_be_unknown: bool) -> float | None:
    """Seconds to wait before another try after the `tries`-th failure, or None: no tries left, the failure is
    not transient, huggingface_hub has already retried that request, the request may have taken effect (unless
    `outcome_may_be_unknown`), or the Hub asks to wait longer than `_MAX_RETRY_AFTER_S`."""
    if tries >= _TRIES or not _is_transient(error) or _retried_by_huggingface_hub(error):
        return None
    answered = isinstance(error, (HfHubHTTPError, _DamagedDownload)) or _is_size_mismatch(error)
    if not answered and not outcome_may_be_unknown:
        return None
    retry_after = _retry_after(error)
    if retry_after is None:
        return _FIRST_WAIT_S * 2 ** (tries - 1)
    return retry_after if retry_after <= _MAX_RETRY_AFTER_S else None


def _is_transient(error: BaseException) -> bool:
    """Whether another try may not meet `error`: an HTTP 408, 429 or 5xx answer, a connection refused, lost or
    timed out, an answer cut short (huggingface_hub's size "Consistency check", malformed JSON), damaged bytes."""
    if isinstance(error, HfHubHTTPError):
        return error.response is not None and error.response.status_code in _TRANSIENT_STATUS
    return isinstance(error, (*_TRANSIENT_TRANSPORT, json.JSONDecodeError, _DamagedDownload)) or _is_size_mismatch(
        error
    )


def _is_size_mismatch(error: BaseException) -> bool:
    """huggingface_hub's plain `OSError` for a download whose size differs from the announced one (it is not
    retried there, and the partial file is deleted)."""
    return type(error) is OSError and str(error).startswith("Consistency check failed")


def _retried_by_huggingface_hub(error: BaseException) -> bool:
    """Whether huggingface_hub has already retried the failed request (another round would only multiply its
    waits): `http_backoff` covers commit pre-uploads and tree listings; `http_get` covers 408/429 answers and
    refused, timed-out or cut-off connections of a file download. It does not retry API calls made with a plain
    session (create_repo, create_commit, refs, branches, model info), 5xx answers to a download, a connection
    reset during a download, or a HEAD request that failed other than by refusal or timeout."""
    try:
        if isinstance(error, HfHubHTTPError):
            if error.response is None:
                return False
            request, status = error.response.request, error.response.status_code
        elif isinstance(error, httpx2.RequestError):
            request, status = error.request, None
        else:
            return False
    except RuntimeError:  # an httpx2 error raised without its request
        return False
    path = request.url.path
    if "/preupload/" in path or "/tree/" in path:
        return True
    if request.method == "GET" and "/resolve/" in path:
        if status is not None:
            return status in (408, 429)
        return isinstance(error, (httpx2.ConnectError, httpx2.TimeoutException, httpx2.RemoteProtocolError))
    return False


def _retry_after(error: BaseException) -> float | None:
    """The seconds of a `Retry-After` header (the delay-seconds form) on an HTTP error answer."""
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        value = error.response.headers.get("Retry-After", "").strip()
        if value.isdigit():
            return float(value)
    return None


def _describe(error: BaseException) -> str:
    """One line on what failed: status or exception, method and path."""
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        request = error.response.request
        text = f"HTTP {error.response.status_code} answering {request.method} {request.url.path}"
        retry_after = _retry_after(error)
        return text + (f" (Retry-After: {retry_after:g} s)" if retry_after is not None else "")
    if isinstance(error, httpx2.RequestError):
        with contextlib.suppress(RuntimeError):
            return f"{type(error).__name__} during {error.request.method} {error.request.url.path}: {error}"
    if isinstance(error, json.JSONDecodeError):
        return f"the Hub's answer was cut short or malformed ({error})"
    if _is_size_mismatch(error):  # its advice to retry with force_download does not apply here
        return str(error).splitlines()[0]
    return " ".join(str(error).split())


def _matches_blob_name(file: Path) -> bool:
    """Whether a cached file's bytes hash to the name of its blob, i.e. to the Hub's ETag for it: the git blob
    sha1 of a regular file (40 hex digits, like a commit sha), the sha256 of an LFS/Xet file. True for a file
    that is not a link to such a blob (nothing to compare with)."""
    name = file.resolve().name
    if _SHA256.match(name):
        return file_sha256(file) == name
    if _COMMIT_SHA.match(name):
        return git_hash(file.read_bytes()) == name
    return True


def _discard_cached(file: Path) -> str:
    """Remove a damaged file from the HF cache (its snapshot link and its blob), so that no later run trusts it;
    returns its name."""
    blob = file.resolve()
    file.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)
    return file.name


def _stale_files(api: HfApi, repo_id: str, revision: str | None, keep: set[str]) -> list[str]:
    """Files of an earlier push (old shards, init_adapter files) that the new commit must delete."""
    try:
        existing = api.list_repo_files(repo_id, revision=revision)
    except RevisionNotFoundError:
        return []
    return [path for path in existing if _MANAGED_FILE.fullmatch(path) and path not in keep]


def _base_model_on_hub(api: HfApi, factor_set: FactorSet) -> bool:
    """Whether the recorded base model is an existing Hub repo (only then may the card's YAML name it)."""
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
    """The license declared in the base model's card, when that card can be read.

    A transient failure is raised (and the push retried), not read as "no license": the same factor set must
    always give the same card, or a repeated push would not be a no-op."""
    try:
        readme = api.hf_hub_download(factor_set.base_model, "README.md", revision=factor_set.base_revision)
        return ModelCard.load(readme, ignore_metadata_errors=True).data.get("license")
    except (HfHubHTTPError, EntryNotFoundError, OSError, ValueError) as error:
        if _is_transient(error):
            raise
        logger.debug("No license found for base model %s: %s", factor_set.base_model, error)
        return None

