"""Where Mac users already are: each module wires flash-attn-metal into one library, imported on demand.

- `transformers.register()`: an attention function for transformers' `attn_implementation`;
- `diffusers.enable()`: diffusers' `flash` and `flash_varlen` attention backends;
- `hub.export(DIR)`: a kernels-hub build (`python -m flash_attn_metal export-hub DIR`).
"""
