"""`python -m flash_attn_metal tune`: time the generator's candidate tiles on this machine and keep the fastest
verified one per (kernel kind, GPU family, dtype, head-dim bucket, causal).

Each kernel kind registers its tile type and candidates with `kernels/tuning.py` (the built-in table's choice
first) and, here, a `KernelKind`: a workload that checks one candidate against the reference and times it. For
every key the tuner runs each candidate under `tuning.trying(...)`: first the check (the upstream tolerance rule
against the CPU reference; a candidate that fails it, or fails to compile or launch, is rejected and never
timed), then the timer. The fastest verified candidate is stored in this machine's table (`kernels/tuning.py`),
which the kernels use from then on.

On a Mac the workloads run on MPS tensors; elsewhere on CPU tensors in the emulator, whose timings say nothing
about Apple GPUs (there the tuner is tested with a fake timer). Run it under FLASH_ATTN_METAL_STRICT=1 (the CLI
does) so that a fallback to the reference fails the check instead of passing it.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from .kernels import tuning
from .kernels.spec import MSL_TYPES
from .problem import AttentionProblem
from .selftest.report import describe_error
from .verify import compare_results, failures, references

DTYPES = {msl: getattr(torch, name) for name, msl in MSL_TYPES.items()}  # MSL name -> torch dtype
TIMED_REPEATS = 5  # per candidate, after one warm-up run; the median counts

Timer = Callable[[Callable[[], object]], float]  # seconds one run of a step takes


@dataclass(frozen=True)
class Workload:
    """One key's work: `check()` runs the kernels on a small ragged problem and says what is wrong (None: within
    the rule); `make_step()` prepares the timed problem and returns one run of it. Both run under the trial."""

    check: Callable[[], str | None]
    make_step: Callable[[], Callable[[], object]]


@dataclass(frozen=True)
class KernelKind:
    name: str  # a kind registered with kernels/tuning.py, which holds its candidates
    workload: Callable[[str, str, int, bool], Workload]  # (device, MSL dtype, head dim, causal)
    overrides: tuple[str, ...]  # the `tuning.current` kinds a trial's tiles stand in for

    def candidates(self, family: str, dtype: str, head_dim: int) -> list:
        return tuning.KINDS[self.name].candidates(family, dtype, head_dim)


KINDS: dict[str, KernelKind] = {}


def register(kind: KernelKind) -> None:
    KINDS[kind.name] = kind


@dataclass(frozen=True)
class Trial:
    tiles: Any  # the kind's tile type
    seconds: float | None  # None: rejected
    error: str | None  # why it was rejected


@dataclass(frozen=True)
class Outcome:
    key: str
    trials: tuple[Trial, ...]

    @property
    def winner(self) -> Trial | None:
        """The fastest verified trial (the table's choice on a tie: it is tried first)."""
        verified = [t for t in self.trials if t.seconds is not None]
        return min(verified, key=lambda t: t.seconds) if verified else None


def keys(kinds: Iterable[str], family: str, dtypes: Iterable[str], head_dims: Iterable[int],
         causal: Iterable[bool]) -> list[tuple[str, str, int, bool]]:
    """(kind, dtype, head dim, causal) to tune, in order."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"kinds must be among {', '.join(KINDS)}, got {', '.join(unknown)}")
    return [(k, dt, d, c) for k in kinds for dt in dtypes for d in head_dims for c in causal]


def tune_one(kind: str, family: str, device: str, dtype: str, head_dim: int, causal: bool, timer: Timer) -> Outcome:
    """Check and time every candidate of one key; stores nothing."""
    registered = KINDS[kind]
    workload = registered.workload(device, dtype, head_dim, causal)
    trials = []
    for tiles in registered.candidates(family, dtype, head_dim):
        with tuning.trying({name: tiles for name in registered.overrides}):
            try:
                error = workload.check()
                seconds = timer(workload.make_step()) if error is None else None
            except Exception as exc:  # a compile or launch failure rejects the candidate, as a wrong result does
                error, seconds = describe_error(exc), None
        trials.append(Trial(tiles, seconds, error))
    return Outcome(tuning.entry_key(kind, family, dtype, head_dim, causal), tuple(trials))


def run(todo: list[tuple[str, str, int, bool]], family: str, device: str, timer: Timer,
        report: Callable[[int, int, Outcome], None]) -> list[Outcome]:
    """Tune every key and store each winner as soon as it is known (an interrupted run keeps what it finished)."""
    outcomes = []
    for i, (kind, dtype, head_dim, causal) in enumerate(todo):
        outcome = tune_one(kind, family, device, dtype, head_dim, causal, timer)
        best = outcome.winner
        if best is not None:
            table = outcome.trials[0]
            tuning.store({outcome.key: best.tiles}, {outcome.key: {
                "ms": best.seconds * 1e3, "table_ms": table.seconds * 1e3 if table.seconds is not None else None,
                "candidates": len(outcome.trials), "rejected": sum(t.seconds is None for t in outcome.trials)}})
        outcomes.append(outcome)
        report(i + 1, len(todo), outcome)
    return outcomes


def device_timer(device: str, repeats: int = TIMED_REPEATS) -> Timer:
    """The median of `repeats` synchronised runs after a warm-up one (which also compiles)."""
    def sync() -> None:
        if device == "mps":
            torch.mps.synchronize()

    def timer(step: Callable[[], object]) -> float:
        step()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return timer


def describe_tiles(tiles: Any) -> str:
    """The tile fields but a reason, as `name=value` pairs (whatever fields the tile type has)."""
    return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(tiles).items() if k != "reason")


# ---- the forward and backward kernels ----

CHECK_SHAPE = dict(batch=2, seqlen_q=113, seqlen_k=250, heads=4, heads_k=2)  # ragged against every block size
TIMED_SHAPE = {"mps": dict(batch=4, seqlen_q=2048, seqlen_k=2048, heads=16, heads_k=16),
               "cpu": CHECK_SHAPE}  # the emulator times the small problem: its timings only exercise the code


def _inputs(device: str, dtype: str, head_dim: int, shape: dict, grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, sq, sk, h, hk = (shape[k] for k in ("batch", "seqlen_q", "seqlen_k", "heads", "heads_k"))
    make = lambda *s: torch.randn(*s, generator=g).to(device, DTYPES[dtype]).requires_grad_(grad)  # noqa: E731
    return make(b, sq, h, head_dim), make(b, sk, hk, head_dim), make(b, sk, hk, head_dim)


def _problem(q, k, v, causal: bool) -> AttentionProblem:
    return AttentionProblem(q=q, k=k, v=v, softmax_scale=q.shape[-1] ** -0.5, causal=causal, window_left=-1,
                            window_right=0 if causal else -1, softcap=0.0, alibi_slopes=None, dropout_p=0.0)


def _forward_workload(device: str, dtype: str, head_dim: int, causal: bool, check_shape: dict = CHECK_SHAPE,
                      timed_shapes: dict = TIMED_SHAPE) -> Workload:
    from . import flash_attn_func

    q, k, v = _inputs(device, dtype, head_dim, check_shape, grad=False)
    exact, low = references(_problem(q, k, v, causal))

    def check() -> str | None:
        out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
        return failures(compare_results(exact, low, out=out, lse=lse))

    def make_step() -> Callable[[], object]:
        tq, tk, tv = _inputs(device, dtype, head_dim, timed_shapes[device], grad=False, seed=1)
        return lambda: flash_attn_func(tq, tk, tv, causal=causal)

    return Workload(check, make_step)


def _backward_workload(device: str, dtype: str, head_dim: int, causal: bool) -> Workload:
    from . import flash_attn_func

    q, k, v = _inputs(device, dtype, head_dim, CHECK_SHAPE, grad=True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device, q.dtype)
    exact, low = references(_problem(q, k, v, causal), dout)

    def check() -> str | None:
        grads = torch.autograd.grad(flash_attn_func(q, k, v, causal=causal), (q, k, v), dout)
        return failures(compare_results(exact, low, grads=grads))

    def make_step() -> Callable[[], object]:
        tq, tk, tv = _inputs(device, dtype, head_dim, TIMED_SHAPE[device], grad=True, seed=1)
        out = flash_attn_func(tq, tk, tv, causal=causal)
        grad = torch.ones_like(out)
        return lambda: torch.autograd.grad(out, (tq, tk, tv), grad, retain_graph=True)

    return Workload(check, make_step)


register(KernelKind("forward", _forward_workload, overrides=("forward",)))
# The dq and dkdv kernels have tile tables of their own; each is tried while the other keeps its table's tiles,
# and both are checked and timed through a whole backward.
register(KernelKind("dq", _backward_workload, overrides=("dq",)))
register(KernelKind("dkdv", _backward_workload, overrides=("dkdv",)))


# ---- the decode kernels (kernels/decode_kernel.py): a forward of at most 8 query rows, no gradient ----

# 4 query rows x 4 query heads per K/V head pack 16 rows: every rows-per-SIMD-group choice splits them differently
DECODE_CHECK_SHAPE = dict(batch=2, seqlen_q=4, seqlen_k=250, heads=8, heads_k=2)
DECODE_TIMED_SHAPE = {"mps": dict(batch=8, seqlen_q=1, seqlen_k=8192, heads=32, heads_k=8),  # GQA serving step
                      "cpu": DECODE_CHECK_SHAPE}
register(KernelKind("decode", functools.partial(_forward_workload, check_shape=DECODE_CHECK_SHAPE,
                                                timed_shapes=DECODE_TIMED_SHAPE), overrides=("decode",)))
