"""`FactorSet`: the initial LoRA factors of every target module, plus what they were computed from, with
`from_pretrained` / `save_pretrained` / `push_to_hub` for local directories and Hub repos.

The local format lives in `format.FactorSetData`; the Hub verbs come from `publish`, which builds on the generic
transport in `inilora_hf.hub` (the shape of huggingface_hub's `ModelHubMixin`: the hub layer never imports the
class it serves).
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import CommitInfo

from inilora_hf.hub.transport import hub_source

from .format import FactorSetData
from .publish import download_factor_set, push_factor_set


class FactorSet(FactorSetData):
    """Initial A/B factors (and optionally the residual) for every target module of one base model.

    See `FactorSetData` for the fields. Adds loading from a Hub repo and pushing to one.

    Example:
        >>> fs = FactorSet.from_pretrained("./factors/llama-inilora-r8")        # doctest: +SKIP
        >>> fs.push_to_hub("my-org/llama-inilora-r8")                             # doctest: +SKIP
    """

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        endpoint: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        verify_checksums: bool = True,
    ) -> FactorSet:
        """Load a factor set from a local directory or a Hub repo (downloaded with `snapshot_download`).

        Every file is checked against the checksum recorded at save time; a missing, truncated or altered
        file raises `FactorSetCorruptError` naming it. From the Hub, a file that arrives damaged is removed from
        the HF cache and downloaded again (see `inilora_hf.download_factor_set`). `verify_checksums=False`
        skips the hashing (only for a directory whose files were just verified otherwise, e.g. a cache entry
        checked against its manifest).

        Example:
            >>> fs = FactorSet.from_pretrained("org/llama-3-8b-inilora-r8", revision="main")   # doctest: +SKIP
        """
        path = Path(name_or_path)
        source: dict[str, str] = {}
        if not path.is_dir():
            path = download_factor_set(
                str(name_or_path),
                revision=revision,
                token=token,
                endpoint=endpoint,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
            source = hub_source(str(name_or_path), path)
            verify_checksums = False  # download_factor_set has just checked every file (and re-fetched bad ones)
        factor_set = cls._load_directory(path, verify_checksums=verify_checksums)
        factor_set.info.update(source)  # source_repo, source_revision (the resolved commit sha)
        return factor_set

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | bool | None = None,
        create_pr: bool = False,
        endpoint: str | None = None,
        include_residual: bool = False,
        license: str | None = None,
    ) -> CommitInfo:
        """Upload to a Hub repo in one commit: factors, metadata, a model card and `init_adapter/` (a plain PEFT
        adapter of the initial A/B). See `inilora_hf.push_factor_set` for the options.

        Example:
            >>> info = fs.push_to_hub("my-org/llama-3.2-1b-inilora-r8", private=True)   # doctest: +SKIP
            >>> FactorSet.from_pretrained("my-org/llama-3.2-1b-inilora-r8", revision=info.oid)  # doctest: +SKIP
        """
        return push_factor_set(
            self,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
            endpoint=endpoint,
            include_residual=include_residual,
            license=license,
        )
