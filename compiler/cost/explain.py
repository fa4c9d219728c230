"""``einshard explain``: every candidate layout priced, per phase, as a table or JSON.

For each phase (the one given by --phase, else prefill and decode) every FFN x attention
layout is compiled and priced (compiler/cost/autolayout.py); the table shows the time
components of a step (sums over ops: matmul compute, weight load, KV load, activation traffic,
exposed communication), the combined step time (see compiler/cost/model.py for the rule), MFU,
cost, memory per chip and whether it fits. ``*`` marks the layout ``auto`` chooses (the fastest
that fits), ``s`` the spec's own layout when it names one and it differs. The footer and ``max
context`` describe the spec's layout when it names one (``--ffn``/``--attn``; a field left at
``auto`` is the fastest fitting candidate with the other field as given), else auto's choice.
``max context`` is the longest KV cache that fits in ``kv_fraction`` of HBM and in what the
weights, activations and prefetch buffer leave (the cache grows linearly with its length T,
which no layout shards). Times come from the ``calibrated`` model
(predictions) or the ``bound`` (lower bounds): compiler/cost/efficiency.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from compiler.cost.autolayout import Candidate, Choice, evaluate
from compiler.cost.efficiency import efficiency_for
from compiler.cost.hardware import Chip, GiB
from compiler.cost.model import Components, Estimate
from compiler.cost.moe import expert_rows, format_expert_rows, rows_json
from compiler.spec import Spec
from compiler.cost.staging import GENERATE_TOKENS, StageCandidate, fastest_stage, stage_candidates, stage_json
from compiler.stages import inner_mesh
from passes.pipeline_stages import STAGE_AXIS
from ir.errors import LayoutError
from passes.layouts import ATTN_LAYOUTS, FFN_LAYOUTS, Layout, dividing_prefix


@dataclass(frozen=True)
class PhaseReport:
    phase: str
    spec: Spec
    choice: Choice
    kv_fraction: float
    model: str = "calibrated"
    #: With a stage axis in the mesh: the same chips as S stages x tensor parallelism
    #: (compiler/cost/staging.py), priced beside the layouts.
    stages: tuple = ()
    #: Mixture of experts on a mesh: every choice of expert axes for the shown layout
    #: (compiler/cost/moe.py), and the one in force.
    experts: tuple = ()
    expert_axes: str = ""

    @property
    def shown(self) -> Candidate | None:
        """The layout the footer describes: the spec's (its non-auto fields), else auto's choice."""
        s = self.spec.serve
        if s.ffn == "auto" and s.attn == "auto":
            return self.choice.chosen
        match = [c for c in self.choice.candidates if c.legal and s.ffn in ("auto", c.ffn) and s.attn in ("auto", c.attn)]
        fitting = [c for c in match if c.fits]
        pick = fitting or match
        return pick[0] if pick else None

    def no_fit_reason(self) -> str:
        """Why nothing fits: the smallest candidate's memory against HBM."""
        legal = [c for c in self.choice.candidates if c.legal]
        if not legal:
            return "no candidate layout is legal"
        best = min(legal, key=lambda c: c.est.memory.total)
        m = best.est.memory
        return (f"no layout fits in HBM ({best.est.hbm_bytes / GiB:.3g} GiB per chip): the smallest, "
                f"{best.ffn}/{best.attn}, needs {m.total / GiB:.3g} GiB (weights {m.weights / GiB:.3g}, KV "
                f"{m.kv / GiB:.3g}, activations {m.activations / GiB:.3g}, prefetch {m.prefetch / GiB:.3g})")

    def max_context(self, c: Candidate | None) -> int | None:
        """The longest KV cache (positions) that fits beside the rest of the candidate's memory
        with the cache held to its ``kv_fraction`` of HBM; None where it cannot be priced."""
        if c is None or c.estimate is None:
            return None
        e = c.est
        per_position = e.memory.kv / self.spec.serve.seq
        if per_position <= 0:
            return None
        # the cache gets its share of HBM, and no more than what the rest leaves (0 if nothing)
        rest = e.memory.total - e.memory.kv
        budget = min(self.kv_fraction * e.hbm_bytes, e.hbm_bytes - rest)
        return max(0, int(budget // per_position))


def explain(spec: Spec, chip: Chip, phases: tuple[str, ...], kv_fraction: float = 0.5,
            model: str = "calibrated") -> list[PhaseReport]:
    out = []
    for ph in phases:
        s = replace(spec, serve=replace(spec.serve, phase=ph))
        out.append(PhaseReport(ph, s, evaluate(s, chip, FFN_LAYOUTS, ATTN_LAYOUTS, model=model), kv_fraction, model))
        if STAGE_AXIS in s.mesh.names:
            out[-1] = replace(out[-1], stages=tuple(stage_candidates(s, chip, model)))
        shown = out[-1].shown
        if s.model.moe and s.mesh.n_devices > 1 and shown is not None:
            rows = expert_rows(shown.spec, chip, model)
            axes = s.serve.expert_axes
            if axes == "auto":
                fit = [r for r in rows if r.candidate.legal and r.candidate.fits]
                axes = fit[0].axes if fit else ""
            out[-1] = replace(out[-1], experts=rows, expert_axes=axes)
    return out


def batch_note(spec: Spec, ffn: str, attn: str) -> str:
    """Why a layout may rank worse at this batch than at its neighbours: its batch sharding (the
    weight-gathered residual stream's, or the batch-sharded cache's) does not divide the batch,
    so part of it is replicated and each chip does more than its share. This is what makes the
    automatic choice non-monotonic in batch (PaLM 540B prefill: WG-XY at 64 and 80, WG-X at 72).
    With ``serve.pad`` (the default) a batch that no part of the axes could take is padded
    (:func:`pad_note` says so), and the note is about the padded batch."""
    try:
        lay = Layout(ffn, attn, inner_mesh(spec))  # the layouts apply inside a pipeline stage
    except LayoutError:
        return ""
    axes = lay.batch_axes() if lay.weights_move else (lay.prefer().get("B", ()) if attn == "batch" else ())
    n = math.prod(lay.sizes[a] for a in axes)
    b = padded_batch(spec, ffn, attn)
    if not axes or b % n == 0:
        return ""
    keep = dividing_prefix(b, axes, lay.sizes)
    k = math.prod(lay.sizes[a] for a in keep)
    return (f"batch {b} does not divide over {','.join(axes)} ({n} devices): sharded {k} ways"
            f"{' over ' + ','.join(keep) if keep else ''}, the rest replicated")


def padded_batch(spec: Spec, ffn: str, attn: str) -> int:
    """The batch the layout's program runs at (pad-dims may pad it; compiler/pipelines.py)."""
    from compiler.pipelines import dim_pad_options

    b = spec.serve.batch
    try:
        m = dim_pad_options(replace(spec, serve=replace(spec.serve, ffn=ffn, attn=attn))).get("batch", 1)
    except LayoutError:
        return b
    return -(-b // m) * m


def pad_note(spec: Spec, ffn: str, attn: str) -> str:
    """What the default pipeline zero-pads for this layout (``B 3 -> 8, E 62 -> 64``): the
    candidate's prices are those of the padded program, so this is the padding's overhead."""
    from compiler.cost.autolayout import resolve_kv
    from compiler.pipelines import padding, settle_kv

    cs = replace(spec, serve=replace(spec.serve, ffn=ffn, attn=attn))
    try:
        return ", ".join(padding(resolve_kv(settle_kv(cs))))
    except LayoutError:
        return ""


def _spec_layout(spec: Spec) -> tuple[str, str]:
    return spec.serve.ffn, spec.serve.attn


def _components(c: Components) -> dict:
    return {"compute_s": c.compute, "weight_load_s": c.weights, "kv_load_s": c.kv, "activation_s": c.activations,
            "comm_s": c.comm, "comm_exposed_s": c.comm_exposed, "overhead_s": c.overhead, "time_s": c.time,
            "flops": c.flops}


def candidate_json(r: PhaseReport, c: Candidate) -> dict:
    d: dict = {"phase": r.phase, "ffn": c.ffn, "attn": c.attn, "weights": r.spec.serve.weights,
               "legal": c.legal, "chosen": c is r.choice.chosen,
               "spec_layout": (c.ffn, c.attn) == _spec_layout(r.spec)}
    if not c.legal:
        d["illegal"] = c.illegal
        return d
    note = batch_note(r.spec, c.ffn, c.attn)
    if note:
        d["note"] = note
    padded = pad_note(r.spec, c.ffn, c.attn)
    if padded:
        d["padded"] = padded
    e: Estimate = c.est
    d.update(step_time_s=e.step_time_s, layer_time_s=e.per_layer.time, mfu=e.mfu,
             cost_chip_ms_per_token=e.cost_chip_ms_per_token, memory_per_chip_bytes=e.memory.total,
             memory={"weights": e.memory.weights, "kv_cache": e.memory.kv, "activations": e.memory.activations,
                     "prefetch": e.memory.prefetch, "activations_at": e.memory.activations_at},
             fits=e.fits, per_step=_components(e.per_step), per_layer=_components(e.per_layer),
             max_context=r.max_context(c))
    return d


def probe_json(chip: Chip, now: float | None = None) -> dict:
    """A measured chip's probe figures and provenance for ``--json`` (empty for a datasheet chip):
    when (UTC) and how long ago, and runtime/probe.py's account."""
    import time

    if not chip.measured_at:
        return {}
    t = time.time() if now is None else now
    return {"probe": {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(chip.measured_at)),
                      "age_s": max(0.0, t - chip.measured_at), "info": chip.probe_info,
                      "flops_f32": chip.peak("f32"), "op_overhead_s": chip.op_overhead_s}}


def to_json(spec: Spec, chip: Chip, reports: list[PhaseReport]) -> dict:
    first = next((c.estimate for r in reports for c in r.choice.candidates if c.estimate), None)
    by_phase = {r.phase: r.max_context(r.shown) for r in reports}
    main = by_phase.get("decode", next(iter(by_phase.values()), None))
    model = reports[0].model if reports else "calibrated"
    eff = efficiency_for(chip, model)
    return {
        "model": spec.model.name,
        "cost_model": model,
        "hardware": {"name": chip.name, "flops_bf16": chip.peak("bf16"), "hbm_bytes": chip.hbm_bytes,
                     "hbm_bw": chip.hbm_bw, "ici_bw": chip.ici_bw, "source": chip.source, **probe_json(chip),
                     "efficiency": {k: getattr(eff, k) for k in ("flops", "matmul_half", "hbm", "link",
                                                                 "step_latency_s", "layer_overhead_s", "source")}},
        "mesh": dict(spec.mesh.axes),
        "n_devices": spec.mesh.n_devices,
        "n_params": first.n_params if first else None,
        "layers": first.layers if first else None,
        "batch": spec.serve.batch,
        "seq": spec.serve.seq,
        "kv_fraction": reports[0].kv_fraction if reports else None,
        "chosen": {r.phase: ({"ffn": r.choice.chosen.ffn, "attn": r.choice.chosen.attn} if r.choice.chosen else None)
                   for r in reports},
        "shown": {r.phase: ({"ffn": r.shown.ffn, "attn": r.shown.attn} if r.shown else None) for r in reports},
        "no_fit": {r.phase: r.no_fit_reason() for r in reports if r.choice.chosen is None},
        "max_context": main,
        "max_context_by_phase": by_phase,
        "candidates": [candidate_json(r, c) for r in reports for c in r.choice.candidates],
        "pipeline_candidates": {r.phase: [stage_json(c) for c in r.stages] for r in reports if r.stages},
        "pipeline_chosen": {r.phase: getattr(fastest_stage(list(r.stages), r.phase), "label", None)
                            for r in reports if r.stages},
        "expert_layouts": {r.phase: rows_json(r.experts, r.expert_axes) for r in reports if r.experts},
    }


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else str(n)


def _sig(v: float, digits: int = 4) -> str:
    """``v`` in fixed notation with ``digits`` significant digits (whole numbers keep all of theirs),
    so that a column never mixes styles."""
    if v == 0 or not math.isfinite(v):
        return f"{v:.{digits - 1}f}" if v == 0 else str(v)
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
    return f"{v:.{decimals}f}"


def _ms(s: float) -> str:
    return _sig(s * 1e3)


def format_stages(cands: list[StageCandidate], phase: str) -> list[str]:
    """The pipeline candidates of one phase (compiler/cost/staging.py) as a table; ``*`` the stage
    count auto picks (the fastest that fits; decode by the schedule ``generate`` runs)."""
    if not cands:
        return []
    c0 = cands[0]
    lines = ["", f"{phase}: pipeline candidates ({c0.ffn}/{c0.attn} inside each stage; stage=1 is tensor "
             "parallelism over all chips); times in ms per step",
             f"    {'mesh':18}{'M':>4}{'steps':>6}{'bubble':>8}{'stage-step':>12}{'ppermute':>10}{'step':>11}"
             f"{'chip-ms/tok':>12}{'GiB/chip':>9}  fits" + (f"{'gen/tok':>9}" if phase == "decode" else "")]
    lines.append("  " + "-" * (len(lines[-1]) - 2))
    best = fastest_stage(cands, phase)
    for c in cands:
        mark = "*" if c is best else " "
        if c.estimate is None:
            lines.append(f"  {mark} {c.label:18} illegal: {c.illegal}")
            continue
        e = c.estimate
        lines.append(f"  {mark} {c.label:18}{c.microbatches:>4}{c.steps:>6}{100 * c.bubble:7.1f}%"
                     f"{_ms(c.stage_step_s):>12}{_ms(c.ppermute_s):>10}{_ms(e.step_time_s):>11}"
                     f"{_sig(e.cost_chip_ms_per_token):>12}{_sig(e.memory.total / 2**30):>9}  "
                     f"{'yes' if e.fits else 'no ':4}" + (f"{_ms(c.gen_token_s()):>8}" if phase == "decode" else ""))
    if phase == "decode":
        lines.append(f"  gen/tok: per token as `generate` runs decode on stages, one call of {GENERATE_TOKENS} tokens "
                     f"per row with the pipeline kept full across them ((K-1) max(M,S) + M + S - 1 stage steps, "
                     "each a stage body plus the embedding and head); step: one token per call (the serving "
                     "engine), filling and draining the pipeline every token")
    if best is not None:
        lines.append(f"  auto picks {best.label} (*): the fastest that fits, by "
                     f"{'gen/tok' if phase == 'decode' else 'step'}")
    return lines


def format_explain(spec: Spec, chip: Chip, reports: list[PhaseReport]) -> str:
    s = spec.serve
    mesh = ",".join(f"{a}={n}" for a, n in spec.mesh.axes) or "1"
    est = next((c.estimate for r in reports for c in r.choice.candidates if c.estimate), None)
    lines = [f"model      {spec.model.name}: {spec.model.layers} layers, {_count(est.n_params)} parameters "
             f"(nominal: MFU counts 2 x this per token), weights {s.weights}" if est else spec.model.name,
             f"hardware   {spec.mesh.n_devices} x {chip.describe()}",
             *([f"probe      {chip.probe_info}; `--reprobe` measures again"] if chip.probe_info else []),
             f"mesh       {mesh}",
             f"cost model {reports[0].model if reports else 'calibrated'}: "
             f"{efficiency_for(chip, reports[0].model if reports else 'calibrated').source}"
             + (" (no CPU fit stored for this machine: bench/cost_model_vs_measured.py --smollm2 fits one)"
                if chip.probe_info and chip.efficiency is None and (not reports or reports[0].model == "calibrated")
                else ""),
             "rule       per op max(compute, HBM traffic); collectives exposed, except looped ones (each chunk's "
             "transfer beside the previous chunk's einsum) and, with overlap on, weight gathers fetched ahead "
             "beside the compute; comm = exposed; components are sums over ops",
             f"overlap    {s.overlap}" + (" (nothing overlaps: the paper's analytical ranking; its measurements "
                                         "used looped collective einsums: --overlap looped)" if s.overlap == "none"
                                         else "")]
    for r in reports:
        ss = r.spec.serve
        tokens = ss.batch * (ss.seq if r.phase == "prefill" else 1)
        what = f"prompt {ss.seq}" if r.phase == "prefill" else f"context {ss.seq}"
        lines += ["", f"{r.phase}: batch {ss.batch}, {what} ({tokens} tokens per step); times in ms per step"]
        head = (f"  {'':1} {'ffn':7}{'attn':6}{'compute':>10}{'weights':>10}{'kv':>9}{'acts':>9}{'comm':>9}"
                f"{'step':>11}{'MFU':>7}{'chip-ms/tok':>12}{'GiB/chip':>9}  fits")
        lines += [head, "  " + "-" * (len(head) - 2)]
        for c in r.choice.candidates:
            mark = "*" if c is r.choice.chosen else ("s" if (c.ffn, c.attn) == _spec_layout(r.spec) else " ")
            if not c.legal:
                lines.append(f"  {mark} {c.ffn:7}{c.attn:6} illegal: {c.illegal}")
                continue
            e = c.est
            p = e.per_step
            lines.append(f"  {mark} {c.ffn:7}{c.attn:6}{_ms(p.compute):>10}{_ms(p.weights):>10}{_ms(p.kv):>9}"
                         f"{_ms(p.activations):>9}{_ms(p.comm_exposed):>9}{_ms(e.step_time_s):>11}"
                         f"{100 * e.mfu:6.1f}%{_sig(e.cost_chip_ms_per_token):>12}{_sig(e.memory.total / GiB):>9}  "
                         f"{'yes' if e.fits else 'no'}")
        notes = [(c, batch_note(r.spec, c.ffn, c.attn)) for c in r.choice.candidates if c.legal]
        for c, note in notes:
            if note:
                lines.append(f"  note {c.ffn}/{c.attn}: {note}")
        pads = [(c, pad_note(r.spec, c.ffn, c.attn)) for c in r.choice.candidates if c.legal]
        for c, padded in pads:
            if padded:
                lines.append(f"  padded {c.ffn}/{c.attn}: {padded}")
        if any(p for _, p in pads):
            lines.append("  padded dims hold zeros (pad-heads, pad-dims; --no-pad refuses instead); each layout is "
                         "priced as padded, so the overhead is in its times and memory above")
        blocked = [f"{c.ffn}/{c.attn}" for c in r.choice.candidates if not c.legal and "dim B=" in c.illegal]
        if blocked:
            lines.append(f"  {', '.join(blocked)}: illegal at batch {ss.batch}, which does not divide their batch "
                         "axes; they may win at nearby batches that do, so the choice is not monotonic in batch")
        if any(n for _, n in notes):
            lines.append("  a layout that replicates part of the batch does more per chip than at a batch that "
                         "divides, and can rank lower here than at nearby batches")
        if r.choice.chosen is None:
            lines.append(f"  {r.no_fit_reason()}")
        ch = r.shown
        if ch is None:
            continue
        e = ch.est
        lay = e.per_layer
        which = "chosen" if ch is r.choice.chosen else ("requested" if ch.fits else "requested (does not fit)")
        lines.append(f"  {which} {ch.ffn}/{ch.attn}: per layer {_ms(lay.time)} ms (compute {_ms(lay.compute)}, "
                     f"weights {_ms(lay.weights)}, kv {_ms(lay.kv)}, comm exposed {_ms(lay.comm_exposed)}); "
                     f"memory per chip {_sig(e.memory.weights / GiB)} GiB weights + {_sig(e.memory.kv / GiB)} KV + "
                     f"{_sig(e.memory.activations / GiB)} activations + {_sig(e.memory.prefetch / GiB)} prefetch of "
                     f"{e.hbm_bytes / GiB:g}")
        mc = r.max_context(ch)
        if mc is not None:
            lines.append(f"  max context at batch {ss.batch} with {100 * r.kv_fraction:g}% of HBM for the KV cache: "
                         f"{mc} tokens")
        lines += format_expert_rows(r.experts, r.expert_axes)
    for r in reports:
        lines += format_stages(list(r.stages), r.phase)
    return "\n".join(lines) + "\n"


__all__ = ["PhaseReport", "explain", "format_explain", "to_json", "FFN_LAYOUTS", "ATTN_LAYOUTS"]
