"""Training integration (layer 4): `inilora_init` / `InitFunction`, TRL's SFTTrainer with `model_init`, checkpoint
metadata and `load_trained`, calibration data for data-driven variants."""
