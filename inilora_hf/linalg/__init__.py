"""Pure tensor math (layer 1): the IniLoRA fit kernels (batched Adam, SVD, randomized SVD), same-shape grouping
and bitsandbytes quantization round trips."""
