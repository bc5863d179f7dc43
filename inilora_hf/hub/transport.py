"""Generic Hub transport for repos of this package: fault handling, error translation, cache checks.

Nothing here knows the class it serves: `inilora_hf.factorsets.publish` builds factor-set repos on top of it
(the shape of huggingface_hub's `ModelHubMixin`, where the hub layer never imports the classes it serves).

Faults on the wire: what huggingface_hub does not retry itself (5xx and 429 answers to API calls and to file
downloads, connections reset or answers cut short outside its resume loop) is retried here, `TRIES` tries in all
with backoff or the `Retry-After` the Hub asks for; a downloaded file is checked before it is trusted and fetched
again if damaged; a final failure is a `FactorSetHubError` naming the repo and saying what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils.sha import git_hash

from inilora_hf.errors import (
    FactorSetCorruptError,
    FactorSetError,
    FactorSetHubError,
    FactorSetNotFoundError,
    HubAuthenticationError,
)
from inilora_hf.log import get_logger

logger = get_logger(__name__)

_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# Retries of what huggingface_hub does not retry itself: tries in all, the first wait, the longest Retry-After
# honoured (a longer one fails at once, naming the wait the Hub asked for).
TRIES = 3
_FIRST_WAIT_S = 1.0
_MAX_RETRY_AFTER_S = 60.0
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_TRANSPORT = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)
_Result = TypeVar("_Result")


def is_hub_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub repo id (`org/name`) rather than a local path.

    Example:
        >>> is_hub_id("meta-llama/Llama-3.2-1B"), is_hub_id("./base"), is_hub_id("/tmp/x/base"), is_hub_id(None)
        (True, False, False, False)
    """
    if not name or not _HUB_ID.match(name) or "--" in name or ".." in name or name.endswith(".git"):
        return False
    return not os.path.exists(name)


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


# ------------------------------------------------------------------------------------------------ errors


@contextlib.contextmanager
def translated_hub_errors(
    action: str,
    repo_id: str,
    revision: str | None,
    endpoint: str,
    *,
    required_file: str,
    create_pr: bool = False,
) -> Iterator[None]:
    """Re-raise huggingface_hub errors as `FactorSetHubError`s that name the repo, the revision and the fix."""
    where = f"{repo_id!r} (revision {revision or 'main'!r}) on {endpoint}"
    try:
        yield
    except FactorSetError:
        raise
    except DamagedDownload as error:
        raise FactorSetCorruptError(
            f"{', '.join(error.names)} of the factor set {where} did not match the recorded checksum in {TRIES} "
            "downloads and was removed from the cache: the copy on the Hub (or something between it and you) is "
            "damaged. Push the factor set again (`inilora-hf push` / `FactorSet.push_to_hub`), then pull it."
        ) from error
    except HFValidationError as error:
        raise FactorSetNotFoundError(
            f"{repo_id!r} is neither an existing directory nor a valid Hub repo id ('org/name'): check the path, or "
            "pass the 'org/name' of a factor-set repo."
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
        if error.__cause__ is not None and is_transient(error.__cause__):  # online, but the Hub kept failing
            raise hub_failure(action, where, error.__cause__, create_pr=create_pr) from error
        raise FactorSetNotFoundError(
            f"The factor set {where} is not in the local Hugging Face cache, and the Hub cannot be reached "
            "(offline mode: HF_HUB_OFFLINE=1 or local_files_only=True, or no network). Download it once while "
            f"online (`inilora-hf pull {repo_id}` or `hf download {repo_id}`), or unset HF_HUB_OFFLINE."
        ) from error
    except EntryNotFoundError as error:
        raise FactorSetNotFoundError(
            f"{where} has no {required_file}: it is not an inilora_hf factor-set repo. If it is a base model, pass "
            "it as the model, not as `factors=`; factor-set repos are created with `FactorSet.push_to_hub` or "
            "`inilora-hf push`."
        ) from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in _TRANSIENT_STATUS:
            raise hub_failure(action, where, error, create_pr=create_pr) from error
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
        if not is_transient(error):
            raise
        raise hub_failure(action, where, error, create_pr=create_pr) from error


def hub_failure(action: str, where: str, error: BaseException, *, create_pr: bool) -> FactorSetHubError:
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
    return FactorSetHubError(f"The {action} of {where} failed: {describe(error).rstrip('.')}. {remedy}")


# ------------------------------------------------------------------------------------------------ faults


class DamagedDownload(Exception):
    """Downloaded files whose bytes do not match their checksum (already removed from the cache)."""

    def __init__(self, repo_id: str, commit: str | None, names: list[str]) -> None:
        super().__init__(f"{', '.join(names)} of {repo_id} (commit {commit}) arrived damaged")
        self.names = names


def with_retries(what: str, attempt: Callable[[], _Result], *, outcome_may_be_unknown: bool = True) -> _Result:
    """Run `attempt` up to `TRIES` times while it fails in a way another try may not meet (see `retry_wait`).

    `outcome_may_be_unknown=False`: do not retry a failure after which the request may have taken effect (a lost
    connection, an answer cut short), for requests that are not safe to repeat."""
    tries = 0
    while True:
        tries += 1
        try:
            return attempt()
        except (httpx2.HTTPError, OSError, ValueError, DamagedDownload) as error:
            wait = retry_wait(error, tries, outcome_may_be_unknown=outcome_may_be_unknown)
            if wait is None:
                raise
            logger.info("The %s failed (%s); try %d of %d in %g s.", what, describe(error), tries + 1, TRIES, wait)
            time.sleep(wait)


def retry_wait(error: BaseException, tries: int, *, outcome_may_be_unknown: bool) -> float | None:
    """Seconds to wait before another try after the `tries`-th failure, or None: no tries left, the failure is
    not transient, huggingface_hub has already retried that request, the request may have taken effect (unless
    `outcome_may_be_unknown`), or the Hub asks to wait longer than `_MAX_RETRY_AFTER_S`."""
    if tries >= TRIES or not is_transient(error) or retried_by_huggingface_hub(error):
        return None
    answered = isinstance(error, (HfHubHTTPError, DamagedDownload)) or is_size_mismatch(error)
    if not answered and not outcome_may_be_unknown:
        return None
    retry_after = retry_after_seconds(error)
    if retry_after is None:
        return _FIRST_WAIT_S * 2 ** (tries - 1)
    return retry_after if retry_after <= _MAX_RETRY_AFTER_S else None


def is_transient(error: BaseException) -> bool:
    """Whether another try may not meet `error`: an HTTP 408, 429 or 5xx answer, a connection refused, lost or
    timed out, an answer cut short (huggingface_hub's size "Consistency check", malformed JSON), damaged bytes."""
    if isinstance(error, HfHubHTTPError):
        return error.response is not None and error.response.status_code in _TRANSIENT_STATUS
    return isinstance(error, (*_TRANSIENT_TRANSPORT, json.JSONDecodeError, DamagedDownload)) or is_size_mismatch(error)


def is_size_mismatch(error: BaseException) -> bool:
    """huggingface_hub's plain `OSError` for a download whose size differs from the announced one (it is not
    retried there, and the partial file is deleted)."""
    return type(error) is OSError and str(error).startswith("Consistency check failed")


def retried_by_huggingface_hub(error: BaseException) -> bool:
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


def retry_after_seconds(error: BaseException) -> float | None:
    """The seconds of a `Retry-After` header (the delay-seconds form) on an HTTP error answer."""
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        value = error.response.headers.get("Retry-After", "").strip()
        if value.isdigit():
            return float(value)
    return None


def describe(error: BaseException) -> str:
    """One line on what failed: status or exception, method and path."""
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        request = error.response.request
        text = f"HTTP {error.response.status_code} answering {request.method} {request.url.path}"
        retry_after = retry_after_seconds(error)
        return text + (f" (Retry-After: {retry_after:g} s)" if retry_after is not None else "")
    if isinstance(error, httpx2.RequestError):
        with contextlib.suppress(RuntimeError):
            return f"{type(error).__name__} during {error.request.method} {error.request.url.path}: {error}"
    if isinstance(error, json.JSONDecodeError):
        return f"the Hub's answer was cut short or malformed ({error})"
    if is_size_mismatch(error):  # its advice to retry with force_download does not apply here
        return str(error).splitlines()[0]
    return " ".join(str(error).split())


def matches_blob_name(file: Path) -> bool:
    """Whether a cached file's bytes hash to the name of its blob, i.e. to the Hub's ETag for it: the git blob
    sha1 of a regular file (40 hex digits, like a commit sha), the sha256 of an LFS/Xet file. True for a file
    that is not a link to such a blob (nothing to compare with)."""
    name = file.resolve().name
    if _SHA256.match(name):
        return file_sha256(file) == name
    if _COMMIT_SHA.match(name):
        return git_hash(file.read_bytes()) == name
    return True


def discard_cached(file: Path) -> str:
    """Remove a damaged file from the HF cache (its snapshot link and its blob), so that no later run trusts it;
    returns its name."""
    blob = file.resolve()
    file.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)
    return file.name


def base_model_on_hub(api: HfApi, base_model: str | None) -> bool:
    """Whether the recorded base model is an existing Hub repo (only then may the card's YAML name it)."""
    if base_model is not None and is_hub_id(base_model) and api.repo_exists(base_model):
        return True
    logger.warning(
        "The factor set's base model %r is not a model on %s: the model card will not link it. Set "
        "`factor_set.base_model = 'org/name'` (its Hub id) before pushing to place the repo in the base model's tree.",
        base_model,
        api.endpoint,
    )
    return False


def base_model_license(api: HfApi, base_model: str, base_revision: str | None) -> str | None:
    """The license declared in the base model's card, when that card can be read.

    A transient failure is raised (and the push retried), not read as "no license": the same factor set must
    always give the same card, or a repeated push would not be a no-op."""
    try:
        readme = api.hf_hub_download(base_model, "README.md", revision=base_revision)
        return ModelCard.load(readme, ignore_metadata_errors=True).data.get("license")
    except (HfHubHTTPError, EntryNotFoundError, OSError, ValueError) as error:
        if is_transient(error):
            raise
        logger.debug("No license found for base model %s: %s", base_model, error)
        return None
