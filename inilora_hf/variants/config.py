"""`InitConfig`: everything that determines a factor set, validated, JSON round-trippable and hashable."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from peft.utils.other import get_pattern_key

from .registry import get_variant

CONFIG_FORMAT_VERSION = 1
_FIT_DTYPES = ("float32", "float64")


def _check_patterns(name: str, pattern: Mapping[str, Any], *, integer: bool) -> dict[str, Any]:
    """Validate a `rank_pattern` / `alpha_pattern` (regex or suffix key → positive value) into a plain dict."""
    if not isinstance(pattern, Mapping):
        raise ValueError(
            f"`{name}` must be a dict of module-name pattern → value, e.g. {{'q_proj': 16}}; got {pattern!r}."
        )
    kind = "a positive integer" if integer else "a positive number"
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"`{name}` keys must be non-empty module-name patterns (as in PEFT), got {key!r}.")
        try:
            re.compile(key)
        except re.error as error:
            raise ValueError(
                f"`{name}` key {key!r} is not a valid regular expression ({error}); fix the pattern."
            ) from None
        bad_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
        if bad_type or not value > 0:
            raise ValueError(f"`{name}[{key!r}]` must be {kind}, got {value!r}.")
    return dict(pattern)


def normalize_targets(target_modules: Sequence[str] | str) -> tuple[str, ...] | str:
    """Validate `target_modules`; a list becomes a sorted tuple (order never changes the factors).

    Example:
        >>> normalize_targets(["v_proj", "q_proj", "q_proj"])
        ('q_proj', 'v_proj')
    """
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("`target_modules` is empty; name at least one module, e.g. ['q_proj', 'v_proj'].")
        return target_modules
    targets = tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"`target_modules` must be a non-empty list of module names, got {target_modules!r}.")
    return tuple(sorted(set(targets)))


@dataclass
class InitConfig:
    """How to initialise LoRA factors for a base model.

    Args:
        variant: Name of a registered variant (`"inilora"`, `"inilora-alpha"`, `"pissa"`, ...); see
            `inilora_hf.available_variants()`.
        rank: LoRA rank `r`.
        lora_alpha: LoRA alpha; defaults to `rank` (the IniLoRA authors' setting, scaling 1).
        use_rslora: Use rank-stabilised scaling `lora_alpha / sqrt(r)` instead of `lora_alpha / r`.
        target_modules: Module-name suffixes (as in `peft.LoraConfig`) or one regular expression string.
        options: Variant options (e.g. `steps`, `lr`, `seed`, `sigma`, `kaiming`). Missing options are filled
            with the variant's defaults so that two configs that mean the same thing hash the same.
        dtype: Dtype the factors are computed in (`"float32"` by default; residuals are always computed in
            at least fp32).
        quantization: For bitsandbytes bases: the layers' quantization settings (`bits`, `quant_type`,
            `blocksize`, ...), the dtype the adapters train in (`adapter_dtype`, bf16 as in QLoRA) and the
            number of LoftQ-style refinement rounds (`refine_steps`). None for full-precision bases.
        rank_pattern: Per-module ranks exactly as `peft.LoraConfig.rank_pattern`: a key (a module-name suffix or a
            regular expression) → rank for the modules it matches; other modules get `rank`.
        alpha_pattern: Per-module alphas as `peft.LoraConfig.alpha_pattern`; other modules get `lora_alpha`.

    Example:
        >>> cfg = InitConfig("inilora", rank=8, options={"steps": 2000})
        >>> cfg.scaling, cfg.options["lr"]
        (1.0, 0.0005)
        >>> InitConfig.from_json(cfg.to_json()) == cfg
        True
    """

    variant: str = "inilora"
    rank: int = 8
    lora_alpha: float | None = None
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    options: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    quantization: dict[str, Any] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = get_variant(self.variant)
        self.variant = spec.name
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"`rank` must be a positive integer, got {self.rank!r}.")
        if self.lora_alpha is None:
            self.lora_alpha = self.rank
        if not isinstance(self.lora_alpha, (int, float)) or not self.lora_alpha > 0:
            raise ValueError(f"`lora_alpha` must be a positive number, got {self.lora_alpha!r}.")
        self.target_modules = normalize_targets(self.target_modules)
        self.rank_pattern = _check_patterns("rank_pattern", self.rank_pattern, integer=True)
        self.alpha_pattern = _check_patterns("alpha_pattern", self.alpha_pattern, integer=False)
        if self.dtype not in _FIT_DTYPES:
            raise ValueError(f"`dtype` must be one of {_FIT_DTYPES}, got {self.dtype!r}.")
        self.options = spec.resolve_options(self.options)
        if self.quantization is not None:
            self.quantization = {"adapter_dtype": "bfloat16", "refine_steps": 0, **self.quantization}
            steps = self.quantization["refine_steps"]
            if not isinstance(steps, int) or steps < 0:
                raise ValueError(f"`refine_steps` must be a non-negative integer, got {steps!r}.")
            if self.quantization.get("bits") not in (4, 8):
                raise ValueError(f"`quantization['bits']` must be 4 or 8, got {self.quantization.get('bits')!r}.")

    @property
    def scaling(self) -> float:
        """The LoRA scaling `s` that multiplies `B @ A` (PEFT's `alpha / r`, or `alpha / sqrt(r)` with rsLoRA)."""
        alpha = self.rank if self.lora_alpha is None else self.lora_alpha  # None only before __post_init__
        return alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def rank_for(self, name: str) -> int:
        """The rank of module `name` (its full name in the base model): `rank_pattern`'s match as PEFT finds it, else
        `rank`.

        Example:
            >>> InitConfig("lora", rank=4, rank_pattern={"q_proj": 8}).rank_for("model.layers.0.self_attn.q_proj")
            8
        """
        return self.rank_pattern.get(get_pattern_key(list(self.rank_pattern), name), self.rank)

    def alpha_for(self, name: str) -> float:
        """The LoRA alpha of module `name`: `alpha_pattern`'s match as PEFT finds it, else `lora_alpha`.

        Example:
            >>> InitConfig("lora", rank=4, alpha_pattern={"v_proj": 2}).alpha_for("model.layers.0.self_attn.q_proj")
            4
        """
        alpha = self.rank if self.lora_alpha is None else self.lora_alpha  # None only before __post_init__
        return self.alpha_pattern.get(get_pattern_key(list(self.alpha_pattern), name), alpha)

    def scaling_for(self, name: str) -> float:
        """The LoRA scaling of module `name` as PEFT sets it: `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).

        Example:
            >>> InitConfig("lora", rank=4, rank_pattern={"q_proj": 8}).scaling_for("layers.0.q_proj")
            0.5
        """
        rank = self.rank_for(name)
        return self.alpha_for(name) / (math.sqrt(rank) if self.use_rslora else rank)

    def pattern_summary(self) -> str:
        """`", rank_pattern {...}, alpha_pattern {...}"` for the patterns that are set (cards and logs), else `""`.

        Example:
            >>> InitConfig("lora", rank=4, rank_pattern={"q_proj": 8}).pattern_summary()
            ", rank_pattern {'q_proj': 8}"
        """
        return "".join(
            f", {name} {value!r}"
            for name, value in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern))
            if value
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict, including the format version."""
        data = asdict(self)
        data["target_modules"] = (
            self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        )
        data["format_version"] = CONFIG_FORMAT_VERSION
        for key in ("rank_pattern", "alpha_pattern"):  # absent when empty: such configs hash as before patterns
            if not data[key]:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InitConfig:
        """Inverse of `to_dict`; rejects unknown keys and newer format versions with a clear error."""
        data = dict(data)
        version = data.pop("format_version", CONFIG_FORMAT_VERSION)
        if version > CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"This InitConfig was written by a newer inilora_hf (format version {version}, this version reads "
                f"up to {CONFIG_FORMAT_VERSION}). Upgrade inilora_hf: `pip install -U inilora_hf`."
            )
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"Unknown InitConfig fields {sorted(unknown)}.")
        if isinstance(data.get("target_modules"), list):
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), the basis of `config_hash`."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> InitConfig:
        """Parse `to_json` output."""
        return cls.from_dict(json.loads(text))

    def config_hash(self) -> str:
        """A stable 16-hex-digit hash of everything that changes the factors (used in cache keys)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]
