"""Test-session settings shared by every test file."""

from __future__ import annotations

import os
import tempfile

# torch.compile's on-disk caches are keyed by the traced graph, not by what our custom ops do: a graph compiled by
# an older checkout (another schema of torch.ops.flash_attn_metal.*) would be replayed. Each session compiles into
# a fresh directory.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="flash-attn-metal-inductor-")
