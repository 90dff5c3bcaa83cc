"""Results out: aligned plain-text tables, Markdown, JSON, CSV and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from mcu.bench.machine import summary

__all__ = ["markdown", "tables", "text", "write_all"]

SECTIONS = ("timing", "memory", "precision", "convergence", "peak")


# --- number formatting --------------------------------------------------------------------------------------------

def _ms(seconds: Any) -> str:
    if seconds is None:
        return ""
    ms = 1e3 * seconds
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def _si(value: Any) -> str:
    if value is None:
        return ""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}g}"


def label(row: dict) -> str:
    """``strategy`` for mcu rows, ``ext:name`` for external reference rows."""
    return f"ext:{row['strategy']}" if row.get("kind") == "external" else str(row.get("strategy", ""))


# --- tables -------------------------------------------------------------------------------------------------------

Table = tuple[str, list[str], list[list[str]], list[str]]  # title, headers, rows, notes


class _Notes:
    """Numbered notes for failed/skipped rows; rows with the same message share a number."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def status(self, row: dict) -> str:
        if row.get("status") in (None, "ok"):
            return "ok"
        text = str(row.get("error"))
        if text not in self.texts:
            self.texts.append(text)
        return f"{row['status']}[{self.texts.index(text) + 1}]"

    def lines(self) -> list[str]:
        return [f"[{i + 1}] {text}" for i, text in enumerate(self.texts)]


def tables(results: dict[str, Any]) -> list[Table]:
    """``(title, headers, rows, notes)`` per section: summary, timing, memory, precision, convergence, and the
    dense-layer throughput of transformer workloads (empty, so not shown, without one)."""
    return [_summary(results), _timing(results), _memory(results), _precision(results), _convergence(results),
            _throughput(results)]


def _find(rows: list[dict], **match: Any) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _summary(results: dict[str, Any]) -> Table:
    """One line per case: the loop's time, then speed-ups over it (auto, the best mcu strategy per precision,
    and each external)."""
    timing = results.get("timing", [])
    cases: dict[tuple, list[dict]] = {}
    for r in timing:
        cases.setdefault((r["backend"], r["workload"], r["n"], r["t"]), []).append(r)
    externals = list(dict.fromkeys(label(r) for r in timing if r.get("kind") == "external"))
    precisions = list(dict.fromkeys(r["precision"] for r in timing if r.get("kind") == "mcu"))

    def speed(r: dict | None) -> str:
        return "-" if r is None else f"{r['speedup']:.2f}" if r.get("speedup") else str(r.get("status"))

    rows = []
    for (backend, workload, n, t), mine in cases.items():
        loop = _find(mine, kind="mcu", strategy="loop", precision="fp32")
        auto = _find(mine, kind="mcu", strategy="auto", precision="fp32")
        row = [backend, workload, str(n), str(t), _ms(loop.get("median_s")) if loop else "",
               f"{speed(auto)} {auto.get('chosen', '')}".strip() if auto else "-"]
        for precision in precisions:
            best = max((r for r in mine if r.get("kind") == "mcu" and r["precision"] == precision and
                        r["strategy"] != "auto" and r.get("speedup")), key=lambda r: r["speedup"], default=None)
            row.append(f"{best['speedup']:.2f} {best['strategy']}" if best else "-")
        rows.append(row + [speed(next((r for r in mine if label(r) == e), None)) for e in externals])
    headers = ["backend", "workload", "N", "T", "loop ms", "auto x", *[f"best {p} x" for p in precisions],
               *[f"{e} x" for e in externals]]
    return "Summary: speed-up over loop/fp32 in the same run (x > 1 is faster)", headers, rows, []


def _timing(results: dict[str, Any]) -> Table:
    notes = _Notes()
    rows = [[r["backend"], r["workload"], str(r["n"]), str(r["t"]), label(r), r.get("precision", ""),
             notes.status(r), _ms(r.get("warmup_s")), _ms(r.get("median_s")),
             f"{_ms(r.get('q1_s'))}-{_ms(r.get('q3_s'))}" if r.get("q1_s") is not None else "",
             str(r.get("repeats", "")), _si(r.get("samples_per_s")),
             f"{r['speedup']:.2f} ({r['speedup_q1']:.2f}-{r['speedup_q3']:.2f})" if r.get("speedup") else "",
             r.get("chosen", "") if r.get("strategy") == "auto" else ""]
            for r in results.get("timing", [])]
    headers = ["backend", "workload", "N", "T", "strategy", "prec", "status", "warm-up ms", "median ms", "IQR ms",
               "reps", "samples/s", "x loop (IQR)", "auto chose"]
    title = ("Timing (median of interleaved repeats; samples/s = N x T / median; speed-up = median per-round "
             "ratio to loop/fp32)")
    return title, headers, rows, notes.lines()


def _memory(results: dict[str, Any]) -> Table:
    notes = _Notes()
    rows = [[r["backend"], r["workload"], str(r["n"]), str(r["t"]), label(r), r.get("precision", ""),
             notes.status(r), _num(r.get("baseline_mb"), 4), _num(r.get("peak_mb"), 4), _num(r.get("delta_mb")),
             _ms(r.get("seconds"))]
            for r in results.get("memory", [])]
    headers = ["backend", "workload", "N", "T", "strategy", "prec", "status", "baseline MB", "peak MB", "delta MB",
               "run ms"]
    return ("Peak memory (fresh process per row; delta = peak RSS - RSS after model+input creation)", headers, rows,
            notes.lines())


def _precision(results: dict[str, Any]) -> Table:
    notes = _Notes()
    found = results.get("precision", [])
    noise = {(r["backend"], r["workload"]): r.get("uncertainty_abs_mean") for r in found
             if r.get("precision") == "fp32" and r.get("status") == "ok"}
    rows = []
    for r in found:
        base, change = noise.get((r["backend"], r["workload"])), r.get("uncertainty_abs_mean")
        against = "fp32 seed 1 (MC noise)" if r.get("precision") == "fp32" else f"{r.get('precision')} seed 0"
        rows.append([r["backend"], r["workload"], str(r["n"]), str(r["t"]), against, notes.status(r),
                     _num(r.get("mean_z_median")), _num(r.get("mean_z_max")), _num(r.get("mean_abs_max")),
                     _num(change), _num(change / base if base and change is not None else None),
                     _num(r.get("argmax_agreement"))])
    strategies = "/".join(sorted({str(r["strategy"]) for r in found if r.get("strategy")}))
    headers = ["backend", "workload", "N", "T", "compared", "status", "z median", "z max", "max |d mean|",
               "|d uncert.|", "x MC noise", "argmax same"]
    title = (f"Precision impact against fp32 seed 0 (strategy {strategies}, same seed). z = |change of a mean "
             "probability| / its MC standard error (about 0.67 median for pure MC noise); uncertainty = entropy "
             "(std for regression)")
    return title, headers, rows, notes.lines()


def _convergence(results: dict[str, Any]) -> Table:
    found = results.get("convergence", [])
    ts = sorted({r["t"] for r in found if r.get("t") is not None})
    cells = {(r["backend"], r["workload"], r.get("metric"), r["t"]): r for r in found if "mean" in r}
    rows = []
    for b, w, m in sorted({(r["backend"], r["workload"], r.get("metric")) for r in found if "mean" in r}):
        rows.append([b, w, m] + [f"{c['mean']:.4g}+-{c['std']:.2g}" if (c := cells.get((b, w, m, t))) else ""
                                 for t in ts])
    seeds = max((r.get("seeds", 0) for r in found), default=0)
    title = (f"Convergence: the article's samples.std(axis=0).mean() (on probabilities) and the mean entropy vs T "
             f"(mean +- std over {seeds} seeds)")
    return title, ["backend", "workload", "metric", *[f"T={t}" for t in ts]], rows, []


def peaks(results: dict[str, Any]) -> dict[tuple[str, str], float]:
    """The best matmul GFLOP/s per ``(backend, precision)`` measured in the run."""
    out: dict[tuple[str, str], float] = {}
    for r in results.get("peak", []):
        if r.get("gflops"):
            key = (r["backend"], r["precision"])
            out[key] = max(out.get(key, 0.0), r["gflops"])
    return out


def _ratio_to(rows: list[dict], row: dict, **match: Any) -> float | None:
    """Median per-round ratio of the matching row's time to ``row``'s (x > 1: ``row`` is faster)."""
    other = _find(rows, backend=row["backend"], workload=row["workload"], n=row["n"], t=row["t"], **match)
    if not other or not other.get("times_s") or not row.get("times_s"):
        return None
    return statistics.median(a / b for a, b in zip(other["times_s"], row["times_s"]))


def _throughput(results: dict[str, Any]) -> Table:
    """Transformer rows: GFLOP/s of the encoder's matmuls against the matmul peak of the same run, the speed-up
    over mcu's loop and over the train() loop (``ext:article-loop``), and the spread of the samples."""
    timing = [r for r in results.get("timing", []) if r.get("dense_gflop_per_row")]
    peak = peaks(results)
    notes = _Notes()
    rows = []
    for r in timing:
        ok = r.get("status") == "ok" and r.get("median_s")
        gflops = r["n"] * r["t"] * r["dense_gflop_per_row"] / r["median_s"] if ok else None
        reference = peak.get((r["backend"], r.get("precision", "fp32")))
        to_train = _ratio_to(timing, r, kind="external", strategy="article-loop") if ok else None
        rows.append([r["backend"], r["workload"], str(r["n"]), str(r["t"]), label(r), r.get("precision", ""),
                     notes.status(r), _ms(r.get("median_s")), _num(gflops),
                     f"{100 * gflops / reference:.0f}%" if gflops and reference else "",
                     f"{r['speedup']:.2f}" if r.get("speedup") else "", _num(to_train), _num(r.get("sample_std")),
                     r.get("chosen", "") if r.get("strategy") == "auto" else ""])
    per_row = sorted({r["dense_gflop_per_row"] for r in timing})
    measured = "; ".join(f"{b} {p} {v:.0f}" for (b, p), v in sorted(peak.items())) or "not measured"
    title = (f"Dense-layer throughput of the transformer ({', '.join(f'{g:.3g}' for g in per_row)} GFLOP of "
             f"encoder matmuls per sample) against the best plain matmul of this run (GFLOP/s: {measured}); "
             "x train() = median per-round ratio to ext:article-loop; logit std = spread of the samples")
    headers = ["backend", "workload", "N", "T", "strategy", "prec", "status", "median ms", "GFLOP/s", "of peak",
               "x loop", "x train()", "logit std", "auto chose"]
    return title, headers, rows, notes.lines()


def _render(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    numeric = [all(_looks_numeric(r[i]) for r in rows) and i > 1 for i in range(len(headers))]
    fmt = lambda r: "  ".join(str(x).rjust(w) if num else str(x).ljust(w) for x, w, num in zip(r, widths, numeric))
    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r).rstrip() for r in rows])


def _looks_numeric(text: str) -> bool:
    return not text or text[0].isdigit() or text[0] == "-"


def _header(results: dict[str, Any]) -> list[str]:
    meta = results["meta"]
    return summary(meta["machine"], results.get("backends")) + [
        f"profile  {meta['settings']['profile']}; ran {meta['seconds'] / 60:.1f} min; started {meta['started']}"]


def text(results: dict[str, Any]) -> str:
    parts = _header(results)
    for title, headers, rows, notes in tables(results):
        if rows:
            parts += ["", title, _render(headers, rows, markdown=False)] + notes
    return "\n".join(parts)


def markdown(results: dict[str, Any]) -> str:
    """The result tables as Markdown (for benchmarks/RESULTS.md), machine and versions first."""
    parts = ["# mcu benchmark results", ""] + [f"- {line}" for line in _header(results)]
    for title, headers, rows, notes in tables(results):
        if rows:
            parts += ["", f"## {title}", "", _render(headers, rows, markdown=True)]
            parts += [""] + [f"- {n}" for n in notes] if notes else []
    return "\n".join(parts) + "\n"


# --- files --------------------------------------------------------------------------------------------------------

def write_all(results: dict[str, Any], out: Path, markdown_path: Path | None = None) -> list[Path]:
    """``results.json``, one CSV per section, PNG plots (if matplotlib is installed), optional Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json"]
    written[0].write_text(json.dumps(results, indent=1, default=str))
    for section in SECTIONS:
        rows = results.get(section, [])
        if not rows:
            continue
        path = out / f"{section}.csv"
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
        written.append(path)
    try:
        written += plots(results, out)
    except ImportError:
        pass
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(markdown(results))
        written.append(markdown_path)
    return written


def _grid(keys_rows: list, keys_cols: list, plt: Any, width: float = 5.5, height: float = 3.2):
    size = (width * len(keys_cols), height * len(keys_rows))
    return plt.subplots(len(keys_rows), len(keys_cols), figsize=size, squeeze=False)


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    timing = [r for r in results.get("timing", []) if r.get("speedup")]
    if timing:
        written.append(_per_case_plot(plt, timing, "speedup", "speed-up over loop/fp32 (median, IQR)", out / "speedup.png",
                                      bars=False))
    memory = [r for r in results.get("memory", []) if r.get("delta_mb") is not None]
    if memory:
        written.append(_per_case_plot(plt, memory, "delta_mb", "peak RSS above baseline (MB)", out / "memory.png",
                                      bars=True))
    conv = [r for r in results.get("convergence", []) if "mean" in r]
    if conv:
        written.append(_convergence_plot(plt, conv, out / "convergence.png"))
    return written


def _convergence_plot(plt: Any, conv: list[dict], path: Path) -> Path:
    """One panel per (metric, workload); one line per backend, relative to its value at the largest T (the
    backends initialise weights differently, so absolute levels differ); error bars: std over seeds."""
    metrics = sorted({r["metric"] for r in conv}, reverse=True)
    workloads = sorted({r["workload"] for r in conv})
    fig, axes = _grid(metrics, workloads, plt, width=4.2)
    for i, metric in enumerate(metrics):
        for j, workload in enumerate(workloads):
            ax = axes[i][j]
            for backend in sorted({r["backend"] for r in conv}):
                rows = sorted((r for r in conv if (r["metric"], r["workload"], r["backend"]) == (metric, workload, backend)),
                              key=lambda r: r["t"])
                if rows and rows[-1]["mean"]:
                    scale = rows[-1]["mean"]
                    ax.errorbar([r["t"] for r in rows], [r["mean"] / scale for r in rows],
                                yerr=[r["std"] / scale for r in rows], marker="o", capsize=3,
                                label=f"{backend} (T={rows[-1]['t']}: {scale:.3g})")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(f"{workload}: {metric}", fontsize=9)
            ax.set_xlabel("T (samples)", fontsize=8)
            ax.set_ylabel("relative to the largest T", fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle("Convergence vs T (mean +- std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_y(ax: Any) -> None:
    """Log y axis with plain tick labels at 1-2-5 steps."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


LINESTYLES = {"fp32": "-", "bf16": "--", "fp16": ":"}
HATCHES = {"fp32": "", "bf16": "//", "fp16": ".."}


def _per_case_plot(plt: Any, rows: list[dict], key: str, ylabel: str, path: Path, bars: bool) -> Path:
    """One panel per (workload, backend); x = cases (N, T); colour = strategy, line style/hatch = precision."""
    workloads = sorted({r["workload"] for r in rows})
    backends = sorted({r["backend"] for r in rows})
    names = list(dict.fromkeys(label(r) for r in rows))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    fig, axes = _grid(workloads, backends, plt, width=6.5)
    for i, workload in enumerate(workloads):
        for j, backend in enumerate(backends):
            ax = axes[i][j]
            mine = [r for r in rows if r["workload"] == workload and r["backend"] == backend]
            cases = sorted({(r["n"], r["t"]) for r in mine})
            series = list(dict.fromkeys((label(r), r["precision"]) for r in mine))
            for k, (name, precision) in enumerate(series):
                by_case = {(r["n"], r["t"]): r for r in mine if (label(r), r["precision"]) == (name, precision)}
                xs = [c for c, case in enumerate(cases) if case in by_case]
                ys = [by_case[cases[c]][key] for c in xs]
                style = {"color": colours[name], "label": f"{name}/{precision}"}
                if bars:
                    width = 0.8 / len(series)
                    ax.bar([x - 0.4 + width * (k + 0.5) for x in xs], ys, width, hatch=HATCHES.get(precision, ""),
                           edgecolor="white", **style)
                else:
                    lo = [by_case[cases[c]][key] - by_case[cases[c]][f"{key}_q1"] for c in xs]
                    hi = [by_case[cases[c]][f"{key}_q3"] - by_case[cases[c]][key] for c in xs]
                    ax.errorbar(xs, ys, yerr=[lo, hi], capsize=2, ls=LINESTYLES.get(precision, "-"),
                                marker="x" if name.startswith("ext:") else "o", ms=4, **style)
            if not bars:
                ax.axhline(1.0, color="grey", lw=0.8)
            _log_y(ax)
            ax.set_xticks(range(len(cases)), [f"N={n}\nT={t}" for n, t in cases], fontsize=7)
            ax.set_title(f"{workload} ({backend})", fontsize=9)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(True, which="major", axis="y", alpha=0.3)
            if j == len(backends) - 1:
                ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
