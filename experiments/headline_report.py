"""Tables and plots of the headline experiment from its finished runs (experiments/headline.py).

Reads experiments/runs/headline/<row>/{summary.json, slot_stats.csv, .hydra/overrides.yaml}
and writes experiments/results/headline/:
- headline.csv / headline.json: one row per run (the REPORT.md table, every figure measured);
- learning_vs_forgetting.png: fact recall vs held-out change, one point per run;
- <row>/: the run's summary.json, accuracy matrices, heldout.csv and slot_stats.csv;
and the table between the ``<!-- headline-table -->`` markers of experiments/REPORT.md.

    python experiments/headline_report.py            # the rows
    python experiments/headline_report.py --tune     # the learning-rate search (results/headline/tune.csv)
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import shutil
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs" / "headline"
OUT = HERE / "results" / "headline"
REPORT = HERE / "REPORT.md"
MARK_START, MARK_END = "<!-- headline-table:start -->", "<!-- headline-table:end -->"
SUITES = ("nq_open", "hellaswag", "gsm8k", "lambada")
KEPT_FILES = ("summary.json", "accuracy_matrix.csv", "accuracy_matrix_heldout_template.csv", "heldout.csv",
              "slot_stats.csv")


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
    for suite in SUITES:
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
    if nq:
        b, a = nq["all_before"]["answer_nll"], nq["all_after"]["answer_nll"]
        r.update(nq_answer_nll_before=b, nq_answer_nll_after=a, nq_answer_nll_rel=(a - b) / abs(b))
    r["heldout_degradation"] = _mean(worse)  # mean over suites of the relative worsening
    r.update({"seconds_per_step": s["seconds_per_step"], "peak_rss_mb": s["peak_rss_mb"],
              "trainable_params": s["trainable_params"], "updated_params_per_step": s["updated_params_per_step"]})
    r.update({f"slots_{k}": v for k, v in slot_summary(run / "slot_stats.csv").items()})
    return r


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


def markdown_table(rows: list[dict]) -> str:
    head = ("| row | settings | recall (train tpl) | recall (held-out tpl) | ACC | BWT | forgetting | NQ F1 | NQ ans. NLL "
            "| HellaSwag | GSM8K NLL | LAMBADA ppl | mean degradation | s/step | peak RSS GB | trainable | updated/step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
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
    return "\n".join(lines)


def slot_table(rows: list[dict]) -> str:
    head = "| row | KL(batch‖bg) | Jaccard with earlier tasks | overlap with earlier tasks | hub share (batch) | slots accessed/step | selected/step |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["method"] != "smf":
            continue
        lines.append("| " + " | ".join([
            r["row"], _fmt(r.get("slots_kl_batch_bg")), _fmt(r.get("slots_jaccard_earlier"), digits=3),
            _fmt(r.get("slots_overlap_earlier"), digits=3), _fmt(r.get("slots_hub_share_batch")),
            _fmt(r.get("slots_accessed_slots"), digits=0), _fmt(r.get("slots_selected_slots"), digits=0)]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
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


def collect(runs: list[tuple[str, Path]]) -> list[dict]:
    """One table row per finished run; its raw files are copied into results/headline/<row>/."""
    for name, run in runs:
        (OUT / name).mkdir(exist_ok=True)
        for f in KEPT_FILES:
            if (run / f).exists():
                shutil.copy2(run / f, OUT / name / f)
    return [row_of(name, run) for name, run in runs]


def write_csv(rows: list[dict], path: Path) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))  # every key of every row, first-seen order
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def commands_block() -> str:
    """The exact command of every row (python -m smf_lightning.train ...), as the runner issues it."""
    from headline import KEYS_ROWS, ROWS, TUNE, command

    lines = ["```bash"]
    for group, names, tune in (("rows", ROWS, False), ("issue 7 rows", KEYS_ROWS, False), ("learning-rate search", TUNE, True)):
        lines.append(f"# {group}")
        for n in names:
            cmd = command(n, [], tune)
            args = [shlex.quote(c.replace(str(HERE.parent) + "/", "")) for c in cmd[1:] if not c.startswith("ckpt_path=")]
            lines.append("python " + " ".join(args))
    lines.append("```")
    return "\n".join(lines)


def tune_table(rows: list[dict]) -> str:
    head = ("| run | settings | recall (train tpl) | recall (held-out tpl) | alias in answer | BWT | NQ F1 | NQ ans. NLL | LAMBADA ppl "
            "| s/step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["row"], f"{r['optimizer']} lr {r['lr']:g}" + (f", t={r['top_t']}" if r["top_t"] else ""),
            _fmt(r["recall"]), _fmt(r["recall_heldout_template"]), _fmt(r["recall_contains"]), _fmt(r["bwt"]),
            _fmt(r.get("nq_open_rel"), True), _fmt(r.get("nq_answer_nll_rel"), True), _fmt(r.get("lambada_rel"), True),
            _fmt(r["seconds_per_step"], digits=1)]) + " |")
    return "\n".join(lines)


def tune_main() -> int:
    from headline import TUNE, TUNE_RUNS

    rows = [row_of(n, TUNE_RUNS / n) for n in TUNE if (TUNE_RUNS / n / "summary.json").exists()]
    if not rows:
        print(f"no finished runs under {TUNE_RUNS}; run experiments/headline.py --tune first")
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    write_csv(rows, OUT / "tune.csv")
    table = tune_table(rows)
    print(table)
    _write_between(table, "<!-- tune-table:start -->", "<!-- tune-table:end -->")
    return 0


def _write_between(table: str, start: str, end: str) -> None:
    if not REPORT.exists():
        return
    text = REPORT.read_text()
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        REPORT.write_text(pre + start + "\n" + table + "\n" + end + rest.split(end, 1)[1])
        print(f"table written into {REPORT}")


def main() -> int:
    if "--tune" in sys.argv[1:]:
        return tune_main()
    from headline import ROWS  # the row order of the runner

    runs = [(n, RUNS / n) for n in ROWS if (RUNS / n / "summary.json").exists()]
    if not runs:
        print(f"no finished runs under {RUNS}; run experiments/headline.py first")
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    rows = collect(runs)
    write_csv(rows, OUT / "headline.csv")
    (OUT / "headline.json").write_text(json.dumps(rows, indent=2))
    plot(rows, OUT / "learning_vs_forgetting.png")
    table = markdown_table(rows) + "\n\nSlot statistics (SMF rows, means over optimizer steps):\n\n" + slot_table(rows)
    print(table)
    _write_between(table, MARK_START, MARK_END)
    _write_between(commands_block(), "<!-- commands:start -->", "<!-- commands:end -->")
    keys_section({r["row"]: r for r in rows})
    missing = [n for n in ROWS if n not in dict(runs)]
    if missing:
        print(f"rows not finished yet: {missing}")
    return 0


def heal_table(summary: dict) -> str:
    """Held-out perplexity of the healing run: base, replace before healing, replace after."""
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
    """The issue-7 rows next to the additive reference, with absolute held-out numbers: the healed
    model starts from its own (healed) function, so its relative changes have a different base."""
    head = ("| row | memory | Adam lr | recall (train tpl) | recall (held-out tpl) | alias in answer | BWT | NQ ans. NLL before → after "
            "| LAMBADA ppl before → after | HellaSwag before → after | mean degradation | KL(batch‖bg) | hub share (batch) "
            "| slots accessed/step | selected slots also chosen for earlier tasks | hub share (background) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        def move(suite, key):
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
    return "\n".join(lines)


def keys_section(collected: dict[str, dict]) -> None:
    """Issue 7 at one budget: additive vs additive + k-means keys vs replace + healed (KEYS_ROWS),
    next to the additive smf_kl_t128 row (already in `collected`, the headline rows)."""
    from headline import HEAL_DIR, KEYS_ROWS

    runs = [(n, RUNS / n) for n in KEYS_ROWS if (RUNS / n / "summary.json").exists()]
    if not runs:
        return
    rows = [collected[n] for n in ("smf_kl_t128",) if n in collected] + collect(runs)
    write_csv(rows, OUT / "keys.csv")
    table = keys_table(rows)
    heal_summary = HEAL_DIR / "heal_summary.json"
    if heal_summary.exists():
        summary = json.loads(heal_summary.read_text())
        shutil.copy2(heal_summary, OUT / "heal_summary.json")
        table = "Healing run (`experiments/runs/heal_replace`):\n\n" + heal_table(summary) + "\n\n" + table
    print(table)
    _write_between(table, "<!-- keys-table:start -->", "<!-- keys-table:end -->")


if __name__ == "__main__":
    raise SystemExit(main())
