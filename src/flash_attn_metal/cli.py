"""`python -m flash_attn_metal info | demo | kernels | cache | bench | export-hub`."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from typing import Iterator

import torch

from . import __version__, routing, settings
from .stats import reset_stats, stats


def _kernel_backend() -> str:
    """The backend the demo runs the kernels on here: MPS on a Mac, the emulator elsewhere."""
    return "mps" if torch.backends.mps.is_available() else "emulator"


@contextlib.contextmanager
def _backend_setting(value: str) -> Iterator[None]:
    """FLASH_ATTN_METAL_BACKEND=value for the duration, restored after."""
    previous = os.environ.get(settings.BACKEND)
    os.environ[settings.BACKEND] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[settings.BACKEND]
        else:
            os.environ[settings.BACKEND] = previous


def _alias_line() -> str:
    """What `import flash_attn` resolves to here (found without importing it)."""
    import importlib.util

    try:
        import _flash_attn_metal_alias as alias
    except ImportError:
        return "not installed (the package is not pip-installed)"
    spec = importlib.util.find_spec("flash_attn")
    if spec is None and not alias.enabled():
        return "off (FLASH_ATTN_METAL_SHIM=1 enables it off macOS)"
    if spec is None:
        return "inactive: its .pth file did not run (pip-install the package)"
    if isinstance(spec.loader, alias.AliasLoader):
        return f"import flash_attn serves flash-attn-metal (flash-attn {alias.FLASH_ATTN_API_VERSION} API)"
    return f"a real flash-attn is installed ({spec.origin}); it wins"


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
        ("flash_attn alias", _alias_line()),
        ("cache dir", str(cache_dir())),
        ("native features", _features()),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def demo(_: argparse.Namespace) -> int:
    from .problem import AttentionProblem
    from .reference import attention

    device = "mps" if torch.backends.mps.is_available() else "cpu"
    setting = os.environ.get(settings.BACKEND) or ("auto" if device == "mps" else "emulator")
    torch.manual_seed(0)
    b, s, h, hk, d = 2, 256, 8, 2, 64
    q = torch.randn(b, s, h, d, device=device, dtype=torch.float16, requires_grad=True)
    k = torch.randn(b, s, hk, d, device=device, dtype=torch.float16, requires_grad=True)
    v = torch.randn(b, s, hk, d, device=device, dtype=torch.float16, requires_grad=True)
    grad = torch.randn_like(q)
    print(f"flash_attn_func: batch {b}, seqlen {s}, heads {h} (kv heads {hk}), head dim {d}, fp16, causal, on {device}")
    try:
        with _backend_setting(setting):
            runs = _demo_runs(q, k, v, grad)
    except RuntimeError as error:  # the emulator needs a C++ compiler
        if setting != "emulator":
            raise
        print(f"the Metal emulator cannot run here ({error}); running the PyTorch reference instead")
        with _backend_setting("reference"):
            runs = _demo_runs(q, k, v, grad)

    # The upstream rule: error against fp32 <= 2x (3x for gradients) that of plain fp16 PyTorch.
    truth, low = [], []
    for upcast, results in ((True, truth), (False, low)):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        problem = AttentionProblem(q=leaves[0], k=leaves[1], v=leaves[2], softmax_scale=d**-0.5, causal=True,
                                   window_left=-1, window_right=0, softcap=0.0, alibi_slopes=None, dropout_p=0.0)
        out = attention(problem, upcast=upcast, reorder_ops=not upcast)[0]
        results += [out, *torch.autograd.grad(out, leaves, grad.to(out.dtype))]
    names = ("out", "dq", "dk", "dv")
    for label, seconds, first_seconds, ran, ours in runs:
        print(f"{label}: ran on {ran}")
        print(f"  {seconds * 1e3:8.1f} ms (the first call, which compiles any kernels: {first_seconds * 1e3:.1f} ms)")
        for name, x, t, lp in zip(names, ours, truth, low):
            err, base = (x.float() - t.float()).abs().max().item(), (lp.float() - t.float()).abs().max().item()
            print(f"  max |{name} - fp32 reference| = {err:.2e}   (plain fp16 PyTorch: {base:.2e})")
    for reason in stats()["fallbacks"]:
        print(f"  fallback: {reason}")
    return 0


def _demo_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> list[tuple]:
    """(label, warm seconds, first-call seconds, what ran, results) for inference and for training."""
    from . import flash_attn_func

    def inference() -> list[torch.Tensor]:
        with torch.no_grad():
            return [flash_attn_func(q, k, v, causal=True)]

    def training() -> list[torch.Tensor]:
        out = flash_attn_func(q, k, v, causal=True)
        return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]

    runs = []
    for label, step in (("forward (inference)", inference), ("forward + backward (training)", training)):
        reset_stats()
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            results = step()
            if q.device.type == "mps":
                torch.mps.synchronize()
            timings.append(time.perf_counter() - start)
        launched = stats()["launches"]
        backend = routing.backend_setting()
        ran = (f"Metal kernels via {'the emulator' if backend == 'emulator' else 'MPS'} "
               f"({', '.join(sorted(launched))})" if launched else "the PyTorch reference")
        runs.append((label, timings[1], timings[0], ran, results))
    return runs


def cache(args: argparse.Namespace) -> int:
    from .runtime.cache import cache_info, clear_cache

    if args.action == "clear":
        info = cache_info()
        print(f"removed {clear_cache()} entries from {info['dir']}")
    elif args.action == "info":
        info = cache_info()
        print(f"{info['dir']}: {info['entries']} entries, {info['bytes'] / 2**20:.1f} MiB")
        for name, ns in info["namespaces"].items():
            print(f"  {name:<14} {ns['entries']:>6} entries  {ns['bytes'] / 2**20:8.1f} MiB")
    else:
        _warm()
    return 0


def _warm() -> None:
    """Compile the common kernel variants through this machine's backend, filling both cache tiers."""
    from .kernels import decode_report
    from .kernels.report import common_specs, kernel_sources
    from .runtime import get_backend
    from .runtime.device import NEWEST_FAMILY, gpu_family

    backend = get_backend("mps" if torch.backends.mps.is_available() else "emulator")
    family = gpu_family() or NEWEST_FAMILY
    sources = [source for spec in common_specs(family) for source in kernel_sources(spec, family).values()]
    sources += [source for spec in decode_report.common_specs() for source in decode_report.kernel_sources(spec).values()]
    start = time.perf_counter()
    for i, source in enumerate(sources, 1):
        backend.compile(source)
        bar = "#" * (30 * i // len(sources))
        print(f"\r[{bar:<30}] {i}/{len(sources)} kernels  {time.perf_counter() - start:5.1f} s", end="", flush=True)
    print(f"\nwarmed {len(sources)} kernel libraries for the {backend.name} backend")


def kernels(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .kernels import report

    if args.dump:
        written = report.dump(Path(args.dump))
        print(f"wrote {len(written)} kernels to {args.dump}")
    if args.json:
        print(report.format_json())
    elif args.report or not args.dump:
        print(report.format_report())
    return 0


def bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import bench as harness

    return harness.main(Path(args.out), args.repeats)


def export_hub(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .integrations import hub

    target = hub.export(Path(args.dir))
    print(f"wrote the kernels-hub build {target}")
    print(f'load it with kernels.get_local_kernel(Path("{target}")), or LOCAL_KERNELS="<org>/<repo>={target}"')
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flash_attn_metal", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, device, backend, cache and native features").set_defaults(run=info)
    commands.add_parser("demo", help="forward and backward attention against the reference").set_defaults(run=demo)
    kernels_parser = commands.add_parser("kernels", help="dump the generated MSL, or report static figures")
    kernels_parser.add_argument("--dump", metavar="DIR", help="write a representative set of kernels as .metal files")
    kernels_parser.add_argument("--report", action="store_true",
                                help="static figures per configuration: threads, memory, registers, MMA share, traffic")
    kernels_parser.add_argument("--json", action="store_true", help="the report as JSON, one record per kernel")
    kernels_parser.set_defaults(run=kernels)
    bench_parser = commands.add_parser("bench", help="time the kernels against SDPA (MPS; elsewhere the emulator)")
    bench_parser.add_argument("--out", default="bench-results", help="directory for bench.csv and bench.png")
    bench_parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement")
    bench_parser.set_defaults(run=bench)
    cache_parser = commands.add_parser("cache", help="the compiled-kernel cache")
    cache_parser.add_argument("action", choices=["info", "clear", "warm"])
    cache_parser.set_defaults(run=cache)
    hub_parser = commands.add_parser("export-hub", help="write a Hugging Face kernels-hub build to DIR/build/torch-metal")
    hub_parser.add_argument("dir", metavar="DIR", help="the kernel repository's directory")
    hub_parser.set_defaults(run=export_hub)
    args = parser.parse_args(argv)
    return args.run(args)
