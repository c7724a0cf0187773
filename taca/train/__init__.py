"""``taca train``: LoRA training with TACA on (the paper's recipe), saved in diffusers' LoRA format."""
