"""experiments/report.py: the committed report tables come back, figure for figure, from the
committed runs' files (every number is read from a run's summary.json / slot_stats.csv), unpacked
from each study's results/<sweep>/rows.tar.xz."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.study  # the studies under experiments/, not the package

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
sys.path[:0] = [str(EXPERIMENTS / "headline"), str(EXPERIMENTS / "recipe"), str(EXPERIMENTS)]

import headline  # noqa: E402
import headline_report  # noqa: E402
import report  # noqa: E402
import smf_recipe  # noqa: E402
import study  # noqa: E402


def between(text: str, marker: str) -> str:
    return text.split(f"<!-- {marker}:start -->\n", 1)[1].split(f"\n<!-- {marker}:end -->", 1)[0]


def unpacked(results: Path, into: Path) -> Path:
    """The row folders of a study's committed archive (results/rows.tar.xz), unpacked into ``into``."""
    written = study.unpack_rows(into, results / study.ROWS_ARCHIVE)
    assert written, f"{results / study.ROWS_ARCHIVE} is missing or empty"
    return into


def test_headline_and_keys_tables_reproduce_report_md(tmp_path):
    text = (EXPERIMENTS / "headline" / "REPORT.md").read_text()
    results = headline_report.OUT
    rows_dir = unpacked(results, tmp_path / "rows")
    rows, table = report.report(rows_dir, "headline", list(headline.ROWS))
    assert table == between(text, "headline-table")
    report.write_csv(rows, tmp_path / "headline.csv")
    assert (tmp_path / "headline.csv").read_text() == (results / "headline.csv").read_text()
    keys = ["smf_kl_t128", *headline.KEYS_ROWS]
    _, table = report.report(rows_dir, "keys", keys, heal=results / "heal_summary.json")
    assert table == between(text, "keys-table")


def test_recipe_table_reproduces_recipe_table_md(tmp_path):
    results = smf_recipe.RESULTS
    # the rows in the study's order, as smf_recipe.report writes them (not the folders' alphabetical order)
    _, table = report.report(unpacked(results, tmp_path / "rows"), "recipe", list(smf_recipe.ROWS))
    assert table + "\n" == (results / "recipe_table.md").read_text()
    assert table == between((EXPERIMENTS / "recipe" / "RECIPE.md").read_text(), "recipe-table")


def test_run_dirs_in_job_order_and_named_rows(tmp_path):
    for name in ("10", "2", "0", "b_run", "a_run", "unfinished"):
        (tmp_path / name).mkdir()
        if name != "unfinished":
            (tmp_path / name / "summary.json").write_text("{}")
    assert [n for n, _ in report.run_dirs(tmp_path)] == ["0", "2", "10", "a_run", "b_run"]
    assert [n for n, _ in report.run_dirs(tmp_path, ["b_run", "unfinished", "0"])] == ["b_run", "0"]


def test_write_between_replaces_only_the_marked_text(tmp_path):
    doc = tmp_path / "REPORT.md"
    doc.write_text("prose\n<!-- t:start -->\nold\ntable\n<!-- t:end -->\nmore prose\n")
    assert report.write_between(doc, "new", "<!-- t:start -->", "<!-- t:end -->")
    assert doc.read_text() == "prose\n<!-- t:start -->\nnew\n<!-- t:end -->\nmore prose\n"
    assert not report.write_between(doc, "x", "<!-- u:start -->", "<!-- u:end -->")
    assert doc.read_text() == "prose\n<!-- t:start -->\nnew\n<!-- t:end -->\nmore prose\n"
    assert not report.write_between(tmp_path / "absent.md", "x", "<!-- t:start -->", "<!-- t:end -->")
    assert not (tmp_path / "absent.md").exists()


def test_report_md_carries_the_headline_v2_table(tmp_path):
    import headline_v2

    text = (EXPERIMENTS / "headline" / "REPORT.md").read_text()
    table = (headline_v2.RESULTS / "table.md").read_text().strip()
    assert between(text, "headline-v2-table") == table
    rows_dir = unpacked(headline_v2.RESULTS, tmp_path / "rows")  # and it comes back from the archived rows
    assert report.table_of("headline_v2", study.finished_rows(headline_v2.ROWS, tmp_path / "none", rows_dir))[1] == table
