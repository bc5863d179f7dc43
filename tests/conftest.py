"""Shared pytest fixtures for the inilora_hf test suite."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.hub_server import serve

HUB_TOKEN = "hf_test_token"

# Env vars that would leak the developer's setup (real token, real cache, offline flags, staging).
_HF_ENV_TO_CLEAR = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_OIDC_RESOURCE",
    "HUGGINGFACE_HUB_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_ASSETS_CACHE",
    "HUGGINGFACE_CO_STAGING",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
)


def _isolate_huggingface_hub(mp: pytest.MonkeyPatch, url: str, home: Path) -> None:
    """Point the in-process client at the fake Hub and a temp HF_HOME.

    huggingface_hub reads its env vars once, at import, into ``constants`` (and a couple of
    modules copy a value by name), so the environment alone is not enough in-process.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import _cache_manager, _detect_agent

    hub_cache = str(home / "hub")
    patches = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HOME": str(home),
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),  # absent file: no stored token is ever read
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
    }
    for name, value in patches.items():
        mp.setattr(constants, name, value)
    mp.setattr(_cache_manager, "HF_HUB_CACHE", hub_cache)  # copied by name at import
    # Likewise (the package re-exports a class under the module's name): as HF_HUB_DISABLE_PROGRESS_BARS=1 below.
    mp.setattr(importlib.import_module("huggingface_hub.utils.tqdm"), "HF_HUB_DISABLE_PROGRESS_BARS", True)
    # Module-level helpers such as `huggingface_hub.file_exists` (used by PEFT) are bound to an HfApi made at import.
    from huggingface_hub import hf_api

    mp.setattr(hf_api.api, "endpoint", url)
    # The agent-harness registry is fetched from {ENDPOINT} once per process; never from the real Hub.
    mp.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)


def _isolated_env(mp: pytest.MonkeyPatch, url: str, home: Path) -> dict[str, str]:
    """Set the HF env vars for this test and return a copy usable by ``subprocess.run(env=...)``."""
    for name in _HF_ENV_TO_CLEAR:
        mp.delenv(name, raising=False)
    values = {
        "HF_ENDPOINT": url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN": HUB_TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_COLOR": "1",
    }
    for name, value in values.items():
        mp.setenv(name, value)
    return dict(os.environ)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """A fresh fake Hugging Face Hub on 127.0.0.1, with the client isolated from this machine.

    Attributes of the yielded namespace:

    * ``url``: the endpoint (``http://127.0.0.1:PORT``), also in ``HF_ENDPOINT`` / ``constants.ENDPOINT``.
    * ``store``: the server state (:class:`tests.hub_server.HubStore`): ``store.repo(id).history("main")``,
      ``store.requests`` (list of ``(method, path)``), ``store.inject(kind, method, path_regex, times=1, ...)``
      to fail requests on purpose (:class:`tests.hub_server.Fault`; its ``hits`` count the failed requests).
    * ``api``: ``HfApi(endpoint=url, token="hf_test_token")``.
    * ``token``: ``"hf_test_token"`` (also in ``HF_TOKEN``; the server accepts any bearer token).
    * ``home`` / ``cache_dir``: the temp ``HF_HOME`` and its ``hub`` cache (``HF_HUB_CACHE``).
    * ``env`` / ``offline_env``: environment dicts for ``subprocess.run(..., env=...)`` (e.g. the ``hf`` CLI);
      ``offline_env`` adds ``HF_HUB_OFFLINE=1``.
    * ``offline()``: context manager turning offline mode on in-process (``constants.HF_HUB_OFFLINE``
      and the ``HF_HUB_OFFLINE`` env var) for the duration of the ``with`` block.
    """
    from huggingface_hub import HfApi, constants

    server = serve()
    home = tmp_path / "hf_home"
    home.mkdir()
    _isolate_huggingface_hub(monkeypatch, server.url, home)
    env = _isolated_env(monkeypatch, server.url, home)

    @contextlib.contextmanager
    def offline() -> Iterator[None]:
        """Simulate ``HF_HUB_OFFLINE=1`` in-process (``is_offline_mode()`` reads the constant)."""
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(constants, "HF_HUB_OFFLINE", True)
            mp.setenv("HF_HUB_OFFLINE", "1")
            yield

    try:
        yield SimpleNamespace(
            url=server.url,
            store=server.store,
            api=HfApi(endpoint=server.url, token=HUB_TOKEN),
            token=HUB_TOKEN,
            home=home,
            cache_dir=home / "hub",
            env=env,
            offline_env=dict(env, HF_HUB_OFFLINE="1"),
            offline=offline,
        )
    finally:
        server.shutdown()


# ---------------------------------------------------------------- tiny models shared by the suite

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def tiny_llama(seed: int = 0, **overrides):
    """A randomly initialised 2-layer Llama (q_proj 64×64, v_proj 32×64), deterministic in `seed`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread() -> Iterator[None]:
    """The suite's matrices are tiny: one intra-op thread is fastest, and it avoids OpenMP spin-waits that made
    20 000-step fits several times slower on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated_factor_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own factor cache, so no test reads or writes the developer's real one."""
    cache = tmp_path / "inilora-cache"
    monkeypatch.setenv("INILORA_HF_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama checkpoint on disk (the 'original base model' of many tests)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(directory)
    return directory


@pytest.fixture
def token_dataset():
    """32 random token sequences with labels, for Trainer tests."""
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, TINY_LLAMA["vocab_size"], (32, 12), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * 12 for _ in ids]})
