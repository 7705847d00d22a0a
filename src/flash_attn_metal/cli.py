"""`python -m flash_attn_metal COMMAND`: info, demo, selftest, tune, bench, kernels, cache, export-hub (`--help` for
each)."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Iterator

import torch

from . import __version__, routing, settings
from .stats import reset_stats, stats


EMULATOR_SPEED = ("about 0.1 GFLOP/s per CPU core, after a few seconds to compile each new kernel; "
                  "for tests and small shapes")


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """These environment variables set for the duration, restored after."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _kernel_backend() -> str:
    """The backend that runs the kernels on this machine: MPS on a Mac, the CPU emulator elsewhere."""
    return "mps" if torch.backends.mps.is_available() else "emulator"


def _kernels_here() -> dict[str, str]:
    """The settings under which a command runs the kernels on this machine, strictly (a fallback raises): MPS
    tensors on a Mac, CPU tensors in the emulator elsewhere."""
    return {settings.STRICT: "1", settings.BACKEND: _kernel_backend()}


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


def _what_runs_where(mps: bool, setting: str) -> list[tuple[str, str]]:
    """Who computes attention for MPS tensors and for CPU tensors under the current backend setting."""
    from .runtime.device import gpu_family

    reference = "the PyTorch reference (exact, no kernels)"
    emulator = f"the Metal kernels in the CPU emulator: {EMULATOR_SPEED}"
    if setting == "reference":
        return [("MPS tensors", f"{reference}: FLASH_ATTN_METAL_BACKEND=reference"),
                ("CPU tensors", f"{reference}: FLASH_ATTN_METAL_BACKEND=reference")]
    if not mps:
        mps_row = "no MPS device here"
    elif setting == "emulator":
        mps_row = f"{reference}: FLASH_ATTN_METAL_BACKEND=emulator runs CPU tensors; unset it for the GPU"
    elif gpu_family() is None:
        mps_row = f"{reference}: this GPU is not Apple silicon (the kernels need M1 or newer)"
    else:
        mps_row = f"the Metal kernels on the GPU ({torch.backends.mps.get_name()})"
    if setting == "emulator":
        cpu_row = f"{emulator} (FLASH_ATTN_METAL_BACKEND=emulator)"
    else:
        cpu_row = f"{reference}; with FLASH_ATTN_METAL_BACKEND=emulator, {emulator}"
    return [("MPS tensors", mps_row), ("CPU tensors", cpu_row)]


def info(_: argparse.Namespace) -> int:
    from .kernels import tuning
    from .runtime.cache import cache_dir

    mac = platform.mac_ver()[0]
    mps = torch.backends.mps.is_available()
    setting = routing.backend_setting()
    rows = [
        ("flash-attn-metal", __version__),
        ("torch", torch.__version__),
        ("python", platform.python_version()),
        ("os", f"macOS {mac}" if mac else platform.platform()),
        ("device", torch.backends.mps.get_name() if mps and hasattr(torch.backends.mps, "get_name") else
         ("MPS" if mps else "no Metal GPU")),
        ("gpu family", _family_line(mps)),
        ("backend setting", f"{setting} (FLASH_ATTN_METAL_BACKEND)"),
        *_what_runs_where(mps, setting),
        ("tile table", tuning.describe()),
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
    from .verify import references

    device = "mps" if torch.backends.mps.is_available() else "cpu"
    setting = os.environ.get(settings.BACKEND) or ("auto" if device == "mps" else "emulator")
    if device == "cpu" and setting == "emulator":
        print(f"No Metal GPU: the demo runs the Metal kernels in the CPU emulator ({EMULATOR_SPEED}).")
    torch.manual_seed(0)
    b, s, h, hk, d = 2, 256, 8, 2, 64
    q = torch.randn(b, s, h, d, device=device, dtype=torch.float16, requires_grad=True)
    k = torch.randn(b, s, hk, d, device=device, dtype=torch.float16, requires_grad=True)
    v = torch.randn(b, s, hk, d, device=device, dtype=torch.float16, requires_grad=True)
    grad = torch.randn_like(q)
    print(f"flash_attn_func: batch {b}, seqlen {s}, heads {h} (kv heads {hk}), head dim {d}, fp16, causal, on {device}")
    try:
        with _environment(**{settings.BACKEND: setting}):
            runs = _demo_runs(q, k, v, grad)
    except RuntimeError as error:  # the emulator needs a C++ compiler
        if setting != "emulator":
            raise
        print(f"the Metal emulator cannot run here ({error}); running the PyTorch reference instead")
        with _environment(**{settings.BACKEND: "reference"}):
            runs = _demo_runs(q, k, v, grad)

    # The upstream rule: error against fp32 <= 2x (3x for gradients) that of plain fp16 PyTorch.
    exact, plain = references(AttentionProblem(q=q, k=k, v=v, softmax_scale=d**-0.5, causal=True, window_left=-1,
                                               window_right=0, softcap=0.0, alibi_slopes=None, dropout_p=0.0), grad)
    truth, low = [exact.out, *exact.grads], [plain.out, *plain.grads]  # on the CPU
    names = ("out", "dq", "dk", "dv")
    for label, seconds, first_seconds, ran, ours in runs:
        print(f"{label}: ran on {ran}")
        print(f"  {seconds * 1e3:8.1f} ms (the first call, which compiles any kernels: {first_seconds * 1e3:.1f} ms)")
        for name, x, t, lp in zip(names, ours, truth, low):
            err, base = (x.float().cpu() - t.float()).abs().max().item(), (lp.float() - t.float()).abs().max().item()
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

    if args.action is None:
        args.parser.print_help()
        return 2
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

    backend = get_backend(_kernel_backend())
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
    from .kernels import report

    if args.dump:
        written = report.dump(Path(args.dump))
        print(f"wrote {len(written)} kernels to {args.dump}")
    if args.json:
        print(report.format_json())
    elif args.report or not args.dump:
        print(report.format_report())
    return 0


CAUSAL = {"both": (False, True), "yes": (True,), "no": (False,)}  # --causal
DTYPES = ("fp16", "bf16", "fp32")  # --dtypes


def bench(args: argparse.Namespace) -> int:
    from . import bench as harness

    sizes = {field: tuple(value) if isinstance(value, list) else value
             for field in ("seqlens", "head_dims", "dtypes", "heads", "batch")
             if (value := getattr(args, field)) is not None}
    if args.causal is not None:
        sizes["causal"] = CAUSAL[args.causal]
    with _environment(**_kernels_here()):
        return harness.main(Path(args.out), args.repeats, sizes, show_table=args.table,
                            kernel_report=args.kernel_report)


def export_hub(args: argparse.Namespace) -> int:
    from .integrations import hub

    target = hub.export(Path(args.dir))
    print(f"wrote the kernels-hub build {target}")
    print(f'load it with kernels.get_local_kernel(Path("{target}")), or LOCAL_KERNELS="<org>/<repo>={target}"')
    return 0


def selftest(args: argparse.Namespace) -> int:
    from .selftest import runner

    with _environment(**_kernels_here()):
        return runner.main(args.quick, Path(args.report))


def tune(args: argparse.Namespace) -> int:
    from . import tune as tuner
    from .bench import DTYPES as TORCH_DTYPES
    from .kernels import tuning
    from .kernels.spec import MSL_TYPES
    from .runtime.device import gpu_family

    if args.clear:
        removed = tuning.clear()
        print(f"{'removed' if removed else 'there was no'} tuned table {tuning.table_path()}; the built-in tiles apply")
        return 0
    mps = torch.backends.mps.is_available()
    family = gpu_family()  # off a Mac: the newest family, whose tiles the emulator runs
    if family is None:
        print("this GPU is not Apple silicon: the kernels do not run here, so there is nothing to tune")
        return 1
    dtypes = [MSL_TYPES[str(TORCH_DTYPES[d]).removeprefix("torch.")] for d in args.dtypes]
    todo = tuner.keys(args.kinds or list(tuner.KINDS), family, dtypes, args.head_dims, CAUSAL[args.causal])
    if args.dry_run:
        total = 0
        for kind, dtype, d, c in todo:
            found = tuner.KINDS[kind].candidates(family, dtype, d)
            total += len(found)
            listed = ", ".join(f"[{tuner.describe_tiles(t)}]" + (" (built-in)" if i == 0 else "")
                               for i, t in enumerate(found))
            print(f"{tuning.entry_key(kind, family, dtype, d, c)}: {listed}")
        print(f"{len(todo)} keys, {total} candidates; each is checked against the reference before it is timed")
        return 0
    if not mps:
        print("No Metal GPU: every candidate is checked in the CPU emulator and timed there. Emulator timings say "
              "nothing about Apple GPUs; the winners go to this machine's own table.")
    print(f"tuning {len(todo)} keys on {family}; winners go to {tuning.table_path()}")

    def report(done: int, total: int, outcome: "tuner.Outcome") -> None:
        best, table = outcome.winner, outcome.trials[0]
        rejected = [t for t in outcome.trials if t.seconds is None]
        if best is None:
            line = f"no candidate passed the check (first error: {rejected[0].error})"
        else:
            vs = f", built-in {table.seconds * 1e3:.3f} ms" if table.seconds is not None else ", built-in rejected"
            line = f"[{tuner.describe_tiles(best.tiles)}] {best.seconds * 1e3:.3f} ms{vs}"
        if rejected:
            line += f"; {len(rejected)} of {len(outcome.trials)} rejected"
        print(f"[{done}/{total}] {outcome.key}: {line}", flush=True)

    device = "mps" if mps else "cpu"
    with _environment(**_kernels_here()):
        outcomes = tuner.run(todo, family, device, tuner.device_timer(device), report)
    unverified = [o.key for o in outcomes if o.winner is None]
    print(f"stored {len(outcomes) - len(unverified)} winners; `info` shows the table in force")
    return 1 if unverified else 0


def _integer(text: str, expected: str, ok) -> int:
    """An argparse type: `text` as an int for which ok(value) holds, else an error saying what was expected."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}" if value is None else
                                         f"must be {expected}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, "a positive integer", lambda v: v >= 1)


def _head_dim(text: str) -> int:
    return _integer(text, "between 1 and 256", lambda v: 1 <= v <= 256)


def _tuned_head_dim(text: str) -> int:
    from .kernels.tuning import HEAD_DIM_BUCKETS

    value = _integer(text, "an integer", lambda v: True)
    if value not in HEAD_DIM_BUCKETS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, HEAD_DIM_BUCKETS))} (a head dim uses "
                                         f"the smallest of these at least as large), got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    from .kernels.tuning import HEAD_DIM_BUCKETS
    from .tune import KINDS

    parser = argparse.ArgumentParser(prog="python -m flash_attn_metal", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("info", help="versions, device, what runs where, tile table, cache",
                        description="Versions, the Metal device, which code computes attention for MPS and CPU "
                                    "tensors, the tile table in force, the cache.").set_defaults(run=info)
    commands.add_parser("demo", help="forward and backward attention against the reference, timed",
                        description="Forward and backward attention (fp16, causal, GQA) on this machine's kernels, "
                                    "against the fp32 reference.").set_defaults(run=demo)

    selftest_parser = commands.add_parser(
        "selftest", help="check the kernels (and the emulator against real Metal) and write a report",
        description="On a Mac: the emulator's conformance kernels on the GPU against the emulator, the attention "
                    "grid on MPS against the CPU reference, and a few timings against SDPA. Elsewhere the same "
                    "checks run in the CPU emulator. Writes a JSON report and a markdown summary.")
    selftest_parser.add_argument("--quick", action="store_true", help="a smaller grid and one timing shape")
    selftest_parser.add_argument("--report", default="flash-attn-metal-selftest.json", metavar="FILE",
                                 help="the JSON report; the markdown summary goes beside it as .md "
                                      "(default: %(default)s)")
    selftest_parser.set_defaults(run=selftest)

    tune_parser = commands.add_parser(
        "tune", help="time the candidate tiles on this machine and keep the fastest verified ones",
        description="For each kernel kind, dtype, head-dim bucket and causal setting: check every candidate tile "
                    "configuration against the reference, time the ones that pass, and store the fastest in this "
                    "machine's table (keyed by chip, OS and package version), which the kernels then use.")
    tune_parser.add_argument("--dry-run", action="store_true", help="list the candidates without running anything")
    tune_parser.add_argument("--kinds", nargs="+", choices=list(KINDS), help="kernel kinds (default: all)")
    tune_parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="default: all three")
    tune_parser.add_argument("--head-dims", nargs="+", type=_tuned_head_dim, default=list(HEAD_DIM_BUCKETS),
                             metavar="D", help=f"head-dim buckets (default: {' '.join(map(str, HEAD_DIM_BUCKETS))})")
    tune_parser.add_argument("--causal", choices=list(CAUSAL), default="both", help="default: both")
    tune_parser.add_argument("--clear", action="store_true", help="delete this machine's table (back to the built-in "
                                                                  "tiles)")
    tune_parser.set_defaults(run=tune)

    bench_parser = commands.add_parser(
        "bench", help="time the kernels against SDPA (MPS; elsewhere the emulator)",
        description="Forward, backward and forward+backward of flash-attn-metal, SDPA and SDPA's math path over "
                    "each configuration (seqlen x head dim x dtype x causal). One line per configuration; "
                    "bench.csv (and bench.png with matplotlib) in --out.")
    bench_parser.add_argument("--out", default="bench-results", help="directory for bench.csv and bench.png")
    bench_parser.add_argument("--repeats", type=_positive_int, default=5, help="timed runs per measurement (>= 1)")
    bench_parser.add_argument("--seqlens", nargs="+", type=_positive_int, metavar="N",
                              help="default: 512 to 16384 on a Mac, 128 256 in the emulator")
    bench_parser.add_argument("--head-dims", nargs="+", type=_head_dim, metavar="D",
                              help="default: 64 128 256 on a Mac, 64 in the emulator")
    bench_parser.add_argument("--dtypes", nargs="+", choices=DTYPES,
                              help="default: fp16 bf16 on a Mac, fp16 in the emulator")
    bench_parser.add_argument("--heads", type=_positive_int, help="attention heads (default: 16)")
    bench_parser.add_argument("--batch", type=_positive_int, help="sequences per batch (default: 1)")
    bench_parser.add_argument("--causal", choices=list(CAUSAL), help="default: both")
    bench_parser.add_argument("--table", action="store_true", help="print the full results table at the end")
    bench_parser.add_argument("--kernel-report", action="store_true",
                              help="first print the static kernel report (threads, memory, traffic)")
    bench_parser.set_defaults(run=bench)

    kernels_parser = commands.add_parser("kernels", help="dump the generated MSL, or report static figures",
                                         description="Without options: the static report.")
    kernels_parser.add_argument("--dump", metavar="DIR", help="write a representative set of kernels as .metal files")
    kernels_parser.add_argument("--report", action="store_true",
                                help="static figures per configuration: threads, memory, registers, MMA share, traffic")
    kernels_parser.add_argument("--json", action="store_true", help="the report as JSON, one record per kernel")
    kernels_parser.set_defaults(run=kernels)

    cache_parser = commands.add_parser("cache", help="the compiled-kernel cache: info, clear, warm",
                                       description="The compiled-kernel cache on disk.")
    actions = cache_parser.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("info", help="where it is, its entries and size per kind")
    actions.add_parser("clear", help="delete every entry (they are rebuilt on use)")
    actions.add_parser("warm", help="compile the common fp16/bf16 kernels at d = 64 and 128 now")
    cache_parser.set_defaults(run=cache, parser=cache_parser)

    hub_parser = commands.add_parser("export-hub", help="write a Hugging Face kernels-hub build to DIR/build/torch-metal")
    hub_parser.add_argument("dir", metavar="DIR", help="the kernel repository's directory")
    hub_parser.set_defaults(run=export_hub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)
