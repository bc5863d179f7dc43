"""`calibrate`: read the calibration samples for a data-driven config and record their identity in it.

The identity (`options["calibration"] = {"sha256", "samples"}`) and a derived `eta` are written into the
`InitConfig` before the cache key is formed: the same base, config and calibration samples hit the cache (no
backward pass); any other data gives another key.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from inilora_hf.errors import CalibrationDataError
from inilora_hf.log import get_logger
from inilora_hf.variants import get_variant
from inilora_hf.variants.config import InitConfig

from .data import CALIBRATION_OPTION, CalibrationSet, CalibrationSource, calibration_set

logger = get_logger(__name__)


def calibrate(
    config: InitConfig,
    source: CalibrationSource | None,
    model: nn.Module,
    *,
    default_eta: float | None = None,
) -> tuple[InitConfig, CalibrationSet]:
    """Read the calibration samples for a data-driven `config` and return the config that identifies them.

    The returned config has `options["calibration"] = {"sha256", "samples"}` and, if `options["eta"]` is
    None and `default_eta` is given (a trainer's first-step learning rate), `options["eta"] = default_eta`.

    Raises:
        ValueError: no calibration data, a variant that does not declare the `calibration` option, a
            quantized base for a variant that needs gradients or writes a residual, or a missing `eta`.

    Example:
        >>> config, cal = calibrate(InitConfig("lora-sb", rank=4, options={"eta": 1e-4}),   # doctest: +SKIP
        ...                         CalibrationSource(rows, samples=16), model)
    """
    spec = get_variant(config.variant)
    if CALIBRATION_OPTION not in spec.defaults:
        raise ValueError(
            f"Data-driven variant {spec.name!r} must declare `{CALIBRATION_OPTION}: None` among its defaults: "
            "inilora_hf records the identity of the calibration samples there, so that it is part of the cache key."
        )
    if config.quantization is not None and (spec.needs_gradients or spec.residual):
        # EVA only reads layer inputs, which a 4/8-bit base has (as with PEFT alone)
        raise ValueError(
            f"Variant {spec.name!r} runs its calibration pass on the full-precision base weights, which a 4/8-bit "
            "base does not have. "
            "Compute the factor set on the full-precision model (no quantization_config), or pick another variant."
        )
    if source is None or source.data is None:
        raise CalibrationDataError(
            f"Variant {spec.name!r} is data-driven and got no calibration data. Pass `calibration_data=` (a tokenized "
            "dataset or a DataLoader) to inilora_init, or train with `inilora_hf.SFTTrainer(model_init=...)`, "
            "which hands the init its own train dataset."
        )
    options = dict(config.options)
    if "eta" in options and options["eta"] is None:
        if default_eta is None:
            raise ValueError(
                f"Variant {spec.name!r} needs `eta`, the learning rate of the first optimizer step (e.g. "
                "learning_rate / warmup_steps with a linear warmup, or learning_rate without warmup): pass "
                "`inilora_init(..., eta=...)`, or train with `inilora_hf.SFTTrainer(model_init=...)`, which derives "
                "it from its arguments."
            )
        options["eta"] = float(default_eta)
    pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    cal = calibration_set(
        source.data,
        samples=source.samples,
        batch_size=source.batch_size,
        collate_fn=source.collate_fn,
        pad_token_id=pad_token_id if isinstance(pad_token_id, int) else 0,
    )
    options[CALIBRATION_OPTION] = cal.identity()
    logger.info(
        "Calibration: %d samples in %d batches (sha256 %s…), eta=%s.",
        cal.samples,
        len(cal.batches),
        cal.sha256[:12],
        options.get("eta"),
    )
    return dataclasses.replace(config, options=options), cal
