"""experiments/report.py: the committed report tables come back, figure for figure, from the
committed runs' files (every number is read from a run's summary.json / slot_stats.csv)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.study  # the studies under experiments/, not the package

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import headline  # noqa: E402
import report  # noqa: E402
import smf_recipe  # noqa: E402


def between(text: str, marker: str) -> str:
    return text.split(f"<!-- {marker}:start -->\n", 1)[1].split(f"\n<!-- {marker}:end -->", 1)[0]


@pytest.mark.skipif(not (EXPERIMENTS / "results" / "headline" / "smf_all" / "summary.json").is_file(),
                    reason="the headline runs' files are not in this checkout")
def test_headline_and_keys_tables_reproduce_report_md(tmp_path):
    text = (EXPERIMENTS / "REPORT.md").read_text()
    results = EXPERIMENTS / "results" / "headline"
    rows, table = report.report(results, "headline", list(headline.ROWS))
    assert table == between(text, "headline-table")
    report.write_csv(rows, tmp_path / "headline.csv")
    assert (tmp_path / "headline.csv").read_text() == (results / "headline.csv").read_text()
    keys = ["smf_kl_t128", *headline.KEYS_ROWS]
    _, table = report.report(results, "keys", keys, heal=results / "heal_summary.json")
    assert table == between(text, "keys-table")


@pytest.mark.skipif(not (EXPERIMENTS / "results" / "recipe" / "recipe_kl" / "summary.json").is_file(),
                    reason="the recipe run's files are not in this checkout")
def test_recipe_table_reproduces_recipe_table_md():
    results = EXPERIMENTS / "results" / "recipe"
    # the rows in the study's order, as smf_recipe.report writes them (not the folders' alphabetical order)
    _, table = report.report(results, "recipe", list(smf_recipe.ROWS))
    assert table + "\n" == (results / "recipe_table.md").read_text()


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


def test_report_md_carries_the_headline_v2_table():
    text = (EXPERIMENTS / "REPORT.md").read_text()
    table = (EXPERIMENTS / "results" / "headline_v2" / "table.md").read_text().strip()
    assert between(text, "headline-v2-table") == table
