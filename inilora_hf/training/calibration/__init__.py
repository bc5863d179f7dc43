"""Calibration data for data-driven variants (`lora-sb`): exact sample selection and its content hash (`data`),
the identity recorded in the config (`identity`), the statistics computed from it on the plain model before PEFT
wraps it (`statistics`), and what a trainer hands an init that was given no data (`trainer`).
"""

from .data import (
    CALIBRATION_OPTION,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CALIBRATION_SAMPLES,
    Batch,
    CalibrationSet,
    CalibrationSource,
    batch_length,
    batches_digest,
    calibration_set,
    pad_collate,
    truncate_batch,
)
from .identity import calibrate
from .statistics import estimate_gradients, input_covariances
from .trainer import (
    first_step_learning_rate,
    offer_trainer_calibration,
    trainer_training_steps,
)

__all__ = [
    "CALIBRATION_OPTION",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CALIBRATION_SAMPLES",
    "Batch",
    "CalibrationSet",
    "CalibrationSource",
    "batch_length",
    "batches_digest",
    "calibrate",
    "calibration_set",
    "estimate_gradients",
    "first_step_learning_rate",
    "input_covariances",
    "offer_trainer_calibration",
    "pad_collate",
    "trainer_training_steps",
    "truncate_batch",
]
