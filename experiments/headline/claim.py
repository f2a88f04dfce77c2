"""The claim of the second headline study, tested on the per-item scores of the headline_v2 rows (REPORT.md).

Stated before the runs:

  At matched recall, SMF's loss of known facts and its relative worsening on each suite is at
  most one third of full finetuning's and of LoRA's, with paired 95% intervals that exclude
  equality; and SMF reaches >= 0.95 recall with >= 98% of known facts kept.

Matched recall: within each method's learning-rate curve, the row at the lowest learning rate
whose final recall (training templates) reaches 0.9, or the row with the best recall if none
does (the table says which).

Paired between rows: every row of the study scores the same items (the same suites, seed and
stream), so one set of resampled item indices is applied to each row's before and after points;
the item-to-item variation they share cancels.
For each measure, in every resample, w = the worsening since before (known facts: the share
lost, before - after; a suite: its relative change, signed so that > 0 is worse). The claim
holds for a measure when w_SMF <= w_other / 3 at the point estimate and the paired 95% interval
of w_other - w_SMF lies above 0 (equality excluded). The interval of w_other / 3 - w_SMF is
shown too (above 0: the one-third bound itself is resolved).

Mechanism: of the known facts a row lost, how many it now answers with an answer it gives to one
of the stream's questions at its last point (the injected answers leaking into question-shaped
inputs), with the most frequent ones.

KL vs TF-IDF: at each budget, the paired difference of final recall (facts resampled within
their task, a fact's templates together: intervals.recall_resampled) and of known facts kept.
The same differences for KL top-300 against the selection controls (random top-300, all slots
read) at the same learning rate: what choosing the slots by KL buys.

    python experiments/headline/claim.py    # results/headline_v2/claim.{md,json}
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # headline_v2.py beside it; experiments/: study.py

from smf_lightning.eval import intervals as ci  # noqa: E402
from smf_lightning.eval.metrics import Aggregate, aggregate  # noqa: E402
from smf_lightning.eval.suites import FactRecallSuite, LambadaSuite, MultipleChoiceSuite, PerplexitySuite, QASuite  # noqa: E402

RESAMPLES, SEED = 1000, 0
RECALL_MATCH = 0.9
KNOWN = "triviaqa_known"
# each method's learning-rate curve, lowest learning rate first
CURVES = {
    "SMF": ("smf_kl_t300_lr0.1", "smf_kl_t300", "smf_kl_t300_lr1"),
    "LoRA": ("lora_lr1e-4", "lora_lr3e-4", "lora_lr1e-3"),
    "full finetuning": ("full_ft_lr3e-6", "full_ft_lr1e-5", "full_ft_lr3e-5"),
}
SELECTOR_PAIRS = (("smf_kl_t100", "smf_tfidf_t100"), ("smf_kl_t300", "smf_tfidf_t300"), ("smf_kl_t1000", "smf_tfidf_t1000"))
CONTROL_PAIRS = (("smf_kl_t300", "smf_random_t300"), ("smf_kl_t300", "smf_all"))


def aggregate_of(metric: str) -> Aggregate:
    """How the suites compute ``metric`` from their item columns (eval/suites.py)."""
    for table in (QASuite.aggregates, MultipleChoiceSuite.aggregates, PerplexitySuite.aggregates,
                  FactRecallSuite.aggregates, LambadaSuite(items=(), score_passage=True).aggregates):
        if metric in table:
            return table[metric]
    raise KeyError(f"no suite computes a metric named {metric!r}")


TEXT_COLUMNS = ("id", "prediction", "template")


def read_columns(path: Path) -> dict[str, list]:
    """An items CSV as columns: scores as floats (written as repr, read back exactly), the
    task as int, ids, predictions and templates as text."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cols = {k: [r[k] for r in rows] for k in (rows[0] if rows else {})}
    for k in cols:
        if k == "task":
            cols[k] = [int(v) for v in cols[k]]
        elif k not in TEXT_COLUMNS:
            cols[k] = [float(v) for v in cols[k]]
    return cols


def last_point(run: Path) -> str:
    from study import item_points

    points = item_points(run)
    if len(points) < 2:
        raise FileNotFoundError(f"{run}/items needs the 'before' and a last 'after_task_*' point; found {points}")
    return points[-1]


def final_recall(run: Path) -> float:
    return json.loads((run / "summary.json").read_text())["fact_recall"]


def matched_row(curve: dict[str, Path]) -> tuple[str, str]:
    """(row, why) of a learning-rate curve (lowest rate first) at matched recall."""
    for name, run in curve.items():
        if final_recall(run) >= RECALL_MATCH:
            return name, f"lowest learning rate with recall >= {RECALL_MATCH}"
    best = max(curve, key=lambda n: final_recall(curve[n]))
    return best, f"best recall (none reaches {RECALL_MATCH})"


def injected_answers(run: Path, top: int = 3) -> dict:
    """The known facts ``run`` lost (exact match before, not after), and how many of them it
    now answers with a prediction it gives to a stream question at its last point (compared
    stripped and case-folded), with the ``top`` most frequent such answers."""
    point = last_point(run)
    before = read_columns(_suite_file(run, "before", KNOWN))
    after = read_columns(_suite_file(run, point, KNOWN))
    stream = {p.strip().casefold() for p in read_columns(_suite_file(run, point, "fact_recall"))["prediction"]}
    was = {i for i, em in zip(before["id"], before["em"]) if em == 1.0}
    lost = [p.strip() for i, p, em in zip(after["id"], after["prediction"], after["em"]) if i in was and em != 1.0]
    leaked = [p for p in lost if p.casefold() in stream]
    shown = {}  # case-folded answer -> its first spelling
    for p in leaked:
        shown.setdefault(p.casefold(), p)
    counts = Counter(p.casefold() for p in leaked).most_common(top)
    return {"lost": len(lost), "answered_with_stream_answer": len(leaked), "top": [(shown[a], n) for a, n in counts]}


# ----------------------------------------------------------------------------- worsening


def measures(run: Path) -> dict[str, tuple[Aggregate, bool]]:
    """measure -> (aggregate, higher_is_better): known facts and each suite's primary metric,
    plus NQ's answer NLL (a target of the recipe study, experiments/recipe/RECIPE.md)."""
    held = json.loads((run / "summary.json").read_text())["heldout"]
    out = {name: (aggregate_of(h["metric"]), bool(h["higher_is_better"])) for name, h in held.items()}
    if "nq_open" in held:
        out["nq_open answer_nll"] = (aggregate_of("answer_nll"), False)
    return out


def _suite_file(run: Path, point: str, measure: str) -> Path:
    return run / "items" / point / f"{measure.split(' ')[0]}.csv"


def worsening(measure: str, agg: Aggregate, higher_is_better: bool, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """> 0: worse. Known facts: the share lost (before - after); a suite: the relative change,
    signed by the metric's direction."""
    if measure == KNOWN:
        return before - after
    rel = ci.relative_changes(before, after)
    return -rel if higher_is_better else rel


def paired_worsening(measure: str, agg: Aggregate, hib: bool, runs: dict[str, Path], n_resamples: int = RESAMPLES,
                     seed: int = SEED) -> dict:
    """name -> (point, per-resample) worsening of every run in ``runs`` for one measure (its
    aggregate and direction: ``measures``), each from its own before and after points, one set
    of resampled item indices for all of them (every row scored the same items; its before point
    may come from another machine's CPU, equal to the last few bits)."""
    points, ids = {}, None
    for name, run in runs.items():
        before = read_columns(_suite_file(run, "before", measure))
        after = read_columns(_suite_file(run, last_point(run), measure))
        ci.check_same_items(before, after)
        if ids is None:
            ids = before.get("id")
        elif before.get("id") != ids:
            raise ValueError(f"{measure}: rows {next(iter(runs))} and {name} did not score the same items")
        points[name] = (before, after)
    idx = ci.resample_indices(len(ids), n_resamples, seed)
    out = {}
    for name, (before, after) in points.items():
        point = worsening(measure, agg, hib, np.array(aggregate(agg, before)), np.array(aggregate(agg, after)))
        out[name] = (float(point), worsening(measure, agg, hib, ci.resampled(agg, before, idx), ci.resampled(agg, after, idx)))
    return out


def _pair(iv):
    return None if iv is None else [round(iv[0], 6), round(iv[1], 6)]


def compare(smf: tuple[str, Path], other: tuple[str, Path], n_resamples: int = RESAMPLES, seed: int = SEED) -> list[dict]:
    """The claim, measure by measure, for SMF's row against another method's row."""
    rows = []
    for measure, (agg, hib) in measures(smf[1]).items():
        w = paired_worsening(measure, agg, hib, dict([smf, other]), n_resamples, seed)
        (ws, ws_b), (wo, wo_b) = w[smf[0]], w[other[0]]
        diff = _pair(ci.percentile_interval(wo_b - ws_b))
        third = _pair(ci.percentile_interval(wo_b / 3 - ws_b))
        holds = ws <= wo / 3 and diff is not None and diff[0] > 0
        rows.append({"measure": measure, "smf": smf[0], "other": other[0], "w_smf": ws, "w_other": wo,
                     "ratio": ws / wo if wo != 0 else None, "diff_ci95": diff, "third_minus_smf_ci95": third,
                     "holds": holds})
    return rows


def row_difference(a: Path, b: Path, n_resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Row ``a`` minus row ``b`` (the same stream): final recall (training templates) and known
    facts kept, paired."""
    point_a, point_b = last_point(a), last_point(b)
    rec_a = read_columns(a / "items" / point_a / "fact_recall.csv")
    rec_b = read_columns(b / "items" / point_b / "fact_recall.csv")
    if rec_a["id"] != rec_b["id"] or rec_a["template"] != rec_b["template"]:
        raise ValueError(f"{a} and {b} did not recall the same facts in the same order")
    templates = json.loads((a / "summary.json").read_text())["data"]["train_templates"]
    tasks = sorted(set(rec_a["task"]))
    res = [ci.recall_resampled(r, tasks, templates, "em", n_resamples, seed) for r in (rec_a, rec_b)]
    ra, rb = (sum(r[j] for j in tasks) / len(tasks) for r in res)
    fa, fb = final_recall(a), final_recall(b)
    out = {"facts": len(set(rec_a["id"])), "recall_a": fa, "recall_b": fb, "recall_diff": fa - fb,
           "recall_diff_ci95": _pair(ci.percentile_interval(ra - rb))}
    w = paired_worsening(KNOWN, *measures(a)[KNOWN], {"a": a, "b": b}, n_resamples, seed)
    # kept = before - lost, the same before: the kept difference is minus the lost difference
    out.update(known_kept_diff=w["b"][0] - w["a"][0],
               known_kept_diff_ci95=_pair(ci.percentile_interval(w["b"][1] - w["a"][1])))
    return out


def difference_table(title: str, pairs: list[tuple[str, str]], found: dict[str, Path]) -> tuple[list[dict], list[str]]:
    """(rows, markdown lines) of ``row_difference`` for each (a, b) pair of finished rows."""
    rows, lines = [], ["", title + " (paired 95% intervals):", "",
                       "| a | b | facts | recall a | recall b | recall a - b | known kept a - b |", "|---|---|---:|---:|---:|---:|---:|"]
    for a, b in pairs:
        d = {"a": a, "b": b, **row_difference(found[a], found[b])}
        rows.append(d)
        lines.append(f"| {a} | {b} | {d['facts']} | {d['recall_a']:.4f} | {d['recall_b']:.4f} | "
                     f"{d['recall_diff']:+.4f} {_iv(d['recall_diff_ci95'], pct=False)} | "
                     f"{d['known_kept_diff']:+.4f} {_iv(d['known_kept_diff_ci95'], pct=False)} |")
    return rows, lines


# ----------------------------------------------------------------------------- report


def _pct(x):
    return "" if x is None else f"{100 * x:+.1f}%"


def _iv(iv, pct=True):
    if iv is None:
        return ""
    return f"[{100 * iv[0]:+.1f}, {100 * iv[1]:+.1f}]" if pct else f"[{iv[0]:+.3f}, {iv[1]:+.3f}]"


def claim(found: dict[str, Path]) -> tuple[dict, str]:
    """(claim.json, claim.md) from the finished rows ``found`` (row -> folder with items/)."""
    lines, out = [], {"matched": {}, "comparisons": [], "selectors": [], "controls": [], "missing": []}
    matched = {}
    for method, curve in CURVES.items():
        have = {r: found[r] for r in curve if r in found}
        missing = [r for r in curve if r not in found]
        out["missing"] += missing
        if not have:
            continue
        row, why = matched_row(have)
        s = json.loads((have[row] / "summary.json").read_text())
        known = s["heldout"].get(KNOWN, {})
        matched[method] = (row, have[row])
        out["matched"][method] = {"row": row, "why": why + (f"; curve incomplete, missing {', '.join(missing)}" if missing else ""),
                                  "recall": s["fact_recall"], "known_kept": known.get("after")}
    lines += ["Matched recall (each method's row):", "", "| method | row | why | recall | known kept |", "|---|---|---|---:|---:|"]
    for method, m in out["matched"].items():
        lines.append(f"| {method} | {m['row']} | {m['why']} | {m['recall']:.3f} | {m['known_kept']:.3f} |")
    if "SMF" in matched:
        s = out["matched"]["SMF"]
        out["smf_targets"] = {"recall>=0.95": s["recall"] >= 0.95, "known_kept>=0.98": s["known_kept"] >= 0.98}
        for method in ("LoRA", "full finetuning"):
            if method not in matched:
                continue
            rows = compare(matched["SMF"], matched[method])
            out["comparisons"] += rows
            lines += ["", f"SMF ({matched['SMF'][0]}) vs {method} ({matched[method][0]}): worsening since before "
                      "(> 0 worse; known facts: share lost), paired 95% intervals", "",
                      "| measure | SMF | other | SMF / other | other - SMF | other/3 - SMF | claim holds |",
                      "|---|---:|---:|---:|---:|---:|---|"]
            for r in rows:
                ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
                lines.append(f"| {r['measure']} | {_pct(r['w_smf'])} | {_pct(r['w_other'])} | {ratio} | {_iv(r['diff_ci95'])} | "
                             f"{_iv(r['third_minus_smf_ci95'])} | {'yes' if r['holds'] else 'no'} |")
    for key, title, table in (("selectors", "KL minus TF-IDF at each budget", SELECTOR_PAIRS),
                              ("controls", "KL top-300 minus the selection controls, same learning rate", CONTROL_PAIRS)):
        pairs = [(a, b) for a, b in table if a in found and b in found]
        if pairs:
            out[key], more = difference_table(title, pairs, found)
            lines += more
    lines += ["", "Known facts lost, and how many of them are now answered with an answer the row gives to a stream "
              "question:", "", "| row | lost | with a stream answer | most frequent |", "|---|---:|---:|---|"]
    out["injected"] = {}
    for name, run in found.items():
        if not _suite_file(run, "before", KNOWN).exists():
            continue
        d = out["injected"][name] = injected_answers(run)
        lines.append(f"| {name} | {d['lost']} | {d['answered_with_stream_answer']} | "
                     + ", ".join(f"{a} ({n})" for a, n in d["top"]) + " |")
    if out["missing"]:
        lines += ["", f"Rows of the curves not available yet (not run, or run without items/): {', '.join(out['missing'])}."]
    return out, "\n".join(lines)


def main() -> None:
    import headline_v2
    from study import finished_rows, item_points, unpack_rows

    unpack_rows(headline_v2.RESULTS)  # the committed rows' files
    finished = finished_rows(headline_v2.ROWS, headline_v2.RUNS, headline_v2.RESULTS)
    found = {n: p for n, p in finished if len(item_points(p)) >= 2}
    out, md = claim(found)
    no_items = [n for n, _ in finished if n not in found]
    if no_items:  # finished before the report kept items/ (their run folders are gone)
        out["finished_without_items"] = no_items
        md += (f"\n\nFinished without per-item scores, so left out above: {', '.join(no_items)} (to rerun one, "
               "delete results/headline_v2/<row>/ and launch headline_v2.py --only <row>).")
    headline_v2.RESULTS.mkdir(parents=True, exist_ok=True)
    (headline_v2.RESULTS / "claim.json").write_text(json.dumps(out, indent=2) + "\n")
    (headline_v2.RESULTS / "claim.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
