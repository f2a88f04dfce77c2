"""Tables and plots of any sweep's runs: one row per run directory holding a summary.json.

    python experiments/report.py SWEEP_DIR --table headline          # the markdown table, on stdout
    python experiments/report.py SWEEP_DIR --table recipe --out DIR  # also rows.csv, rows.json and the plot in DIR
    python experiments/report.py SWEEP_DIR --rows a,b,c              # these runs, in this order

A run directory is ``SWEEP_DIR/<name>/`` with the files a run writes (summary.json and, for
SMF, slot_stats.csv): the job folders 0, 1, ... of a Hydra multirun (``python -m
smf_lightning.train -m ... hydra.sweep.dir=SWEEP_DIR``) or named runs. A row is named after its
folder. Every figure comes from those files; nothing is typed in.

Tables (``--table``):
- ``headline``: learning, forgetting and held-out change per run, then the SMF rows' slot
  statistics (experiments/headline/REPORT.md, "headline");
- ``keys``: absolute held-out numbers before → after (the keys rows: k-means keys, healed replace
  memory); ``--heal heal_summary.json`` puts the healing run's table first;
- ``tune``: the learning-rate search;
- ``recipe``: recall, known facts kept and held-out changes with their paired 95% intervals
  (experiments/recipe/results/recipe/recipe_table.md).
- ``headline_v2``: the second headline comparison of methods: each row's settings, recall and known facts
  kept with their 95% intervals, every suite's relative change with its paired 95% interval, costs;
  then the SMF rows' slot statistics (experiments/headline/results/headline_v2/table.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADLINE_SUITES = ("nq_open", "hellaswag", "gsm8k", "lambada")
RECIPE_SUITES = ("triviaqa_known", "nq_open", "gsm8k", "lambada", "hellaswag")


# ----------------------------------------------------------------------------- runs


def run_dirs(sweep_dir: Path, names: list[str] | None = None) -> list[tuple[str, Path]]:
    """(name, folder) of every finished run of the sweep (a summary.json), or of ``names`` in that order."""
    if names:
        missing = [n for n in names if not (sweep_dir / n / "summary.json").is_file()]
        if missing:
            print(f"not finished (no summary.json) under {sweep_dir}: {', '.join(missing)}", file=sys.stderr)
        return [(n, sweep_dir / n) for n in names if n not in missing]
    found = [p.parent for p in sweep_dir.glob("*/summary.json")]
    # job folders of a multirun in job order (0, 1, ..., 10), named runs alphabetically
    found.sort(key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))
    return [(p.name, p) for p in found]


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else None


def slot_summary(path: Path) -> dict:
    """Means over the run's optimizer steps (overlap: steps of tasks after the first)."""
    if not path.exists():
        return {}
    rows = list(csv.DictReader(path.open()))
    f = lambda k, rs=rows: _mean([float(r[k]) for r in rs if r.get(k) not in (None, "")])  # noqa: E731
    later = [r for r in rows if int(r["task"]) > 0]
    return {"kl_batch_bg": f("kl_batch_bg"), "jaccard_earlier": f("jaccard_earlier", later),
            "overlap_earlier": f("overlap_earlier", later), "hub_share_batch": f("hub_share_batch"),
            "hub_share_bg": f("hub_share_bg"), "accessed_slots": f("accessed_slots"),
            "selected_slots": f("selected_slots")}


def row_of(name: str, run: Path) -> dict:
    """One table row: the run's settings, results and costs, from its summary.json and slot_stats.csv."""
    s = json.loads((run / "summary.json").read_text())
    m = s["method_config"]
    held = s["heldout"]
    r = {
        "row": name, "method": m["name"], "selector": m.get("selector") or "",
        "top_t": m.get("top_t") if m.get("selector") not in (None, "all") else "",
        "optimizer": m.get("optimizer"), "lr": m.get("lr"),
        "facts": s["n_tasks"] * s["facts_per_task"], "steps": s["steps"],
        "recall": s["fact_recall"], "recall_heldout_template": s["fact_recall_heldout_template"],
        "recall_contains": s.get("fact_recall_contains"),
        "acc": s["acc"], "bwt": s["bwt"], "forgetting": s["forgetting"],
    }
    mem = s["model"].get("memory") or {}
    if mem:  # e.g. "additive, random keys" or "replace, random keys, healed"
        r["memory"] = f"{mem.get('mode')}, {mem.get('key_init', 'random')} keys" + (", healed" if s["model"].get("healing") else "")
    worse = []
    for suite in HEADLINE_SUITES:
        h = held.get(suite)
        if h is None:
            continue
        rel = h["rel_change"]
        r[f"{suite}_{h['metric']}_before"] = h["before"]
        r[f"{suite}_{h['metric']}_after"] = h["after"]
        r[f"{suite}_rel"] = rel
        if rel is not None:
            worse.append(-rel if h["higher_is_better"] else rel)  # > 0: the capability got worse
    nq = held.get("nq_open")
    if nq and "all_before" in nq:
        b, a = nq["all_before"]["answer_nll"], nq["all_after"]["answer_nll"]
        r.update(nq_answer_nll_before=b, nq_answer_nll_after=a, nq_answer_nll_rel=(a - b) / abs(b))
    r["heldout_degradation"] = _mean(worse)  # mean over suites of the relative worsening
    r.update({"seconds_per_step": s["seconds_per_step"], "peak_rss_mb": s["peak_rss_mb"],
              "trainable_params": s["trainable_params"], "updated_params_per_step": s["updated_params_per_step"]})
    r.update({f"slots_{k}": v for k, v in slot_summary(run / "slot_stats.csv").items()})
    return r


def headline_v2_row_of(name: str, run: Path) -> dict:
    """recipe_row_of plus the recall intervals, the known facts lost and the method's settings."""
    s = json.loads((run / "summary.json").read_text())
    m = s["method_config"]
    r = recipe_row_of(name, run)
    r.update(recall_ci95=s.get("fact_recall_ci95"), recall_heldout_template_ci95=s.get("fact_recall_heldout_template_ci95"),
             known_lost=None if r["known_kept"] is None else 1 - r["known_kept"])
    if m["name"] == "lora":
        r["settings"] = f"rank {m['r']}, alpha {m['alpha']}, {'/'.join(t.replace('_proj', '') for t in m['target_modules'])}; AdamW lr {m['lr']:g}"
    elif m["name"] == "full_ft":
        r["settings"] = f"every weight; AdamW lr {m['lr']:g}"
    else:
        r["settings"] = f"{m['selector']}" + (f" top-{m['top_t']}" if m.get("top_t") and m["selector"] != "all" else "") + \
            f" per {m.get('select_per', 'step')}; {'Adam' if m['optimizer'] == 'adam' else m['optimizer']} lr {m['lr']:g}"
    return r


def recipe_row_of(name: str, run: Path) -> dict:
    """row_of plus the known-facts suite and the paired 95% intervals of the held-out changes."""
    s = json.loads((run / "summary.json").read_text())
    held, known = s["heldout"], s["heldout"].get("triviaqa_known", {})
    return {**row_of(name, run), "known_kept": known.get("after"), "known_kept_ci95": known.get("ci95"),
            **{f"{k}_rel_change_ci95": held[k].get("rel_change_ci95") for k in RECIPE_SUITES if k in held},
            "wall_minutes": (s["seconds_per_step"] * s["steps"] + s["eval_seconds"]) / 60}


# ----------------------------------------------------------------------------- tables


def _fmt(v, pct=False, digits=2):
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if pct:  # relative change; beyond +10,000% as a factor
        return f"×{1 + v:.1e}" if v > 100 else f"{100 * v:+.0f}%"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _params(v):
    return "–" if v in (None, "") else (f"{v / 1e6:.1f}M" if v >= 1e6 else f"{v / 1e3:.0f}k")


def _table(head: str, lines: list[str]) -> str:
    return "\n".join([head, "|" + "---|" * (head.count("|") - 1), *lines])


def headline_table(rows: list[dict]) -> str:
    head = ("| row | settings | recall (train tpl) | recall (held-out tpl) | ACC | BWT | forgetting | NQ F1 | NQ ans. NLL "
            "| HellaSwag | GSM8K NLL | LAMBADA ppl | mean degradation | s/step | peak RSS GB | trainable | updated/step |")
    lines = []
    for r in rows:
        settings = f"{r['optimizer']} lr {r['lr']:g}" + (f", {r['selector']}" if r["selector"] else "") + \
            (f", t={r['top_t']}" if r["top_t"] else "")
        lines.append("| " + " | ".join([
            r["row"], settings, _fmt(r["recall"]), _fmt(r["recall_heldout_template"]), _fmt(r["acc"]), _fmt(r["bwt"]),
            _fmt(r["forgetting"]), _fmt(r.get("nq_open_rel"), True), _fmt(r.get("nq_answer_nll_rel"), True),
            _fmt(r.get("hellaswag_rel"), True), _fmt(r.get("gsm8k_rel"), True), _fmt(r.get("lambada_rel"), True),
            _fmt(r["heldout_degradation"], True), _fmt(r["seconds_per_step"], digits=1),
            _fmt(r["peak_rss_mb"] / 1024, digits=1), _params(r["trainable_params"]), _params(r["updated_params_per_step"]),
        ]) + " |")
    return _table(head, lines)


def slot_table(rows: list[dict]) -> str:
    head = ("| row | KL(batch‖bg) | Jaccard with earlier tasks | overlap with earlier tasks | hub share (batch) "
            "| slots accessed/step | selected/step |")
    lines = ["| " + " | ".join([
        r["row"], _fmt(r.get("slots_kl_batch_bg")), _fmt(r.get("slots_jaccard_earlier"), digits=3),
        _fmt(r.get("slots_overlap_earlier"), digits=3), _fmt(r.get("slots_hub_share_batch")),
        _fmt(r.get("slots_accessed_slots"), digits=0), _fmt(r.get("slots_selected_slots"), digits=0)]) + " |"
        for r in rows if r["method"] == "smf"]
    return _table(head, lines)


def tune_table(rows: list[dict]) -> str:
    head = ("| run | settings | recall (train tpl) | recall (held-out tpl) | alias in answer | BWT | NQ F1 | NQ ans. NLL "
            "| LAMBADA ppl | s/step |")
    lines = ["| " + " | ".join([
        r["row"], f"{r['optimizer']} lr {r['lr']:g}" + (f", t={r['top_t']}" if r["top_t"] else ""),
        _fmt(r["recall"]), _fmt(r["recall_heldout_template"]), _fmt(r["recall_contains"]), _fmt(r["bwt"]),
        _fmt(r.get("nq_open_rel"), True), _fmt(r.get("nq_answer_nll_rel"), True), _fmt(r.get("lambada_rel"), True),
        _fmt(r["seconds_per_step"], digits=1)]) + " |" for r in rows]
    return _table(head, lines)


def heal_table(summary: dict) -> str:
    """Held-out perplexity of a healing run (heal_summary.json): base, replace before healing, after."""
    slots = summary.get("slot_usage") or {}
    lines = ["| model | held-out ppl | vs base |", "|---|---:|---:|",
             f"| base (= additive memory, values 0) | {summary['base_ppl']:.1f} | – |",
             f"| replace, before healing | {summary['before_ppl']:.1f} | {_fmt(summary['ppl_ratio_before'] - 1, True)} |",
             f"| replace, healed {summary['steps']} steps ({', '.join(summary['heal_config']['trainable'])}) "
             f"| {summary['after_ppl']:.1f} | {_fmt(summary['ppl_ratio_after'] - 1, True)} |"]
    for layer, before in (slots.get("before") or {}).items():  # per memory layer
        after = (slots.get("after") or {}).get(layer, {})
        lines += ["", f"Slot usage of layer {layer} on the held-out text, before → after healing: " + "; ".join(
            f"{k} {_fmt(before.get(k), digits=3)} → {_fmt(after.get(k), digits=3)}"
            for k in ("touched_share", "effective_slots_share", "hub_share_top1pct"))]
    return "\n".join(lines)


def keys_table(rows: list[dict]) -> str:
    """Absolute held-out numbers before → after: a healed model starts from its own (healed)
    function, so its relative changes have a different base."""
    head = ("| row | memory | Adam lr | recall (train tpl) | recall (held-out tpl) | alias in answer | BWT | NQ ans. NLL before → after "
            "| LAMBADA ppl before → after | HellaSwag before → after | mean degradation | KL(batch‖bg) | hub share (batch) "
            "| slots accessed/step | selected slots also chosen for earlier tasks | hub share (background) |")
    lines = []
    for r in rows:
        def move(suite, key, r=r):
            b, a = r.get(f"{suite}_{key}_before"), r.get(f"{suite}_{key}_after")
            return "–" if b is None else f"{b:.2f} → {a:.2f} ({_fmt(r.get(f'{suite}_rel'), True)})"
        nq = (f"{r['nq_answer_nll_before']:.2f} → {r['nq_answer_nll_after']:.2f} ({_fmt(r['nq_answer_nll_rel'], True)})"
              if r.get("nq_answer_nll_before") is not None else "–")
        lines.append("| " + " | ".join([
            r["row"], r.get("memory", "–"), f"{r['lr']:g}", _fmt(r["recall"]), _fmt(r["recall_heldout_template"]),
            _fmt(r["recall_contains"]), _fmt(r["bwt"]), nq, move("lambada", "last_word_ppl"), move("hellaswag", "acc_norm"),
            _fmt(r["heldout_degradation"], True), _fmt(r.get("slots_kl_batch_bg")), _fmt(r.get("slots_hub_share_batch")),
            _fmt(r.get("slots_accessed_slots"), digits=0), _fmt(r.get("slots_overlap_earlier")),
            _fmt(r.get("slots_hub_share_bg"), digits=3)]) + " |")
    return _table(head, lines)


def recipe_table(rows: list[dict]) -> str:
    def num(x, digits=2) -> str:
        return "" if x is None else f"{x:.{digits}f}"

    lines = ["| row | recall | held-out tmpl | ACC | BWT | known kept | NQ F1 | GSM8K NLL | LAMBADA ppl | HellaSwag | steps | s/step | wall min |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def pct(suite, r=r):  # relative change with its paired 95% interval where the run has one
            if r.get(f"{suite}_rel") is None:
                return ""
            ci = r.get(f"{suite}_rel_change_ci95")
            return f"{100 * r[f'{suite}_rel']:+.1f}%" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")

        known = num(r["known_kept"], 3) + (f" [{r['known_kept_ci95'][0]:.3f}, {r['known_kept_ci95'][1]:.3f}]"
                                           if r.get("known_kept_ci95") else "")
        lines.append(f"| {r['row']} | {num(r['recall'])} | {num(r['recall_heldout_template'])} | {num(r['acc'])} | "
                     f"{num(r['bwt'], 3)} | {known} | {pct('nq_open')} | {pct('gsm8k')} | "
                     f"{pct('lambada')} | {pct('hellaswag')} | {r['steps']} | "
                     f"{num(r['seconds_per_step'], 1)} | {num(r['wall_minutes'], 0)} |")
    return "\n".join(lines)


def _ci(x, ci, digits=2) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _rel_ci(r: dict, suite: str) -> str:
    """A suite's relative change with its paired 95% interval, in %."""
    if r.get(f"{suite}_rel") is None:
        return "–"
    ci = r.get(f"{suite}_rel_change_ci95")
    return f"{100 * r[f'{suite}_rel']:+.1f}%" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")


def headline_v2_table(rows: list[dict]) -> str:
    head = ("| row | method | settings | recall (train tpl) | recall (held-out tpl) | ACC | BWT | forgetting | known kept "
            "| NQ F1 | GSM8K NLL | LAMBADA ppl | HellaSwag | steps | s/step | wall min | peak RSS GB | trainable | updated/step |")
    lines = ["| " + " | ".join([
        r["row"], r["method"], r["settings"], _ci(r["recall"], r.get("recall_ci95")),
        _ci(r["recall_heldout_template"], r.get("recall_heldout_template_ci95")), _fmt(r["acc"]), _fmt(r["bwt"], digits=3),
        _fmt(r["forgetting"], digits=3), _ci(r["known_kept"], r.get("known_kept_ci95"), 3),
        *(_rel_ci(r, s) for s in ("nq_open", "gsm8k", "lambada", "hellaswag")),
        str(r["steps"]), _fmt(r["seconds_per_step"], digits=1), _fmt(r["wall_minutes"], digits=0),
        _fmt(r["peak_rss_mb"] / 1024, digits=1), _params(r["trainable_params"]), _params(r["updated_params_per_step"]),
    ]) + " |" for r in rows]
    return _table(head, lines)


TABLES = {
    "headline": lambda rows: headline_table(rows) + "\n\nSlot statistics (SMF rows, means over optimizer steps):\n\n"
    + slot_table(rows),
    "keys": keys_table,
    "tune": tune_table,
    "recipe": recipe_table,
    "headline_v2": lambda rows: headline_v2_table(rows) + "\n\nSlot statistics (SMF rows, means over optimizer steps):\n\n"
    + slot_table(rows),
}
ROW_BUILDERS = {"recipe": recipe_row_of, "headline_v2": headline_v2_row_of}


# ----------------------------------------------------------------------------- files


def write_between(path: Path, text: str, start: str, end: str) -> bool:
    """Replace what lies between the markers ``start`` and ``end`` of the file ``path`` (a
    report's hand-written prose around a generated table) with ``text``; False, and the file
    left as it is, when the file or either marker is missing."""
    if not path.exists():
        return False
    doc = path.read_text()
    if start not in doc or end not in doc:
        return False
    pre, rest = doc.split(start, 1)
    path.write_text(pre + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])
    print(f"table written into {path}")
    return True


def write_csv(rows: list[dict], path: Path) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))  # every key of every row, first-seen order
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], path: Path) -> None:
    """Fact recall against the held-out change, one point per run (SMF blue, LoRA orange, full FT red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"smf": "tab:blue", "lora": "tab:orange", "full_ft": "tab:red"}
    for ax, key, label in ((axes[0], "nq_answer_nll_rel", "NQ-open answer NLL change (%, > 0 worse)"),
                           (axes[1], "heldout_degradation", "mean held-out degradation (%, > 0 worse)")):
        for r in rows:
            y = r.get(key)
            if y is None:
                continue
            ax.scatter(r["recall"], 100 * y, color=colors.get(r["method"], "grey"), s=40)
            ax.annotate(r["row"].replace("smf_", ""), (r["recall"], 100 * y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("fact recall after the stream (training templates)")
        ax.set_ylabel(label)
        ax.set_xlim(-0.03, 1.03)
    axes[0].set_title("learning vs forgetting (blue SMF, orange LoRA, red full FT)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_plot(rows: list[dict], path: Path) -> None:
    """Learning vs forgetting, one curve per method: final recall against known facts lost and
    against each suite's relative change, the rows of a method joined in order of learning rate
    (SMF: its KL rows at top-300, the learning-rate curve; other SMF rows as points). A panel
    whose changes span more than 100% has a symmetric-log axis. The last panel zooms in on the
    SMF rows (they sit together at recall ~1, loss ~0), each labelled in a column beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("known_lost", "known facts lost (share of the suite)", False)] + \
        [(f"{s}_rel", f"{s} relative change (%)", True) for s in ("nq_open", "gsm8k", "lambada", "hellaswag")]
    fig, grid = plt.subplots(2, 3, figsize=(13, 8))
    axes = grid.ravel()
    colors = {"smf": "tab:blue", "lora": "tab:orange", "full_ft": "tab:red"}
    curve = {"smf": [r for r in rows if r["method"] == "smf" and r["selector"] == "kl" and r.get("top_t") == 300],
             "lora": [r for r in rows if r["method"] == "lora"], "full_ft": [r for r in rows if r["method"] == "full_ft"]}
    smf_points = [r for r in rows if r["method"] == "smf" and r not in curve["smf"]]
    for ax, (key, label, pct) in zip(axes, panels):
        scale = 100 if pct else 1
        for method, rs in curve.items():
            rs = sorted((r for r in rs if r.get(key) is not None), key=lambda r: r["lr"])
            if rs:
                ax.plot([r["recall"] for r in rs], [scale * r[key] for r in rs], "-o", color=colors[method], label=method)
                if method != "smf":  # SMF's labels: the zoom panel
                    for r in rs:
                        ax.annotate(f"lr {r['lr']:g}", (r["recall"], scale * r[key]), fontsize=6, xytext=(3, 3),
                                    textcoords="offset points")
        pts = [r for r in smf_points if r.get(key) is not None]
        ax.scatter([r["recall"] for r in pts], [scale * r[key] for r in pts], color="tab:blue", marker="x", s=25)
        values = [abs(scale * r[key]) for r in rows if r.get(key) is not None]
        if pct and values and max(values) > 100:
            ax.set_yscale("symlog", linthresh=10)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("fact recall after the stream")
        ax.set_ylabel(label + (" (symlog)" if ax.get_yscale() == "symlog" else ""))
        ax.set_xlim(-0.03, 1.03)
    axes[0].legend(fontsize=7)
    smf_zoom(axes[-1], curve["smf"] + smf_points)
    fig.suptitle("learning vs forgetting (curves: learning rates; x: other SMF budgets and controls)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def smf_zoom(ax, rows: list[dict]) -> None:
    """Known facts lost against recall for the SMF rows alone, each point labelled in a column
    at the panel's left (in order of loss) with a line to it, so close points stay readable."""
    rows = sorted((r for r in rows if r.get("known_lost") is not None), key=lambda r: (-r["known_lost"], r["recall"]))
    if not rows:
        ax.axis("off")
        return
    for i, r in enumerate(rows):
        label = r["row"].replace("smf_", "") + ("" if r["lr"] is None else f" (lr {r['lr']:g})")
        ax.plot(r["recall"], 100 * r["known_lost"], "o", color="tab:blue", ms=4)
        ax.annotate(label, (r["recall"], 100 * r["known_lost"]), xytext=(0.03, 0.95 - i * 0.9 / max(len(rows), 1)),
                    textcoords="axes fraction", fontsize=6, va="top",
                    arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})
    lo = min(r["recall"] for r in rows)
    ax.set_xlim(lo - 0.6 * (1.0 - lo) - 0.02, 1.005)
    ax.set_ylim(bottom=-0.2)
    ax.set_xlabel("fact recall after the stream")
    ax.set_ylabel("known facts lost (%)")
    ax.set_title("SMF rows (zoom)", fontsize=8)


def table_of(table: str, runs: list[tuple[str, Path]]) -> tuple[list[dict], str]:
    """(rows, markdown) of one of TABLES over the (name, folder) of finished runs."""
    build = ROW_BUILDERS.get(table, row_of)
    rows = [build(name, run) for name, run in runs]
    return rows, TABLES[table](rows)


def report(sweep_dir: Path, table: str, names: list[str] | None = None, heal: Path | None = None) -> tuple[list[dict], str]:
    """(rows, markdown) of the sweep's runs for one of TABLES."""
    rows, text = table_of(table, run_dirs(sweep_dir, names))
    if heal is not None:
        summary = json.loads(heal.read_text())
        run = Path(summary["checkpoint"]).parent if summary.get("checkpoint") else heal.parent  # the healing run's folder
        shown = run.relative_to(ROOT) if run.is_relative_to(ROOT) else run
        if shown.is_absolute() and "experiments" in shown.parts:
            # recorded in another checkout of the repository: show it from the repository's folder on
            shown = Path(*shown.parts[shown.parts.index("experiments"):])
        text = f"Healing run (`{shown}`):\n\n" + heal_table(summary) + "\n\n" + text
    return rows, text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path, help="folder of run directories (a multirun's sweep dir, or named runs)")
    ap.add_argument("--table", choices=sorted(TABLES), default="headline")
    ap.add_argument("--rows", help="comma-separated run folder names: these rows, in this order (default: all)")
    ap.add_argument("--heal", type=Path, help="heal_summary.json of a healing run, shown before the table")
    ap.add_argument("--out", type=Path, help="also write rows.csv, rows.json, table.md and learning_vs_forgetting.png here")
    args = ap.parse_args(argv)
    rows, text = report(args.sweep_dir, args.table, args.rows.split(",") if args.rows else None, args.heal)
    if not rows:
        print(f"no finished runs (a summary.json in a subfolder) under {args.sweep_dir}", file=sys.stderr)
        return 1
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, args.out / "rows.csv")
        (args.out / "rows.json").write_text(json.dumps(rows, indent=2))
        (args.out / "table.md").write_text(text + "\n")
        plot(rows, args.out / "learning_vs_forgetting.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
