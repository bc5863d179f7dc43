"""Writing a factor set into a PEFT model (layer 3): A, B and the residual, quantized residuals, the LoRA-XS core,
and task types."""
