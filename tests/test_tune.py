"""The sweep of `fedboard tune`: grid expansion, baseline deltas, frontier, recommendation, resuming."""
import json
import shlex
from dataclasses import replace

import pytest

from device_sim.simulate import SimConfig
from device_sim.tune import (
    TunePoint, TuneRow, compare_to_baseline, expand_grid, last_rounds_top3, load_grid, pareto_frontier,
    read_codecs_file, recommend, recommendation_snippet, row_from_report, run_tune, split_codec_list, summarize,
)
from protocol.errors import CodecError

TINY = dict(devices=6, rounds=2, clients_per_round=3, vocab_size=300, embed_dim=16, units=32, seed=3,
            progress=False, report_deadline_s=120.0)


def row(spec, nbytes, top3, cpr=20, epochs=1):
    return TuneRow(spec=spec, clients_per_round=cpr, local_epochs=epochs, bits_per_parameter=8 * nbytes / 1000,
                   uplink_bytes_per_update=nbytes, compression_ratio=4000 / nbytes, uplink_bytes_total=nbytes * 10,
                   downlink_bytes_total=40000, top1=top3 / 2, top3=top3)


# -- spec lists and grid files -------------------------------------------------------------------
def test_codec_list_splits_on_spaces_semicolons_and_commas_between_specs():
    assert split_codec_list("f32,q8,q4|zstd,ef|topk:0.01|q4|zstd") == ["f32", "q8", "q4|zstd", "ef|topk:0.01|q4|zstd"]
    assert split_codec_list(" f16  q8;ef|sign|zstd, ") == ["f16", "q8", "ef|sign|zstd"]


def test_codec_list_keeps_commas_inside_a_stage():
    assert split_codec_list("randk:0.1,unbiased|q8,q:bits=4,block=64,f16") == [
        "randk:0.1,unbiased|q8", "q:bits=4,block=64", "f16"]


def test_codecs_file_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "specs.txt"
    path.write_text("# aggressive ones\nf32\n\nef|topk:0.01|q4|zstd   # ~250x\n  q8  \n")
    assert read_codecs_file(path) == ["f32", "ef|topk:0.01|q4|zstd", "q8"]


def test_grid_file(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('codecs = ["q8", "ef|sign|zstd"]\nclients_per_round = [10, 20]\nlocal_epochs = 2\n')
    grid = load_grid(path)
    assert grid.codecs == ("q8", "ef|sign|zstd")
    assert grid.clients_per_round == (10, 20) and grid.local_epochs == (2,)


@pytest.mark.parametrize("text, message", [
    ('codec = ["q8"]\n', "unknown key.*codec.*allowed: codecs"),
    ('codecs = "q8"\n', "codecs must be a list of spec strings"),
    ("clients_per_round = [10, 2.5]\n", "clients_per_round must be a list of integers"),
    ("codecs = [\n", "not valid TOML"),
])
def test_bad_grid_file_says_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "grid.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_grid(path)


# -- grid expansion -----------------------------------------------------------------------------
def test_grid_is_the_product_with_the_baseline_first_in_each_group():
    points = expand_grid(["q8", "ef|sign|zstd"], [10, 20], [1, 2], baseline="f32")
    assert len(points) == 3 * 2 * 2
    groups = [points[i:i + 3] for i in range(0, 12, 3)]
    assert [(g[0].clients_per_round, g[0].local_epochs) for g in groups] == [(10, 1), (10, 2), (20, 1), (20, 2)]
    for group in groups:
        assert [p.spec for p in group] == ["f32", "q8", "ef|sign|zstd"]


def test_grid_canonicalizes_and_drops_duplicates():
    points = expand_grid(["topk:1e-2|zstd:3", "topk:0.01|f32|zstd", "f32", "q:bits=4"], [20, 20], [1])
    assert [p.spec for p in points] == ["f32", "topk:0.01|f32|zstd", "q4"]


def test_bad_spec_fails_with_the_codec_error_before_anything_runs():
    with pytest.raises(CodecError, match="codec 'q3'.*unknown stage 'q3'"):
        expand_grid(["q8", "q3"], [20], [1])
    with pytest.raises(CodecError, match="baseline 'f64'"):
        expand_grid(["q8"], [20], [1], baseline="f64")
    with pytest.raises(ValueError, match="clients per round must be >= 1"):
        expand_grid(["q8"], [0], [1])


def test_point_slug_is_a_safe_directory_name():
    point = TunePoint("clip:5|ef|randk:0.1,unbiased|q4:block=64|zstd", 20, 1)
    assert point.slug == "clip-5+ef+randk-0.1,unbiased+q4-block=64+zstd__c20_e1"
    assert shlex.quote(point.slug) == point.slug


# -- rows: deltas, frontier, recommendation -------------------------------------------------------
def test_row_from_a_report():
    per_round = [{"round": i, "top3": 0.1 + i / 100} for i in range(1, 9)] + [{"round": 9, "top3": None}]
    report = {"uplink_bytes_per_update": 12_500.0, "float32_bytes_per_update": 3_125_772, "params": 781_068,
              "uplink_bytes_total": 7_500_000, "downlink_bytes_total": 190_000_000, "top1": 0.07, "top3": 0.17,
              "wall_s": 250.0, "per_round": per_round}
    r = row_from_report(TunePoint("ef|topk:0.01|q4|zstd", 20, 1), report, run_dir="runs/x")
    assert r.compression_ratio == pytest.approx(250.06, abs=0.01)
    assert r.bits_per_parameter == pytest.approx(8 * 12_500 / 781_068)
    assert (r.top3, r.uplink_bytes_total, r.run_dir) == (0.17, 7_500_000, "runs/x")
    assert r.top3_last5 == pytest.approx(0.16)  # rounds 4..8; the unevaluated round 9 is skipped
    assert last_rounds_top3({"per_round": []}) is None


def test_deltas_are_against_the_baseline_of_the_same_group():
    rows = [row("f32", 4000, 0.20), row("q8", 1000, 0.199), row("f32", 4000, 0.10, cpr=10),
            row("q8", 1000, 0.12, cpr=10)]
    compare_to_baseline(rows, "f32", tolerance=0.01)
    assert rows[1].delta_top3_vs_baseline == pytest.approx(-0.001)
    assert rows[1].delta_top3_vs_baseline_rel == pytest.approx(-0.005)
    assert rows[3].delta_top3_vs_baseline == pytest.approx(0.02)
    assert rows[3].delta_top3_vs_baseline_rel == pytest.approx(0.2)
    assert all(r.within_tolerance for r in rows)


def test_tolerance_is_relative():
    rows = [row("f32", 4000, 0.20), row("q8", 1000, 0.1981), row("q4", 500, 0.1979)]
    compare_to_baseline(rows, "f32", tolerance=0.01)  # floor 0.198
    assert [r.within_tolerance for r in rows] == [True, True, False]


def test_pareto_frontier_keeps_the_undominated_rows_cheapest_first():
    rows = [row("f32", 4000, 0.20), row("q8", 1000, 0.21), row("q4", 500, 0.19), row("q2", 800, 0.18),
            row("sign", 130, 0.15), row("topk", 130, 0.14), row("f16", 2000, 0.21)]
    frontier = pareto_frontier(rows)
    assert [r.spec for r in frontier] == ["sign", "q4", "q8"]
    assert {r.spec for r in rows if r.pareto} == {"sign", "q4", "q8"}


def test_recommendation_is_the_cheapest_row_within_tolerance():
    rows = [row("f32", 4000, 0.200), row("q8", 1000, 0.2005), row("ef|q2|zstd", 300, 0.1985),
            row("ef|sign|zstd", 130, 0.1950), row("ef|topk:0.01|q4|zstd", 16, 0.15)]
    compare_to_baseline(rows, "f32", tolerance=0.01)
    assert recommend(rows).spec == "ef|q2|zstd"
    compare_to_baseline(rows, "f32", tolerance=0.03)
    assert recommend(rows).spec == "ef|sign|zstd"
    compare_to_baseline(rows, "f32", tolerance=0.0)
    assert recommend(rows).spec == "q8"


def test_recommendation_compares_each_group_with_its_own_baseline():
    rows = [row("f32", 4000, 0.20, cpr=20), row("q4", 500, 0.17, cpr=20),
            row("f32", 4000, 0.15, cpr=10), row("q4", 500, 0.17, cpr=10)]
    compare_to_baseline(rows, "f32", tolerance=0.01)
    best = recommend(rows)
    assert (best.spec, best.clients_per_round) == ("q4", 10)


def test_no_recommendation_without_a_baseline_run():
    rows = [row("q8", 1000, 0.2)]
    compare_to_baseline(rows, "f32", tolerance=0.01)
    assert rows[0].delta_top3_vs_baseline is None and recommend(rows) is None


def test_snippet_is_a_command_and_toml_to_paste():
    best = summarize([row("f32", 4000, 0.2), row("ef|topk:0.02|q4|zstd", 40, 0.199)], baseline="f32",
                     tolerance=0.01, settings={}).recommendation
    text = recommendation_snippet(best)
    command = next(line for line in text.splitlines() if line.startswith("fedboard simulate"))
    argv = shlex.split(command)
    assert argv[argv.index("--codec") + 1] == "ef|topk:0.02|q4|zstd"
    assert 'codec = "ef|topk:0.02|q4|zstd"' in text.splitlines()
    assert "100.0x fewer uplink bytes" in text and "-0.50 %" in text


# -- running --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("tune")
    base = SimConfig(codec="f32", **TINY)
    points = expand_grid(["ef|topk:0.1|q4|zstd"], [3], [1], baseline="f32")
    return base, points, out, run_tune(base, points, out, tolerance=0.5, progress=False)


def test_a_real_two_point_sweep(finished_sweep):
    _, points, out, result = finished_sweep
    assert (result.ran, result.reused) == (2, 0)
    by_spec = {r.spec: r for r in result.rows}
    assert set(by_spec) == {"f32", "ef|topk:0.1|q4|zstd"}
    f32, topk = by_spec["f32"], by_spec["ef|topk:0.1|q4|zstd"]
    assert 0.9 < f32.compression_ratio < 1.05 and f32.delta_top3_vs_baseline == 0.0
    assert topk.compression_ratio > 10 and topk.uplink_bytes_per_update < f32.uplink_bytes_per_update / 10
    for point in points:
        report = json.loads((out / "runs" / point.slug / "report.json").read_text())
        assert report["codec"] == point.spec and report["rounds"] == 2 and report["clients_per_round"] == 3
        assert report["uplink_bytes_total"] == by_spec[point.spec].uplink_bytes_total
    for name in ("tune.csv", "tune.md", "tune.json", "pareto.png"):
        assert (out / name).stat().st_size > 100
    assert result.settings["rounds"] == 2 and "codec" not in result.settings
    assert topk.within_tolerance  # both at the initial model's top-3: "within tolerance" says nothing here
    # two rounds of a tiny model leave top-3 where the initial model had it, so the sweep says so and
    # recommends nothing (it used to recommend the most aggressive spec at +0.00 %; issue 19)
    assert f32.initial_top3 is not None and f32.top3 - f32.initial_top3 < 0.005
    assert result.recommendation is None and "nothing had learned yet" in result.warning
    assert "nothing had learned yet" in (out / "tune.md").read_text()


def test_resume_reads_finished_points_back_without_running_them(finished_sweep):
    base, points, out, first = finished_sweep

    def must_not_run(cfg):
        raise AssertionError(f"{cfg.codec} was run again")

    # how a run executes (pool size, broker, deadline) does not change what it computed
    again = run_tune(replace(base, pool_size=1, report_deadline_s=60.0), points, out, tolerance=0.5, progress=False,
                     simulate=must_not_run)
    assert (again.ran, again.reused) == (0, 2)
    assert [(r.spec, r.top3, r.uplink_bytes_total) for r in again.rows] == [
        (r.spec, r.top3, r.uplink_bytes_total) for r in first.rows]


def test_resume_refuses_a_report_made_with_other_settings(finished_sweep):
    base, points, out, _ = finished_sweep
    with pytest.raises(ValueError, match="other settings.*rounds: 2 there, 3 now"):
        run_tune(SimConfig(codec="f32", **{**TINY, "rounds": 3}), points, out, progress=False)


def test_bad_tolerance(tmp_path):
    with pytest.raises(ValueError, match="tolerance is relative"):
        run_tune(SimConfig(codec="f32", **TINY), expand_grid([], [3], [1]), tmp_path, tolerance=1.5)


def test_a_sweep_whose_baseline_learned_nothing_recommends_nothing():
    """`--rounds 3` on the built-in corpus: every spec at the initial model's unigram level (0.2001)
    used to recommend the most aggressive spec at +0.00 %."""
    rows = [row("f32", 4000, 0.2001), row("q8", 1000, 0.2001), row("ef|sign|zstd", 130, 0.2001)]
    for r in rows:
        r.initial_top3 = 0.2001
    result = summarize(rows, baseline="f32", tolerance=0.01, settings={})
    assert result.recommendation is None
    assert "nothing had learned yet" in result.warning and "--rounds" in result.warning
    trained = [row("f32", 4000, 0.26), row("q8", 1000, 0.259)]
    for r in trained:
        r.initial_top3 = 0.2001
    result = summarize(trained, baseline="f32", tolerance=0.01, settings={})
    assert result.warning is None and result.recommendation.spec == "q8"
