"""Plots (PNG, matplotlib with the Agg backend, imported lazily) and the demo report (terminal, Markdown, HTML).

A report is a list of :class:`Section` objects — paragraphs, tables and images — rendered three ways:
:func:`render_text` for the terminal, :func:`render_markdown` for ``report.md`` and :func:`render_html` for
``report.html``. The ``plot_*`` functions each draw one figure from the results of :mod:`mcu.demo.pipeline`
and return the path written.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "Section",
    "Table",
    "build_sections",
    "format_table",
    "plot_active_round",
    "plot_confidence_band",
    "plot_confidence_examples",
    "plot_convergence",
    "plot_decomposition",
    "plot_reliability",
    "plot_triage",
    "plot_unseen",
    "pyplot",
    "render_html",
    "render_markdown",
    "render_text",
    "write_plots",
    "write_report",
]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use)."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('the demo plots need matplotlib: pip install "mcu[plot]"') from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


# -- tables and sections --------------------------------------------------------------------------------------


@dataclass
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    preformatted: list[str] = field(default_factory=list)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line([str(h) for h in headers]), line(["-" * w for w in widths]), *map(line, cells)])


def render_text(sections: Sequence[Section]) -> str:
    """The terminal summary: every section's text and tables (images are listed by file name)."""
    out = []
    for number, s in enumerate(sections, 1):
        out.append(f"\n{number}. {s.title}")
        out += [f"   {p}" for p in s.paragraphs]
        for t in s.tables:
            out.append("\n".join("   " + line for line in format_table(t.headers, t.rows).splitlines()))
        for block in s.preformatted:
            out.append("\n".join("   " + line for line in block.splitlines()))
        if s.images:
            out.append("   plot: " + ", ".join(name for name, _ in s.images))
    return "\n".join(out)


def render_markdown(title: str, intro: Sequence[str], sections: Sequence[Section]) -> str:
    out = [f"# {title}", "", *[f"{p}\n" for p in intro]]
    for number, s in enumerate(sections, 1):
        out += [f"## {number}. {s.title}", ""]
        out += [f"{p}\n" for p in s.paragraphs]
        for t in s.tables:
            out.append("| " + " | ".join(str(h) for h in t.headers) + " |")
            out.append("|" + "|".join(["---"] + ["---:"] * (len(t.headers) - 1)) + "|")
            out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
            out.append("")
        for block in s.preformatted:
            out += ["```", block, "```", ""]
        for name, caption in s.images:
            out += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(out)


def render_html(title: str, intro: Sequence[str], sections: Sequence[Section]) -> str:
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}td:first-child{text-align:left}"
           "img{max-width:100%}</style></head><body>", f"<h1>{e(title)}</h1>", *[f"<p>{e(p)}</p>" for p in intro]]
    for number, s in enumerate(sections, 1):
        out.append(f"<h2>{number}. {e(s.title)}</h2>")
        out += [f"<p>{e(p)}</p>" for p in s.paragraphs]
        for t in s.tables:
            out.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in t.headers) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(_cell(c))}</td>" for c in row) + "</tr>" for row in t.rows]
            out.append("</table>")
        out += [f"<pre>{e(block)}</pre>" for block in s.preformatted]
        out += [f"<figure><img src='{e(name)}' alt='{e(c)}'><figcaption>{e(c)}</figcaption></figure>"
                for name, c in s.images]
    out.append("</body></html>")
    return "\n".join(out)


# -- plots ----------------------------------------------------------------------------------------------------


def plot_confidence_examples(examples: Sequence[dict[str, Any]], path: Path) -> Path:
    """The digits of the confidence-index table, each titled with its prediction, max probability and MI."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(examples), figsize=(1.6 * len(examples), 2.6))
    for ax, ex in zip(np.atleast_1d(axes), examples):
        ax.imshow(ex["image"], cmap="gray_r", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        right = ex["truth"] == ex["predicted"]
        colour = "tab:red" if ex["source"] != "seen" else ("tab:green" if right else "tab:orange")
        ax.set_title(f"true {ex['truth']} → {ex['predicted']}\np={ex['max_probability']:.2f} "
                     f"MI={ex['mutual_information']:.2f}", fontsize=8, color=colour)
        ax.set_xlabel(ex["source"], fontsize=8)
    fig.suptitle("Predictions with a confidence index (p = max probability, MI = mutual information)\n"
                 "green: seen class, right; orange: seen class, wrong; red: class never seen in training",
                 fontsize=9)
    return _save(fig, path)


def plot_decomposition(groups: dict[str, dict[str, float]], path: Path) -> Path:
    """Grouped bars: mean total, aleatoric and epistemic uncertainty per group of inputs."""
    plt = pyplot()
    names = list(groups)
    parts = [("total", "total: predictive entropy"), ("aleatoric", "aleatoric: expected entropy"),
             ("epistemic", "epistemic: mutual information")]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(names))
    for i, (key, label) in enumerate(parts):
        ax.bar(x + (i - 1) * 0.27, [np.nan_to_num(groups[n][key]) for n in names], width=0.27, label=label)
    ax.set_xticks(x, [f"{n}\n(n={groups[n]['n']})" for n in names])
    ax.set_ylabel("mean uncertainty (nats)")
    ax.set_title("Uncertainty decomposition: total = aleatoric + epistemic")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_reliability(calib: dict[str, Any], path: Path) -> Path:
    from mcu.metrics import plot_reliability_diagram

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    diagram = calib["diagram"]
    plot_reliability_diagram(diagram, ax=ax)
    for left, width, count, acc in zip(diagram.bin_edges[:-1], np.diff(diagram.bin_edges), diagram.counts,
                                       diagram.accuracy):
        if count:  # inside the top of a tall bar (white), above a short one (black)
            inside = acc > 0.9
            ax.text(left + width / 2, acc - 0.05 if inside else acc + 0.02, f"n={count}", ha="center", fontsize=7,
                    color="white" if inside else "black")
    ax.legend(loc="center left")
    ax.set_title(f"Reliability of the MC-dropout mean (seen test digits)\nECE {calib['diagram'].ece:.3f} "
                 f"(one deterministic pass: {calib['ece_deterministic']:.3f})", fontsize=10)
    ax.set_xlabel("confidence (max mean probability)")
    ax.set_ylabel("accuracy in the bin")
    return _save(fig, path)


def plot_unseen(seen_scores: np.ndarray, unseen_scores: np.ndarray, auroc_value: float, path: Path,
                *, score_name: str = "mutual information (nats)") -> Path:
    """Histograms of an uncertainty score for seen-class and unseen-class inputs."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, max(seen_scores.max(), unseen_scores.max()) + 1e-9, 40)
    ax.hist(seen_scores, bins=bins, alpha=0.6, density=True, label=f"seen classes (n={len(seen_scores)})")
    ax.hist(unseen_scores, bins=bins, alpha=0.6, density=True, label=f"unseen classes (n={len(unseen_scores)})")
    ax.set_xlabel(score_name)
    ax.set_ylabel("density (log scale)")
    ax.set_yscale("log")
    ax.set_title(f"Unseen digit classes stand out: AUROC {auroc_value:.3f}")
    ax.legend()
    return _save(fig, path)


def plot_triage(tri: dict[str, Any], path: Path) -> Path:
    """Risk-coverage curves (seen test digits; production mix with unseen classes) and the tier boundaries."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, name in (("report", "seen test digits"), ("mix_report", "mix with unseen-class digits")):
        report = tri[key]
        line, = ax.plot(report.coverage, report.risk, label=f"{name} (AURC {report.aurc:.3f})")
        for t, marker in zip(report.tiers[:-1], "os^"):
            ax.scatter([t.cumulative_coverage], [t.cumulative_risk], marker=marker, color=line.get_color(), zorder=3,
                       label=f"  up to '{t.name}': {t.cumulative_coverage:.0%} handled, {t.cumulative_risk:.1%} wrong")
    ax.set_xlabel("coverage (share of inputs handled without human review)")
    ax.set_ylabel("risk (error rate of the inputs handled)")
    ax.set_title("Triage on the predictive entropy: answer the most certain first")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_active_round(active: dict[str, Any], path: Path) -> Path:
    """Accuracy before and after one query round (BALD vs random), and the digits BALD asked for."""
    plt = pyplot()
    images = active["images"]
    n_img = min(len(images), 10)
    fig = plt.figure(figsize=(10, 3.6))
    grid = fig.add_gridspec(2, 2 + n_img // 2, width_ratios=[3, 0.4] + [0.5] * (n_img // 2))
    ax = fig.add_subplot(grid[:, 0])
    values = [active["accuracy_before"], active["bald"]["accuracy_after"], active["random"]["accuracy_after"]]
    labels = [f"before\n({active['n_initial']} labels)", f"+{active['k']} by BALD", f"+{active['k']} at random"]
    bars = ax.bar(labels, values, color=["gray", "tab:blue", "tab:orange"])
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylim(min(values) - 0.1, 1.0)
    ax.set_ylabel("test accuracy")
    ax.set_title("One active-learning round")
    for i in range(n_img):
        sub = fig.add_subplot(grid[i % 2, 2 + i // 2])
        sub.imshow(images[i], cmap="gray_r", vmin=0, vmax=1)
        sub.set_xticks([])
        sub.set_yticks([])
        sub.set_title(f"{active['bald']['classes'][i]}", fontsize=8)
    fig.text(0.72, 0.95, "first digits queried by BALD (true label above)", ha="center", fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.18, top=0.85, wspace=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confidence_band(result: dict, path: Path) -> Path:
    """The article's confidence-band plot: mean ± 2 std (raw MC dropout) and the recalibrated 95% band."""
    plt = pyplot()
    mean, std = result["test"].mean[:, 0], result["test"].std[:, 0]
    order = np.argsort(mean)
    low, high = result["interval"]
    idx = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(10, 6))
    ax.fill_between(idx, (mean - 2 * std)[order], (mean + 2 * std)[order], color="tab:blue", alpha=0.35,
                    label=f"MC dropout mean ± 2 std (coverage {result['raw_coverage']:.0%})")
    ax.fill_between(idx, low[order], high[order], color="tab:orange", alpha=0.2,
                    label=f"split-conformal 95% (coverage {result['coverage']:.0%})")
    ax.plot(idx, mean[order], "b-", label="predicted mean")
    ax.scatter(idx, result["y_test"][order], c="r", s=8, label="held-out targets")
    ax.set_xlabel("test patients, sorted by prediction")
    ax.set_ylabel("disease progression (standardised)")
    ax.set_title("Diabetes: MC-dropout intervals before and after recalibration")
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_convergence(curves: dict[str, Any], path: Path, *, title: str = "How many samples are enough?",
                     repeats: dict[str, np.ndarray] | None = None) -> Path:
    """One panel per convergence curve: the estimate at each t with ±1 bootstrap standard error bars
    (and, if given, the spread of independent runs at each t)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items()):
        ax.errorbar(curve.ts, curve.estimates, yerr=curve.standard_errors, marker="o", capsize=4,
                    label="first t samples ± 1 bootstrap SE")
        if repeats is not None and name in repeats:
            runs = repeats[name]  # (n_runs, len(ts))
            ax.errorbar(curve.ts * 1.04, runs.mean(axis=0), yerr=runs.std(axis=0, ddof=1), marker="s", capsize=4,
                        linestyle="--", label=f"{runs.shape[0]} independent runs: mean ± sd")
        ax.set_xscale("log")
        ax.set_xticks(curve.ts, [str(t) for t in curve.ts])
        ax.set_xlabel("MC-dropout samples T")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


# -- the demo report ------------------------------------------------------------------------------------------


def write_plots(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Draw every demo plot into ``out``; returns ``{key: path}``."""
    preds = results["predictions"]
    return {
        "examples": plot_confidence_examples(results["examples"], out / "confidence_index.png"),
        "decomposition": plot_decomposition(results["decomposition"], out / "uncertainty_decomposition.png"),
        "reliability": plot_reliability(results["calibration"], out / "reliability_diagram.png"),
        "unseen": plot_unseen(preds["test"].mutual_information, preds["ood"].mutual_information,
                              results["unseen"]["auroc_mi"], out / "unseen_classes.png"),
        "triage": plot_triage(results["triage"], out / "triage_risk_coverage.png"),
        "active": plot_active_round(results["active"], out / "active_learning_round.png"),
        "diabetes": plot_confidence_band(results["diabetes"], out / "diabetes_confidence_band.png"),
        "convergence": plot_convergence(results["convergence"]["curves"], out / "convergence.png",
                                        title="Uncertainty vs number of MC-dropout samples (digits test set)"),
    }


def build_sections(results: dict[str, Any], plots: dict[str, Path]) -> list[Section]:
    """The report's sections from the pipeline results and the plot files."""
    cfg, splits = results["config"], results["splits"]
    img = {key: path.name for key, path in plots.items()}
    held = ", ".join(str(c) for c in splits.held_out)

    examples = Section(
        "Predictions with a confidence index",
        [f"A few test digits: the model's answer, its max probability (confidence) and the mutual information "
         f"(epistemic uncertainty, nats) over T={cfg.n_samples} MC-dropout samples. The last rows are digits of "
         f"classes never seen in training ({held})."],
        [Table(["source", "true digit", "predicted", "max prob", "MI", "entropy"],
               [[e["source"], e["truth"], e["predicted"], e["max_probability"], e["mutual_information"],
                 e["predictive_entropy"]] for e in results["examples"]])],
        [(img["examples"], "Digits with their prediction, max probability and mutual information")])

    dec = results["decomposition"]
    decomposition = Section(
        "Uncertainty decomposition",
        ["Mean predictive entropy (total) = expected entropy (aleatoric: noise the model sees in the input) + "
         "mutual information (epistemic: disagreement between dropout samples). Unseen-class inputs and mistakes "
         "carry much more epistemic uncertainty than correct answers."],
        [Table(["inputs", "n", "total", "aleatoric", "epistemic"],
               [[name, g["n"], g["total"], g["aleatoric"], g["epistemic"]] for name, g in dec.items()])],
        [(img["decomposition"], "Mean total, aleatoric and epistemic uncertainty")])

    cal = results["calibration"]
    calibration = Section(
        "Calibration",
        [f"Accuracy on seen test digits: {cal['accuracy']:.3f} with the MC-dropout mean "
         f"({cal['accuracy_deterministic']:.3f} with one deterministic pass). Expected calibration error "
         f"(10 bins): {cal['diagram'].ece:.3f} for the MC-dropout mean, {cal['ece_deterministic']:.3f} for the "
         "deterministic pass."],
        images=[(img["reliability"], "Reliability diagram of the MC-dropout mean probabilities")])

    u = results["unseen"]
    unseen = Section(
        "Separation of unseen classes",
        [f"Scoring each input by its uncertainty and asking 'is this a class the model never saw ({held})?': "
         f"AUROC {u['auroc_mi']:.3f} with the mutual information, {u['auroc_entropy']:.3f} with the predictive "
         f"entropy (0.5 = chance). AUPR with MI {u['aupr_mi']:.3f} (chance {u['chance_aupr']:.3f})."],
        images=[(img["unseen"], "Mutual information of seen and unseen digit classes")])

    tri = results["triage"]
    article = tri["article_report"]
    unseen_tiers = ", ".join(f"{t} {share:.0%}" for t, share in tri["unseen_tiers"].items())
    triage = Section(
        "Triage tiers",
        [f"Thresholds on the predictive entropy fitted on validation data (at most "
         f"{tri['targets']['review_rate']:.0%} to human review; automatic tier at least "
         f"{tri['targets']['auto_accuracy']:.0%} accurate on validation): "
         f"{', '.join(f'{t:.4g}' for t in tri['triage'].thresholds)}. " + " ".join(tri["notes"]),
         "First on the seen test digits, then on a production mix of those and the unseen-class digits "
         f"(whose answers are always wrong); unseen-class digits are routed {unseen_tiers}.",
         f"The article's fixed review threshold 0.15 sends {article.tiers[1].coverage:.0%} of the seen test digits "
         f"to review (automatic accuracy {article.tiers[0].accuracy:.1%}) and "
         f"{tri['unseen_review_article']:.0%} of the unseen-class digits."],
        preformatted=["Seen test digits\n" + str(tri["report"]),
                      "Production mix: seen test digits + unseen-class digits\n" + str(tri["mix_report"])],
        images=[(img["triage"], "Risk-coverage curves with the tier boundaries")])

    act = results["active"]
    active = Section(
        "One active-learning round",
        [f"A model trained on {act['n_initial']} labeled digits queries {act['k']} more from the rest of the "
         f"training split with BALD (mutual information), is retrained, and is tested; the same with {act['k']} "
         "random digits for comparison."],
        [Table(["labels", "test accuracy"],
               [[f"{act['n_initial']} initial", act["accuracy_before"]],
                [f"+{act['k']} by BALD", act["bald"]["accuracy_after"]],
                [f"+{act['k']} at random", act["random"]["accuracy_after"]]])],
        [(img["active"], "Accuracy before/after one round, and the digits BALD asked for")])

    d = results["diabetes"]
    diabetes = Section(
        "Regression intervals (diabetes)",
        ["A dropout regressor on scikit-learn's diabetes data. Raw MC-dropout intervals (mean ± 1.96 std) "
         "capture only the model's epistemic spread and under-cover; split-conformal recalibration on a "
         "held-out split rescales them to the nominal 95%."],
        [Table(["95% intervals", "coverage", "mean width"],
               [["raw MC dropout", d["raw_coverage"], d["raw_width"]],
                [f"split conformal (scale {d['scale']:.2f})", d["coverage"], d["width"]]])],
        [(img["diabetes"], "The article's confidence-band plot, before and after recalibration")])

    conv = results["convergence"]
    rows = []
    for name, curve in conv["curves"].items():
        for t, est, se in zip(curve.ts, curve.estimates, curve.standard_errors):
            rows.append([name, int(t), float(est), float(se)])
    enough = "; ".join(f"{name}: T = {t if t is not None else f'more than {max(cfg.convergence_ts)}'}"
                       for name, t in conv["sufficient_t"].items())
    convergence = Section(
        "Uncertainty vs number of samples",
        [f"The article's convergence test on {conv['n_examples']} test digits: each statistic on the first T "
         "samples, with a bootstrap Monte Carlo standard error. Smallest T whose standard error is below 2% of "
         f"the final estimate: {enough}."],
        [Table(["statistic", "T", "estimate", "standard error"], rows)],
        [(img["convergence"], "Convergence of the uncertainty estimates with T")])

    return [examples, decomposition, calibration, unseen, triage, active, diabetes, convergence]


def write_report(results: dict[str, Any], out: Path) -> tuple[list[Section], dict[str, Path]]:
    """Plots, ``report.md`` and ``report.html`` in ``out``; returns the sections and the written files."""
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, out)
    sections = build_sections(results, plots)
    cfg, splits = results["config"], results["splits"]
    title = "mcu demo: Monte Carlo dropout uncertainty on digits"
    intro = [f"Backend {cfg.backend}; seed {cfg.seed}; T = {cfg.n_samples} MC-dropout samples per input. A "
             f"{splits.x_train.shape[1]}-128-128-{splits.n_classes} MLP with dropout 0.3 after each hidden layer, "
             f"trained on {len(splits.y_train)} digits of the classes {', '.join(map(str, splits.classes))}; the "
             f"digits {', '.join(map(str, splits.held_out))} are never seen in training. Step times (s): "
             + ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"].items()) + "."]
    files = dict(plots)
    files["markdown"] = out / "report.md"
    files["markdown"].write_text(render_markdown(title, intro, sections), encoding="utf-8")
    files["html"] = out / "report.html"
    files["html"].write_text(render_html(title, intro, sections), encoding="utf-8")
    return sections, files
