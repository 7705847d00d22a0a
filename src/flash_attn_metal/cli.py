"""`python -m flash_attn_metal info | demo | kernels | cache`."""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from . import __version__, routing
from .stats import reset_stats, stats


def _kernel_backend() -> str:
    """The backend the demo runs the kernels on here: MPS on a Mac, the emulator elsewhere."""
    return "mps" if torch.backends.mps.is_available() else "emulator"


def _features() -> str:
    return routing.kernels().native_features()


def _family_line(mps: bool) -> str:
    from .runtime.device import NEWEST_FAMILY, gpu_family, known_chip

    if not mps:
        return f"none (no Metal GPU); the emulator runs the {NEWEST_FAMILY} tiles"
    family = gpu_family()
    if family is None:
        return "not Apple silicon: the kernels need Apple7 (M1) or newer, calls run the PyTorch reference"
    if known_chip(torch.backends.mps.get_name()):
        return family
    return f"{family} (an unknown chip: the newest family's tiles are used)"


def info(_: argparse.Namespace) -> int:
    from .runtime.cache import cache_dir

    mac = platform.mac_ver()[0]
    mps = torch.backends.mps.is_available()
    rows = [
        ("flash-attn-metal", __version__),
        ("torch", torch.__version__),
        ("python", platform.python_version()),
        ("os", f"macOS {mac}" if mac else platform.platform()),
        ("device", torch.backends.mps.get_name() if mps and hasattr(torch.backends.mps, "get_name") else
         ("MPS" if mps else "no Metal GPU (kernels run in the emulator)")),
        ("gpu family", _family_line(mps)),
        ("backend setting", routing.backend_setting()),
        ("kernel backend here", _kernel_backend()),
        ("cache dir", str(cache_dir())),
        ("native features", _features()),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def demo(_: argparse.Namespace) -> int:
    from . import flash_attn_func
    from .problem import AttentionProblem
    from .reference import attention

    backend = _kernel_backend()
    device = "mps" if backend == "mps" else "cpu"
    os.environ.setdefault("FLASH_ATTN_METAL_BACKEND", backend if backend == "emulator" else "auto")
    torch.manual_seed(0)
    b, s, h, hk, d = 2, 256, 8, 2, 64
    q = torch.randn(b, s, h, d, device=device, dtype=torch.float16, requires_grad=True)
    k = torch.randn(b, s, hk, d, device=device, dtype=torch.float16, requires_grad=True)
    v = torch.randn(b, s, hk, d, device=device, dtype=torch.float16, requires_grad=True)
    exact = [t.detach().float().requires_grad_() for t in (q, k, v)]
    problem = AttentionProblem(q=exact[0], k=exact[1], v=exact[2], softmax_scale=d**-0.5, causal=True,
                               window_left=-1, window_right=0, softcap=0.0, alibi_slopes=None, dropout_p=0.0)
    ref_out = attention(problem)[0]
    grad = torch.randn_like(ref_out)
    ref_grads = torch.autograd.grad(ref_out, exact, grad)
    print(f"flash_attn_func: batch {b}, seqlen {s}, heads {h} (kv heads {hk}), head dim {d}, fp16, causal, on {device}")

    def ran() -> str:
        launched = stats()["launches"]
        return f"Metal kernels via {backend} ({', '.join(sorted(launched))})" if launched else "the PyTorch reference"

    reset_stats()
    with torch.no_grad():
        start = time.perf_counter()
        out = flash_attn_func(q, k, v, causal=True)
        forward_s = time.perf_counter() - start
    print(f"forward (inference): ran on {ran()}")
    print(f"  {forward_s * 1e3:8.1f} ms   max |out - fp32 reference| = {(out.float() - ref_out).abs().max():.2e}")

    reset_stats()
    start = time.perf_counter()
    out = flash_attn_func(q, k, v, causal=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    step_s = time.perf_counter() - start
    print(f"forward + backward (training): ran on {ran()}")
    errors = ", ".join(f"{n} {(g.float() - r).abs().max():.2e}" for n, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads))
    print(f"  {step_s * 1e3:8.1f} ms   max errors: {errors}")
    for reason in stats()["fallbacks"]:
        print(f"  fallback: {reason}")
    return 0


def cache(args: argparse.Namespace) -> int:
    from .runtime.cache import cache_dir

    root = cache_dir()
    files = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    if args.action == "clear":
        for p in files:
            p.unlink(missing_ok=True)
        print(f"removed {len(files)} entries from {root}")
    else:
        print(f"{root}: {len(files)} entries, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB")
    return 0


def kernels(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .kernels import report

    if args.dump:
        written = report.dump(Path(args.dump))
        print(f"wrote {len(written)} kernels to {args.dump}")
    if args.report or not args.dump:
        print(report.format_report())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flash_attn_metal", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device, backend, cache and native features").set_defaults(run=info)
    commands.add_parser("demo", help="forward and backward attention against the reference").set_defaults(run=demo)
    kernels_parser = commands.add_parser("kernels", help="dump the generated MSL, or report static figures")
    kernels_parser.add_argument("--dump", metavar="DIR", help="write a representative set of kernels as .metal files")
    kernels_parser.add_argument("--report", action="store_true", help="threads, memory and traffic per configuration")
    kernels_parser.set_defaults(run=kernels)
    cache_parser = commands.add_parser("cache", help="the compiled-kernel cache")
    cache_parser.add_argument("action", choices=["info", "clear"])
    cache_parser.set_defaults(run=cache)
    args = parser.parse_args(argv)
    return args.run(args)
