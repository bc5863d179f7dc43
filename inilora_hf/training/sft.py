"""`SFTTrainer` that accepts `model_init` (trl 1.16's does not), so LoRA inits work with TRL as with Trainer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import trl
from accelerate.utils import is_peft_model
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import enable_full_determinism, set_seed
from trl.trainer.utils import add_fused_lm_head

from .calibration import offer_trainer_calibration


class SFTTrainer(trl.SFTTrainer):
    """`trl.SFTTrainer` plus `model_init=`, like `transformers.Trainer`.

    `model_init` must return the model to train, already wrapped by PEFT (e.g. `inilora_init(...)`): it is
    called once here, reused by the first `train()`, and called again for every later `train()` and every
    `hyperparameter_search` trial, each time receiving the post-processing `trl.SFTTrainer.__init__` gives a
    model (pad ids, input grads for gradient checkpointing, fused LM head, bf16 LoRA on quantized bases).

    A data-driven init (`variant="lora-sb"`) given no `calibration_data` uses this trainer's own train
    dataset as TRL prepares it, its data collator and per-device batch size, and (unless `eta=` was given)
    the learning rate of the first optimizer step under `args` (see `inilora_hf.training.calibration`): the trainer is
    built around the plain base model first, and the PEFT model replaces it once the data is ready.

    Example:
        >>> from trl import SFTConfig
        >>> from inilora_hf import SFTTrainer, inilora_init
        >>> trainer = SFTTrainer(model_init=inilora_init("./base"), args=SFTConfig("out"),    # doctest: +SKIP
        ...                      train_dataset=dataset, processing_class=tokenizer)
        >>> trainer.train()                                                                  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any = None,
        args: trl.SFTConfig | None = None,
        *pos: Any,
        model_init: Callable[..., nn.Module] | None = None,
        **kwargs: Any,
    ) -> None:
        self._initial_model = None
        if model_init is not None:
            if model is not None:
                raise ValueError("Pass either `model` or `model_init` to SFTTrainer, not both.")
            if kwargs.get("peft_config") is not None:
                raise ValueError(
                    "`model_init` and `peft_config` cannot be combined: model_init must return the PEFT model itself "
                    "(inilora_init does), since every re-initialisation calls only model_init."
                )
            if kwargs.get("optimizers", (None, None)) != (None, None):
                raise RuntimeError("`model_init` is incompatible with `optimizers`: pass `optimizer_cls_and_kwargs`.")
            if args is None:
                raise ValueError("`args` (an SFTConfig) is required together with `model_init`.")
            for option in ("chat_template_path", "eos_token"):
                if getattr(args, option, None):
                    raise ValueError(
                        f"SFTConfig.{option} changes the model in SFTTrainer.__init__ only, which a re-initialisation "
                        "through model_init would skip. Apply it to the base model before inilora_init instead."
                    )
            enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
            # transformers infers `Trainer.model_init: Callable[..., PreTrainedModel]`, but any nn.Module (a
            # PeftModel) is accepted (`call_model_init` returns nn.Module) and it assigns None itself.
            self.model_init = model_init  # type: ignore[assignment]
            # Data-driven inits need the train dataset, which trl prepares in __init__, which needs a model: build
            # the trainer around the plain base model, then replace it by model_init's PEFT model.
            # `needs_calibration_data` and `load_base_model` are duck-typed: an InitFunction or a look-alike.
            init: Any = model_init
            needs_data = getattr(init, "needs_calibration_data", False)
            model = init.load_base_model() if needs_data else Trainer.call_model_init(self)
        else:
            needs_data = False
        super().__init__(model, args, *pos, **kwargs)
        self.model_init = model_init  # type: ignore[assignment]  # transformers' inferred type (see above)
        if needs_data:
            del model
            self._init_with_train_data(model_init)
        self._initial_model = self.model if model_init is not None else None

    def _init_with_train_data(self, model_init: Any) -> None:
        """Give `model_init` this trainer's prepared train data as calibration data, then build the model."""
        offer_trainer_calibration(model_init, self)
        # Free the stand-in first. transformers infers `model_wrapped: nn.Module` from its first assignment, though
        # `Trainer.model` (which it mirrors) is Optional; it is None only until model_init's model replaces it.
        self.model = self.model_wrapped = self.callback_handler.model = None  # type: ignore[assignment]
        enable_full_determinism(self.args.seed) if self.args.full_determinism else set_seed(self.args.seed)
        model = self._postprocess(Trainer.call_model_init(self))
        self.model = self.model_wrapped = self.callback_handler.model = model

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """Reuse the model built in `__init__` for the first `train()`; otherwise build and post-process anew."""
        if self._initial_model is not None and trial is None:
            model, self._initial_model = self._initial_model, None
            return model
        self._initial_model = None
        return self._postprocess(Trainer.call_model_init(self, trial))

    def _postprocess(self, model: nn.Module) -> nn.Module:
        """Mirror what `trl.SFTTrainer.__init__` does to a model that it did not build itself."""
        # A PreTrainedModel, or a PeftModel, which forwards `config`, `generation_config` and
        # `enable_input_require_grads` to its base model at run time.
        forwarding: Any = model
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            for name, param in model.named_parameters():
                if param.requires_grad and "lora_magnitude_vector" not in name:
                    param.data = param.data.to(torch.bfloat16)
        if is_peft_model(model) and self.args.gradient_checkpointing:
            forwarding.enable_input_require_grads()
        pad_token_id = getattr(self._tokenizer, "pad_token_id", None)
        if pad_token_id is not None:
            forwarding.config.get_text_config().pad_token_id = pad_token_id
            if getattr(model, "generation_config", None) is not None:
                forwarding.generation_config.pad_token_id = pad_token_id
        add_fused_lm_head(
            forwarding.get_base_model() if is_peft_model(model) else forwarding,
            outputs=("log_probs", "entropy", "is_top1"),
        )
        return model
