"""Pure tensor math (layer 1): the IniLoRA fit kernels (batched Adam, SVD, randomized SVD) and same-shape grouping."""
