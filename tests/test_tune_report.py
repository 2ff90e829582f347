"""The files `fedboard tune` writes: tune.csv, tune.md, tune.json, pareto.png."""
import csv
import json

import pytest

from device_sim.tune import TuneRow, summarize
from device_sim.tune_report import (
    COLUMNS, MD_HEADER, markdown_report, markdown_table, plot_pareto, write_all, write_csv,
)


def row(spec, nbytes, top3, cpr=20):
    return TuneRow(spec=spec, clients_per_round=cpr, local_epochs=1, bits_per_parameter=32 * nbytes / 3_125_772,
                   uplink_bytes_per_update=nbytes, compression_ratio=3_125_772 / nbytes,
                   uplink_bytes_total=int(nbytes * 600), downlink_bytes_total=187_000_000, top1=top3 / 2,
                   top3=top3, wall_s=321.0, run_dir=f"runs/{spec}")


@pytest.fixture
def result():
    rows = [row("ef|topk:0.01|q4|zstd", 12_600, 0.150), row("f32", 3_125_772, 0.160), row("q8", 790_000, 0.161),
            row("ef|topk:0.05|q4|zstd", 60_000, 0.1595)]
    return summarize(rows, baseline="f32", tolerance=0.01, settings={"rounds": 30, "seed": 0})


def test_csv_has_every_column_and_raw_numbers(tmp_path, result):
    path = write_csv(result.rows, tmp_path / "tune.csv")
    with path.open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS
        lines = list(reader)
    assert [r["spec"] for r in lines] == ["f32", "q8", "ef|topk:0.05|q4|zstd", "ef|topk:0.01|q4|zstd"]
    topk = lines[2]
    assert float(topk["compression_ratio"]) == pytest.approx(3_125_772 / 60_000)
    assert float(topk["delta_top3_vs_baseline"]) == pytest.approx(-0.0005)
    assert float(topk["delta_top3_vs_baseline_rel"]) == pytest.approx(-0.0005 / 0.16)
    assert topk["pareto"] == "True" and topk["within_tolerance"] == "True"
    assert lines[0]["pareto"] == "False"  # q8 is cheaper and more accurate


def test_markdown_table_escapes_the_pipes_of_specs(result):
    lines = markdown_table(result.rows).splitlines()
    assert len(lines) == 2 + 4
    widths = {line.replace("\\|", "").count("|") for line in lines}
    assert widths == {len(MD_HEADER) + 1}  # n cells, n + 1 bars, on every line
    topk = next(line for line in lines if "topk:0.05" in line)
    assert "`ef\\|topk:0.05\\|q4\\|zstd`" in topk
    assert "52.1x" in topk and "-0.31 %" in topk and "yes ✓" in topk


def test_markdown_report_holds_settings_and_the_recommendation(result):
    text = markdown_report(result)
    assert "rounds=30, seed=0" in text
    assert "## Recommendation" in text
    assert "fedboard simulate --codec 'ef|topk:0.05|q4|zstd' --clients-per-round 20 --local-epochs 1" in text
    assert 'codec = "ef|topk:0.05|q4|zstd"' in text


def test_pareto_plot_is_a_png(tmp_path, result):
    import matplotlib.image

    path = plot_pareto(result, tmp_path / "pareto.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 800 and height > 500


def test_several_groups_plot_too(tmp_path):
    rows = [row("f32", 3_125_772, 0.16), row("q8", 790_000, 0.159), row("f32", 3_125_772, 0.12, cpr=10),
            row("q8", 790_000, 0.121, cpr=10)]
    res = summarize(rows, baseline="f32", tolerance=0.01, settings={})
    assert plot_pareto(res, tmp_path / "p.png").stat().st_size > 10_000


def test_write_all_writes_four_files_and_json_reads_back(tmp_path, result):
    files = write_all(result, tmp_path)
    assert set(files) == {"csv", "markdown", "json", "plot"}
    doc = json.loads((tmp_path / "tune.json").read_text())
    assert doc["baseline"] == "f32" and doc["tolerance"] == 0.01 and doc["settings"]["rounds"] == 30
    assert doc["recommendation"]["spec"] == "ef|topk:0.05|q4|zstd"
    assert [f["spec"] for f in doc["frontier"]] == ["ef|topk:0.01|q4|zstd", "ef|topk:0.05|q4|zstd", "q8"]
    assert len(doc["rows"]) == 4
