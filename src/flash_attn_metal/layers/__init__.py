"""flash-attn's `flash_attn.layers` package: the modules that code written for flash-attn imports from it."""
