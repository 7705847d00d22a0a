"""MSL generation: kernel specs and tile tables (spec.py, tiles.py), the forward kernel (forward.py), and the
dispatch that routing calls (dispatch.py)."""
