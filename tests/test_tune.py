"""`tune` and the stored tile table: every candidate is checked in the emulator before a fake timer ranks it, the
winner is stored per machine and version, and the kernels use it."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

import pytest
import torch

import flash_attn_metal
from flash_attn_metal import tune
from flash_attn_metal.cli import main
from flash_attn_metal.kernels import tuning
from flash_attn_metal.kernels.tiles import Tiles, candidates, forward_tiles

FAMILY = "apple10"  # off a Mac the kernels use the newest family's tiles
TILES_RE = re.compile(r"_q(\d+)_k(\d+)_")


@pytest.fixture(autouse=True)
def emulator_table(monkeypatch, tmp_path):
    """Kernels in the emulator (strict), and this machine's table in a temporary file."""
    monkeypatch.setenv("FLASH_ATTN_METAL_BACKEND", "emulator")
    monkeypatch.setenv("FLASH_ATTN_METAL_STRICT", "1")
    path = tmp_path / "tuning" / "table.json"
    monkeypatch.setattr(tuning, "table_path", lambda: path)
    yield path
    tuning._forget_chosen_tiles()  # later tests plan their launches under the built-in table again


def launched(step) -> list[str]:
    """The names of the kernels one run of `step` launched."""
    flash_attn_metal.reset_stats()
    step()
    return list(flash_attn_metal.stats()["launches"])


def launched_tiles(step) -> set[tuple[int, int]]:
    """The (block_q, block_k) of every kernel one run of `step` launched."""
    return {tuple(map(int, TILES_RE.search(name + "_").groups())) for name in launched(step)}


def timer_favouring(fast: tuple[int, int]):
    """A fake timer: 1 ms when the step's kernels ran with the `fast` tiles, 2 ms otherwise."""
    return lambda step: 1e-3 if launched_tiles(step) == {fast} else 2e-3


def run_forward(causal: bool) -> set[tuple[int, int]]:
    q, k, v = (torch.randn(1, 40, 2, 32, dtype=torch.float16) for _ in range(3))
    return launched_tiles(lambda: flash_attn_metal.flash_attn_func(q, k, v, causal=causal))


def test_every_candidate_is_checked_and_the_fastest_is_stored_and_used(emulator_table):
    built_in = forward_tiles(FAMILY, "half", 32)
    fast = (32, 16)
    assert fast != (built_in.block_q, built_in.block_k)
    reports = []
    (outcome,) = tune.run([("forward", "half", 32, True)], FAMILY, "cpu", timer_favouring(fast),
                          lambda done, total, o: reports.append((done, total, o.key)))
    assert reports == [(1, 1, "forward/apple10/half/d32/causal")]
    assert [t.tiles for t in outcome.trials] == candidates("forward", FAMILY, "half", 32)
    assert all(t.error is None and t.seconds is not None for t in outcome.trials)  # every candidate verified
    assert (outcome.winner.tiles.block_q, outcome.winner.tiles.block_k) == fast
    stored = json.loads(emulator_table.read_text())
    assert stored["chip"] == "emulator" and stored["version"] == flash_attn_metal.__version__
    assert stored["winners"]["forward/apple10/half/d32/causal"]["ms"] == 1.0
    assert "tuned on this machine: 1 winners" in tuning.describe()
    # The kernels use the winner where it applies (causal, fp16, head dims up to 32) and the table elsewhere.
    assert run_forward(causal=True) == {fast}
    assert run_forward(causal=False) == {(built_in.block_q, built_in.block_k)}


def test_a_candidate_the_kernels_get_wrong_is_rejected_even_when_fastest(monkeypatch):
    from flash_attn_metal.kernels import dispatch, forward

    broken = Tiles(16, 16, reason="its kernel's output is scaled by 1.01 (below)")
    good = forward_tiles(FAMILY, "half", 32)
    generate = forward.forward_source

    def sabotaged(spec):
        source = generate(spec)
        return source.replace("* inv_sum;", "* inv_sum * 1.01f;") if spec.tiles == broken else source

    monkeypatch.setattr(dispatch, "forward_source", sabotaged)
    monkeypatch.setitem(tuning.KINDS, "forward", tuning.TunedKind(Tiles, lambda f, dt, d: [good, broken]))
    outcome = tune.tune_one("forward", FAMILY, "cpu", "half", 32, False, timer_favouring((16, 16)))
    assert outcome.trials[1].seconds is None and "out" in outcome.trials[1].error
    assert outcome.trials[0].error is None and outcome.winner.tiles == good


DQ_TILES_RE = re.compile(r"_dq(\d+)x(\d+)")


def test_the_dq_kind_checks_gradients_under_each_candidate(monkeypatch):
    two = candidates("dq", FAMILY, "half", 32)[:2]
    monkeypatch.setitem(tuning.KINDS, "dq", tuning.TunedKind(Tiles, lambda f, dt, d: two))
    seen = []

    def timer(step):
        seen.append({tuple(map(int, m.groups())) for name in launched(step) if (m := DQ_TILES_RE.search(name))})
        return 1e-3

    outcome = tune.tune_one("dq", FAMILY, "cpu", "half", 32, True, timer)
    assert all(t.error is None for t in outcome.trials)
    assert seen == [{(t.block_q, t.block_k)} for t in two]  # the timed backward ran each candidate's dq kernel


def register_fake_kind(monkeypatch, check_error: dict[int, str | None], raises: int | None = None) -> None:
    """A kernel kind "fake" of three candidates (block_q 8, 16, 32) whose check fails or raises for the ones named."""
    def workload(device, dtype, head_dim, causal):
        def check():
            block_q = tuning.current("fake", FAMILY, dtype, head_dim, causal).block_q
            if block_q == raises:
                raise RuntimeError("threadgroup memory exceeds 32 KiB\nsecond line")
            return check_error.get(block_q)

        return tune.Workload(check, lambda: lambda: tuning.current("fake", FAMILY, dtype, head_dim, causal))

    three = [Tiles(q, 8) for q in (8, 16, 32)]
    monkeypatch.setitem(tuning.KINDS, "fake", tuning.TunedKind(Tiles, lambda f, dt, d: three))
    monkeypatch.setitem(tune.KINDS, "fake", tune.KernelKind("fake", workload, ("fake",)))


def test_a_failed_check_or_error_rejects_a_candidate_and_the_rest_compete(monkeypatch):
    register_fake_kind(monkeypatch, {16: "out 1e-1 (bound 1e-3)"}, raises=32)
    by_speed = lambda step: {8: 3.0, 16: 1.0, 32: 2.0}[step().block_q]  # noqa: E731
    outcome = tune.tune_one("fake", FAMILY, "cpu", "half", 64, False, by_speed)
    assert [t.seconds for t in outcome.trials] == [3.0, None, None]
    assert outcome.trials[1].error == "out 1e-1 (bound 1e-3)"
    assert outcome.trials[2].error == "RuntimeError: threadgroup memory exceeds 32 KiB"
    assert outcome.winner.tiles.block_q == 8  # slowest, but the only one verified


def test_nothing_is_stored_when_no_candidate_passes(monkeypatch, emulator_table):
    register_fake_kind(monkeypatch, {8: "wrong", 16: "wrong", 32: "wrong"})
    (outcome,) = tune.run([("fake", "half", 64, False)], FAMILY, "cpu", lambda step: 1.0, lambda *a: None)
    assert outcome.winner is None and not emulator_table.exists()
    register_fake_kind(monkeypatch, {})
    tune.run([("fake", "half", 64, False)], FAMILY, "cpu", lambda step: 1.0, lambda *a: None)
    assert emulator_table.exists()


def test_a_stored_winner_applies_to_its_bucket_and_not_past_it():
    winner = candidates("forward", FAMILY, "half", 64)[-1]
    tuning.store({tuning.entry_key("forward", FAMILY, "half", 64, True): winner})
    assert tuning.current("forward", FAMILY, "half", 40, True) == winner  # 40 rounds up to the 64 bucket
    assert tuning.current("forward", FAMILY, "half", 72, True) is None  # the 96 bucket: not tuned
    assert tuning.current("forward", FAMILY, "half", 64, False) is None
    assert tuning.current("forward", FAMILY, "bfloat", 64, True) is None
    with tuning.trying({"forward": Tiles(16, 16, reason="trial")}):
        assert tuning.current("forward", FAMILY, "half", 64, True) == Tiles(16, 16, reason="trial")
        assert tuning.current("dq", FAMILY, "half", 64, True) is None  # not overridden
    assert tuning.current("forward", FAMILY, "half", 64, True) == winner


def test_a_stale_or_damaged_table_is_ignored(emulator_table):
    key = tuning.entry_key("forward", FAMILY, "float", 256, False)
    oversized = Tiles(32, 64, "threadgroup", reason="64 fp32 keys at d=256: past 32 KiB of threadgroup memory")
    assert oversized not in candidates("forward", FAMILY, "float", 256)
    tuning.store({key: oversized})
    assert tuning.stored()[key] == oversized and tuning.current("forward", FAMILY, "float", 256, False) is None
    emulator_table.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="unreadable tuned table"):
        assert tuning.current("forward", FAMILY, "float", 256, False) is None
    emulator_table.write_text(json.dumps({"format": tuning.FORMAT, "winners": {key: {"tiles": {"rows": 3}}}}))
    with pytest.warns(RuntimeWarning, match="written for other kernels"):
        assert tuning.stored() == {}


def test_the_table_is_per_chip_os_and_version(monkeypatch, tmp_path):
    monkeypatch.undo()  # the real table_path
    monkeypatch.setenv("FLASH_ATTN_METAL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "machine", lambda: ("Apple M3 Max", "macOS 15.3.1"))
    name = f"apple-m3-max_macos-15.3.1_v{flash_attn_metal.__version__}.json"
    assert tuning.table_path() == tmp_path / "tuning" / name
    monkeypatch.setattr(tuning, "machine", lambda: ("Apple M4", "macOS 15.3.1"))
    assert tuning.table_path().name.startswith("apple-m4_macos-15.3.1_v")
    monkeypatch.setattr(tuning, "__version__", "99.0")
    assert tuning.table_path().name == "apple-m4_macos-15.3.1_v99.0.json"


def test_clear_returns_to_the_built_in_table(emulator_table):
    tuning.store({tuning.entry_key("forward", FAMILY, "half", 32, True): Tiles(32, 16)})
    assert tuning.clear() and not emulator_table.exists()
    assert tuning.current("forward", FAMILY, "half", 32, True) is None
    assert not tuning.clear()
    assert "built-in" in tuning.describe()


def test_cli_dry_run_lists_the_candidates_and_runs_nothing(capsys, emulator_table):
    assert main(["tune", "--dry-run", "--dtypes", "fp16", "--head-dims", "64", "--causal", "yes"]) == 0
    out = capsys.readouterr().out
    first = forward_tiles(FAMILY, "half", 64)
    assert f"forward/apple10/half/d64/causal: [{tune.describe_tiles(first)}] (built-in)" in out
    assert "dq/apple10/half/d64/causal:" in out and "dkdv/apple10/half/d64/causal:" in out
    assert "decode/apple10/half/d64/causal: [rows=16] (built-in)" in out and "4 keys" in out
    assert not emulator_table.exists()


def test_cli_rejects_a_head_dim_that_is_not_a_bucket(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--dry-run", "--head-dims", "50"])
    assert "--head-dims: must be one of 32, 64" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["tune", "--dry-run", "--head-dims", "32", "--kinds", "forward"]) == 0


def test_cli_tunes_stores_and_reports_each_key(capsys, monkeypatch, emulator_table):
    fast = (16, 64)
    monkeypatch.setattr(tune, "device_timer", lambda device: timer_favouring(fast))
    assert main(["tune", "--kinds", "forward", "--dtypes", "fp16", "--head-dims", "32", "--causal", "yes"]) == 0
    out = capsys.readouterr().out
    assert "No Metal GPU: every candidate is checked in the CPU emulator" in out
    assert ("[1/1] forward/apple10/half/d32/causal: [block_q=16 block_k=64 stationary=registers split=False] 1.000 ms, "
            "built-in 2.000 ms") in out
    assert "stored 1 winners" in out
    assert tuning.current("forward", FAMILY, "half", 32, True).block_k == 64
    assert main(["tune", "--clear"]) == 0 and "removed tuned table" in capsys.readouterr().out
    assert not emulator_table.exists()


@dataclasses.dataclass(frozen=True)
class SplitTiles:  # a kernel family's own tile type
    splits: int
    rows: int = 8


def test_a_kernel_family_registers_its_own_tile_type(monkeypatch, emulator_table):
    monkeypatch.setattr(tuning, "KINDS", dict(tuning.KINDS))  # registrations undone after the test
    tuning.register("example", SplitTiles, lambda family, dtype, d: [SplitTiles(1), SplitTiles(4), SplitTiles(8, 16)])
    key = tuning.entry_key("example", FAMILY, "half", 128, True)
    tuning.store({key: SplitTiles(8, 16)})
    assert json.loads(emulator_table.read_text())["winners"][key]["tiles"] == {"splits": 8, "rows": 16}
    assert tuning.current("example", FAMILY, "half", 128, True) == SplitTiles(8, 16)
    monkeypatch.delitem(tuning.KINDS, "example")  # a process that has not registered the family ignores its entries
    tuning._changed(emulator_table)
    assert tuning.current("example", FAMILY, "half", 128, True) is None and tuning.stored() == {}


DECODE_ROWS_RE = re.compile(r"attention_decode_\w+?_r(\d+)")


def decode_rows(step) -> set[int]:
    """The rows-per-SIMD-group of every decode kernel one run of `step` launched."""
    return {int(m.group(1)) for name in launched(step) if (m := DECODE_ROWS_RE.match(name))}


def test_decode_rows_are_tuned_checked_and_used(emulator_table):
    from flash_attn_metal.kernels.decode_kernel import tile_candidates
    from flash_attn_metal.kernels.tiles import DecodeTiles

    assert [t.rows for t in tile_candidates(FAMILY, "half", 64)] == [16, 8, 4]  # the budget's choice first
    assert [t.rows for t in tile_candidates(FAMILY, "half", 256)] == [4]  # 8 rows of d=256 overflow the budget
    q = torch.randn(2, 4, 8, 64, dtype=torch.float16)
    k, v = (torch.randn(2, 90, 2, 64, dtype=torch.float16) for _ in range(2))
    run = lambda: flash_attn_metal.flash_attn_func(q, k, v, causal=True)  # noqa: E731
    assert decode_rows(run) == {16}  # the register budget's choice
    timer = lambda step: 1e-3 if decode_rows(step) == {4} else 2e-3  # noqa: E731
    (outcome,) = tune.run([("decode", "half", 64, True)], FAMILY, "cpu", timer, lambda *a: None)
    assert [t.tiles for t in outcome.trials] == tile_candidates(FAMILY, "half", 64)
    assert all(t.error is None for t in outcome.trials)  # every choice verified against the reference
    assert outcome.winner.tiles == DecodeTiles(4)
    assert decode_rows(run) == {4}  # the stored winner is used
    assert decode_rows(lambda: flash_attn_metal.flash_attn_func(q, k, v)) == {16}  # not for unmasked calls


def test_a_fresh_process_lists_every_kind_before_any_kernel_module_is_imported():
    """Each kind's tiles are known to `kernels/tuning.py` itself, not only once a kernel module has been imported."""
    import subprocess
    import sys

    run = lambda *kinds: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "flash_attn_metal", "tune", "--dry-run", "--head-dims", "256", "--dtypes", "fp16",
         "--causal", "no", "--kinds", *kinds], capture_output=True, text=True, timeout=120)
    listed = run("forward", "decode")
    assert listed.returncode == 0, listed.stderr
    assert "decode/apple10/half/d256/full: [rows=4] (built-in)" in listed.stdout
    refused = run("decoder")
    assert refused.returncode == 2 and "--kinds" in refused.stderr
