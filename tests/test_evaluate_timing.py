"""How `dsnn evaluate` times its levels: interleaved passes, median and range of RTFx, level switches outside the
timed region, and what the tables claim about speed. The clock is replaced by a fake one that advances only while
a batch decodes (by a set cost per utterance), so every figure below is known exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from asr_fixtures import MANIFEST, copy_manifest
from helpers import assert_usage_error, run_cli
from rich.console import Console

from dsnn_compress.data.manifest import read_manifest
from dsnn_compress.evaluation import evaluate as evaluate_module
from dsnn_compress.evaluation import timing
from dsnn_compress.evaluation.evaluate import EvaluateOptions, evaluate
from dsnn_compress.evaluation.results import EvaluationReport, LevelResult, Timing
from dsnn_compress.evaluation.scoring import ErrorCounts
from dsnn_compress.models.builtin import BuiltinAdapter
from dsnn_compress.prune import PruneOptions, prune_checkpoint
from dsnn_compress.report.tables import DemoRow, demo_tables, evaluation_markdown, evaluation_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COST = 0.01
"""Fake seconds one utterance takes to decode."""
SLOWDOWN = 10.0
"""How much slower every decode of the slowed visit is (a background job)."""
AUDIO = sum(u.duration for u in read_manifest(MANIFEST))


class FakeClock:
    """Time that passes only when a decode adds to it (and, in one test, when a level switches)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """The fake clock, the levels switched to in order (one visit each), and the cost of each decode."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, slow_visit: int | None = None,
                 cost: Callable[[float], float] = lambda level: COST, switch_seconds: float = 0.0) -> None:
        self.clock = FakeClock()
        self.visits: list[float] = []
        self.decodes: list[tuple[float, int]] = []  # (level, utterances) of every decode
        load, decode = evaluate_module.load_model, BuiltinAdapter.decode
        rig = self

        def loading(*args, **kwargs):
            loaded = load(*args, **kwargs)
            set_level = loaded.set_level

            def switch(level):
                rig.clock.now += switch_seconds  # a slow switch (CSR rebuild, compact model) must not be timed
                set_level(level)
                rig.visits.append(float(level))

            loaded.set_level = switch
            return loaded

        def slow_decode(adapter, batch):
            level = rig.visits[-1]
            factor = SLOWDOWN if slow_visit is not None and len(rig.visits) - 1 == slow_visit else 1.0
            rig.clock.now += cost(level) * len(batch.ids) * factor
            rig.decodes.append((level, len(batch.ids)))
            return decode(adapter, batch)

        monkeypatch.setattr(timing, "clock", self.clock)
        monkeypatch.setattr(evaluate_module, "load_model", loading)
        monkeypatch.setattr(BuiltinAdapter, "decode", slow_decode)


def nominal(cost: float = COST, utterances: int = 8) -> float:
    """The RTFx of an undisturbed pass over the manifest."""
    return AUDIO / (cost * utterances)


def run(model: Path, repeats: int, levels: str = "0,0.5,0.9", data: Path = MANIFEST, **options) -> EvaluationReport:
    return evaluate(model, data, EvaluateOptions(levels=levels, repeats=repeats, **options))


def test_undisturbed_passes_give_the_cost_exactly(tiny_model, monkeypatch):
    Rig(monkeypatch)
    report = run(tiny_model.bundle, repeats=3)
    assert report.timing == Timing(repeats=3, timed_utterances=8)
    for entry in report.levels:
        assert entry.rtfx == pytest.approx(nominal(), rel=1e-3)
        assert entry.rtfx_range == pytest.approx((nominal(), nominal()), rel=1e-3)
        assert entry.processing_seconds == pytest.approx(8 * COST)
        assert entry.audio_seconds == pytest.approx(AUDIO, abs=1e-3)


def test_one_slow_pass_no_longer_moves_the_reported_rtfx(tiny_model, monkeypatch):
    """Whichever visit of the dense level a background job slows down 10x, dense's RTFx stays the undisturbed one:
    the slow pass shows only as the low end of dense's range, and no level is then said to differ from dense."""
    probe = Rig(monkeypatch)
    run(tiny_model.bundle, repeats=3)
    dense_visits = [i for i, level in enumerate(probe.visits) if level == 0.0]
    timed_visits = 0
    for visit in dense_visits:
        Rig(monkeypatch, slow_visit=visit)
        report = run(tiny_model.bundle, repeats=3)
        dense = report.level(0.0)
        assert dense.rtfx == pytest.approx(nominal(), rel=1e-3), visit
        for entry in report.levels[1:]:
            assert entry.rtfx == pytest.approx(nominal(), rel=1e-3)
            assert entry.rtfx_range == pytest.approx((nominal(), nominal()), rel=1e-3)
            comparison = report.speed_vs_dense(entry)
            assert comparison is not None and not comparison.distinct
        if dense.rtfx_range[0] < nominal() / 2:  # this visit was a timed pass: the range shows it
            timed_visits += 1
            assert dense.rtfx_range == pytest.approx((nominal() / SLOWDOWN, nominal()), rel=1e-3)
    assert timed_visits == 3  # one per pass; the warm-up and the final reset to dense are not timed


def test_control_a_single_pass_is_moved_by_the_slow_pass(tiny_model, monkeypatch):
    """The old behaviour (one pass per level): the same slow visit makes dense look 10x slower than the sparse
    levels. With one pass nothing is said about speed against dense."""
    probe = Rig(monkeypatch)
    run(tiny_model.bundle, repeats=1)
    first_dense_pass = probe.visits.index(0.0, 1)  # visit 0 is the warm-up's switch
    Rig(monkeypatch, slow_visit=first_dense_pass)
    report = run(tiny_model.bundle, repeats=1)
    assert report.level(0.0).rtfx == pytest.approx(nominal() / SLOWDOWN, rel=1e-3)
    assert report.level(0.5).rtfx == pytest.approx(nominal(), rel=1e-3)
    assert all(report.speed_vs_dense(entry) is None for entry in report.levels)
    table = render(evaluation_table(report))
    assert "vs dense" not in table and "one timing pass" in table


def test_a_level_that_really_is_faster_is_reported_so(tiny_model, monkeypatch):
    """Ranges that do not overlap: the level is faster than dense, by the ratio of the medians."""
    Rig(monkeypatch, slow_visit=None, cost=lambda level: COST / 2 if level == 0.9 else COST)
    report = run(tiny_model.bundle, repeats=3)
    fast = report.level(0.9)
    assert fast.rtfx == pytest.approx(2 * nominal(), rel=1e-3)
    comparison = report.speed_vs_dense(fast)
    assert comparison is not None and comparison.distinct and comparison.ratio == pytest.approx(2.0, abs=1e-3)
    assert not report.speed_vs_dense(report.level(0.5)).distinct
    rows = {line.split("|")[1].strip(): line for line in evaluation_markdown(report).splitlines()
            if line.startswith("| ") and "WER" not in line}
    assert "| 2.00x |" in rows["0.9"] and "| same |" in rows["0.5"] and "| - |" in rows["dense"]


@pytest.mark.parametrize("how", ["sparse kernels", "compact"])
def test_level_switches_are_not_timed(tiny_model, monkeypatch, tmp_path, how):
    """A switch that takes long (CSR weights rebuilt, a compact model built) does not count as processing."""
    if how == "compact":
        model = tmp_path / "structured.safetensors"
        prune_checkpoint(tiny_model.checkpoint, model, PruneOptions([0.5], granularity="structured"))
        options = {"compact": True}
    else:
        model, options = tiny_model.bundle, {"kernels": "sparse"}
    Rig(monkeypatch, switch_seconds=1000.0)
    report = run(model, repeats=2, levels="0,0.5", **options)
    for entry in report.levels:
        assert entry.rtfx == pytest.approx(nominal(), rel=1e-3)
        assert entry.rtfx_range == pytest.approx((nominal(), nominal()), rel=1e-3)
    assert report.model.compact is (how == "compact")
    assert report.kernels.mode == ("sparse" if how != "compact" else "dense")


def test_later_passes_time_an_even_subset_of_a_large_data_set(tiny_model, monkeypatch, tmp_path):
    """Above the timed audio budget, pass 1 decodes everything (scoring) and passes 2.. only every k-th batch;
    every pass times the same batches, so RTFx is still exact."""
    monkeypatch.setattr(timing, "TIMED_AUDIO_SECONDS", AUDIO / 3)
    rig = Rig(monkeypatch)
    report = run(tiny_model.bundle, repeats=3, levels="0,0.9", batch_frames=1)  # one utterance per batch
    timed = report.timing.timed_utterances
    assert 8 / 3 <= timed < 8
    for level in (0.0, 0.9):
        decoded = [n for lv, n in rig.decodes if lv == level]
        warmup = 1 if level == 0.0 else 0
        assert len(decoded) == warmup + 8 + 2 * timed  # all batches once, the timed ones twice more
    for entry in report.levels:
        assert AUDIO / 3 <= entry.audio_seconds < AUDIO
        assert entry.rtfx == pytest.approx(entry.audio_seconds / (COST * timed), rel=1e-3)
        assert entry.utterances_scored == 8  # scored on everything


def test_timed_batches_spread_over_the_lengths() -> None:
    seconds = [float(i + 1) for i in range(20)]  # 210 s in 20 batches of one utterance, sorted by length
    batches = [[i] for i in range(20)]
    assert timing.timed_batches(batches, seconds, budget=210.0) == list(range(20))
    chosen = timing.timed_batches(batches, seconds, budget=50.0)
    assert sum(seconds[i] for i in chosen) >= 50.0
    assert chosen == [2, 6, 10, 14, 18]  # every 4th from the middle of the first 4: short and long ones (55 s)
    assert timing.timed_batches(batches, seconds, budget=60.0) == list(range(1, 20, 3))  # 4th: 55 s, too little
    assert timing.pass_order([0.0, 0.5, 0.9], 4) == [0.5, 0.9, 0.0]


def test_range_and_median_of_passes() -> None:
    measured = timing.LevelTiming(audio_seconds=12.0, passes=(1.0, 4.0, 2.0, 3.0))
    assert measured.processing_seconds == 2.5
    assert measured.rtfx == pytest.approx(12.0 / 2.5)
    assert measured.rtfx_range == pytest.approx((3.0, 12.0))
    assert timing.LevelTiming(1.0, (0.0, 1.0)).rtfx_range is None


# ---------------------------------------------------------------------------------------------- presentation


def render(renderable) -> str:
    console = Console(width=240, record=True)
    console.print(renderable)
    return console.export_text()


def level(value: float, rtfx: float, span: tuple[float, float]) -> LevelResult:
    counts = ErrorCounts(1, 0, 0, 9)
    return LevelResult(value, counts, counts, 100, 10.0, 10.0 / rtfx, rtfx, 4, 0, rtfx_range=span)


def synthetic_report(*levels: LevelResult, repeats: int = 3) -> EvaluationReport:
    report = EvaluationReport.from_dict({"model": {"path": "m", "kind": "bundle", "family": "x"},
                                         "data": {"path": "d", "utterances": 4}, "normalizer": "default",
                                         "levels": []})
    return replace(report, levels=list(levels), timing=Timing(repeats, 4))


def test_tables_show_the_range_and_claim_only_differences_beyond_it() -> None:
    """The misleading table of the issue (dense 95.1, sparse ~127 under load): with overlapping ranges the sparse
    levels read "same"; a level whose range lies above dense's reads its ratio."""
    report = synthetic_report(level(0.0, 95.1, (90.0, 130.0)), level(0.5, 127.3, (93.0, 131.0)),
                              level(0.9, 260.0, (250.0, 270.0)))
    text = render(evaluation_table(report))
    lines = [line.replace("│", " ") for line in text.splitlines()]
    rows = {line.split()[0]: line for line in lines if line.split()[:1] in (["dense"], ["0.5"], ["0.9"])}
    assert "95.1 (90.0-130.0)" in rows["dense"]
    assert "127.3 (93.0-131.0)" in rows["0.5"] and "same" in rows["0.5"] and "x" not in rows["0.5"]
    assert "2.73x" in rows["0.9"]
    assert "median of 3 interleaved timing passes" in text
    markdown = evaluation_markdown(report)
    assert "| RTFx (range) | vs dense |" in markdown
    assert "| 127.3 (93.0-131.0) | same |" in markdown and "| 260.0 (250.0-270.0) | 2.73x |" in markdown
    assert "same" in render(demo_tables([DemoRow(e.level, True, 0.1, None, e) for e in report.levels], report,
                                        {}, "+ live", [])[0])


def test_reports_without_ranges_make_no_speed_claim() -> None:
    """A report of an earlier version (no timing, no ranges) and one without a dense level: RTFx alone."""
    old = synthetic_report(level(0.0, 95.1, (90.0, 130.0)), level(0.5, 127.3, (93.0, 131.0)))
    old = replace(old, timing=None, levels=[replace(e, rtfx_range=None) for e in old.levels])
    assert "vs dense" not in render(evaluation_table(old)) and "vs dense" not in evaluation_markdown(old)
    assert "| 127.3 |" in evaluation_markdown(old)
    no_dense = synthetic_report(level(0.5, 127.3, (93.0, 131.0)), level(0.9, 260.0, (250.0, 270.0)))
    assert "vs dense" not in evaluation_markdown(no_dense)
    assert "| 127.3 (93.0-131.0) |" in evaluation_markdown(no_dense)


def test_cli_repeats_option(tiny_model, tmp_path, capsys, monkeypatch):
    Rig(monkeypatch)
    manifest = copy_manifest(tmp_path, keep=2)
    code, out, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", manifest, "--repeats", "2",
                             "--json", tmp_path / "r.json")
    assert code == 0, err
    report = EvaluationReport.from_dict(json.loads((tmp_path / "r.json").read_text()))
    assert report.timing == Timing(2, 2)
    assert "vs dense" in out and "median of 2 interleaved timing passes" in " ".join(out.split())
    assert_usage_error(run_cli(capsys, "evaluate", tiny_model.bundle, "--data", manifest, "--repeats", "0"),
                       "--repeats must be at least 1")
    code, _, err = run_cli(capsys, "evaluate", tiny_model.bundle, "--data", manifest, "--json", tmp_path / "r.json")
    assert code == 0, err
    default = json.loads((tmp_path / "r.json").read_text())["timing"]["repeats"]
    assert default == evaluate_module.DEFAULT_REPEATS == EvaluateOptions().repeats == 5
