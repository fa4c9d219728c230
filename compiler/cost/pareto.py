"""``einshard explain --pareto FILE``: latency per token against cost per token, as the paper's
Figure 1 draws it, over batch sizes and weight formats, the Pareto frontier marked.

For each phase, batch size and weight format that compiles, the layout ``auto`` would choose
(the fastest that fits) gives one point: x = cost (chip-ms per token), y = latency (decode: the
step time, i.e. per generated token; prefill: the time to process the prompt). A point is on the
frontier when no other point of its phase is at least as cheap and as fast and better in one.
matplotlib is imported only here, only when a plot is asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from compiler.cost.autolayout import evaluate
from compiler.cost.hardware import Chip
from compiler.spec import Spec
from ir.errors import EinshardError, SpecError

DEFAULT_BATCHES = (1, 4, 16, 64, 256, 1024)


@dataclass(frozen=True)
class Point:
    phase: str
    batch: int
    weights: str
    ffn: str
    attn: str
    latency_s: float
    cost_chip_ms_per_token: float
    mfu: float


#: A predicted MFU above this is flagged: the paper's best measured prefill reaches 76%.
MFU_WARNING = 0.9


def warnings(points: list[Point]) -> list[str]:
    """Points whose predicted MFU is implausibly high for a real machine."""
    return [f"{p.phase} {p.weights} batch {p.batch} ({p.ffn}/{p.attn}): predicted MFU {100 * p.mfu:.0f}% is above "
            f"{100 * MFU_WARNING:.0f}%; the paper's best measured is 76% (a bound, or a calibration off its data)"
            for p in points if p.mfu > MFU_WARNING]


def sweep(spec: Spec, chip: Chip, phases: tuple[str, ...], batches: tuple[int, ...] = DEFAULT_BATCHES,
          formats: tuple[str, ...] = ("bf16", "int8"), model: str = "calibrated") -> tuple[list[Point], list[str]]:
    """Points of every (phase, batch, format) that compiles and fits; and why the others are missing."""
    points, skipped = [], []
    for ph in phases:
        for w in formats:
            for b in batches:
                s = replace(spec, serve=replace(spec.serve, phase=ph, batch=b, weights=w, ffn="auto", attn="auto"))
                try:
                    ch = evaluate(s, chip, model=model).chosen
                except EinshardError as e:  # e.g. a weight format this build refuses
                    skipped.append(f"{ph} {w} batch {b}: {e.message}")
                    continue
                if ch is None:
                    skipped.append(f"{ph} {w} batch {b}: no layout fits")
                    continue
                est = ch.est
                points.append(Point(ph, b, w, ch.ffn, ch.attn, est.step_time_s, est.cost_chip_ms_per_token,
                                    est.mfu))
    return points, skipped


def sweep_generation(spec: Spec, chip: Chip, batches: tuple[int, ...], prompt_len: int, new_tokens: int,
                     model: str = "calibrated", formats: tuple[str, ...] = ("bf16", "int8")
                     ) -> tuple[list[Point], list[str]]:
    """Whole requests (compiler/cost/generation.py): latency = the request's total time, cost =
    chip-ms per generated token with the prefill charged; the decode layout labels the point."""
    from compiler.cost.generation import estimate_generation

    points, skipped = [], []
    for w in formats:
        for b in batches:
            s = replace(spec, serve=replace(spec.serve, batch=b, weights=w, ffn="auto", attn="auto"))
            try:
                g = estimate_generation(s, chip, prompt_len, new_tokens, model)
            except EinshardError as e:
                skipped.append(f"generate {w} batch {b}: {e.message}")
                continue
            lay = g.decode or g.prefill
            if not (g.prefill.fits and lay.fits):
                skipped.append(f"generate {w} batch {b}: no layout fits")
                continue
            points.append(Point("generate", b, w, lay.ffn, lay.attn, g.total_s, g.cost_chip_ms_per_token, g.mfu_total))
    return points, skipped


def frontier(points: list[Point]) -> list[Point]:
    """The Pareto-optimal points (lower cost and lower latency are better), by increasing cost."""
    out = []
    for p in points:
        dominated = any(q is not p and q.cost_chip_ms_per_token <= p.cost_chip_ms_per_token
                        and q.latency_s <= p.latency_s
                        and (q.cost_chip_ms_per_token < p.cost_chip_ms_per_token or q.latency_s < p.latency_s)
                        for q in points)
        if not dominated:
            out.append(p)
    return sorted(out, key=lambda p: (p.cost_chip_ms_per_token, p.latency_s))


def check_path(path: str | Path) -> None:
    """Refuses, before the sweep, a file matplotlib cannot write: an unknown image format or a
    folder that does not exist."""
    from matplotlib.figure import Figure

    p = Path(path)
    formats = Figure().canvas.get_supported_filetypes()
    if p.suffix.lstrip(".").lower() not in formats:
        raise SpecError(f"--pareto {path}: unknown image format {p.suffix or '(none)'!r}",
                        hint=f"end the name with one of: {', '.join('.' + f for f in sorted(formats))}")
    if not p.parent.is_dir():
        raise SpecError(f"--pareto {path}: folder {p.parent} does not exist")


def _label_log_ticks(ax) -> None:
    """Tick labels a reader can use on both log axes, whatever their span: one per decade over
    three decades or more, else at 1-2-5 of each decade (every digit under one decade), written as
    plain numbers. (Decade-only labels leave an axis spanning less than a decade unlabelled;
    matplotlib's minor labels crowd the major ones.)"""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        lo, hi = sorted(lim)
        decades = math.log10(hi / lo) if lo > 0 else 3.0
        subs = (1.0,) if decades >= 3 else (1.0, 2.0, 5.0) if decades >= 1 else tuple(range(1, 10))
        axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def labels(points: list[Point]) -> list[tuple[float, float, str]]:
    """One label per spot: points that land on the same coordinates (bf16 and int8 at a batch
    where the weight format changes nothing) share a label instead of printing two on top of
    each other. (x, y in ms, text), by increasing cost."""
    spots: dict[tuple[float, float], list[Point]] = {}
    for p in points:
        key = (round(math.log10(max(p.cost_chip_ms_per_token, 1e-300)), 3), round(math.log10(max(p.latency_s, 1e-300)), 3))
        spots.setdefault(key, []).append(p)
    out = []
    for group in spots.values():
        p = group[0]
        fmts = ",".join(dict.fromkeys(q.weights for q in group))
        lays = ",".join(dict.fromkeys(f"{q.ffn}/{q.attn}" for q in group))
        batches = ",".join(dict.fromkeys(str(q.batch) for q in group))
        text = f"B={batches}\n{lays}" + (f"\n{fmts}" if len(group) > 1 else "")
        out.append((p.cost_chip_ms_per_token, p.latency_s * 1e3, text))
    return sorted(out)


def figure(points: list[Point], title: str):
    """The plot as a matplotlib Figure: one panel per phase, cost against latency on log axes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    phases = [ph for ph in ("prefill", "decode", "generate") if any(p.phase == ph for p in points)]
    fig = Figure(figsize=(6 * max(1, len(phases)), 4.5))
    axes = fig.subplots(1, max(1, len(phases)), squeeze=False)
    for ax, ph in zip(axes[0], phases):
        pts = [p for p in points if p.phase == ph]
        for w, marker in (("bf16", "o"), ("int8", "s"), ("f32", "^")):
            sel = [p for p in pts if p.weights == w]
            if sel:
                ax.scatter([p.cost_chip_ms_per_token for p in sel], [p.latency_s * 1e3 for p in sel], marker=marker,
                           label=f"{w} weights", alpha=0.8)
        for i, (x, y, text) in enumerate(labels(pts)):
            # alternate above / below so that neighbours on a flat stretch do not overprint
            ax.annotate(text, (x, y), fontsize=6, xytext=(3, 4 if i % 2 == 0 else -14), textcoords="offset points")
        fr = frontier(pts)
        ax.plot([p.cost_chip_ms_per_token for p in fr], [p.latency_s * 1e3 for p in fr], "k--", lw=1,
                label="Pareto frontier")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cost (chip-ms per token)")
        ax.set_ylabel({"decode": "latency per generated token (ms)", "prefill": "prefill time (ms)",
                       "generate": "latency per request (ms)"}[ph])
        _label_log_ticks(ax)
        ax.set_title(f"{ph}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot(points: list[Point], path: str | Path, title: str) -> None:
    figure(points, title).savefig(path, dpi=120)
