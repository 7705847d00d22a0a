"""`python -m flash_attn_metal selftest`: check this machine's kernels, and the emulator against real Metal.

    conformance.py  the emulator's conformance kernels with their expected results (shared with the tests)
    attention.py    the attention grid: every public function against the CPU reference
    runner.py       runs the sections (GPU on a Mac, the emulator elsewhere) and writes the report
    report.py       the report: JSON, and markdown for pasting into an issue
"""
