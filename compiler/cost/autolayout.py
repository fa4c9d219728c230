"""``ffn = auto`` / ``attn = auto``: compile every legal candidate, price it, keep the fastest
that fits.

Candidates are the FFN layouts x attention layouts the spec leaves open (a concrete field is
kept). Each is compiled by the real pipeline (compiler.pipelines: build, default pipeline), so
padding, fusion, int8 and overlap are priced as they are emitted. A candidate whose layout
raises LayoutError is illegal and listed with the reason. Among the candidates that fit in HBM
the fastest step wins; ties (equal step times) go to the smaller memory per chip, then to the
earlier layout in the order of passes/layouts.py (1d-ws, 2d-ws, wg-x, wg-xy, wg-xyz; heads,
batch). No layout rule is written here: the choice comes from the cost model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from compiler.cost.efficiency import efficiency_for
from compiler.cost.hardware import Chip, get_chip
from compiler.cost.model import Estimate, nominal_params, price
from compiler.pipelines import build_for, compile_config, compile_module, default_pipeline, settle_kv
from compiler.spec import Spec
from ir.errors import CostError, LayoutError
from ir.module import Module
from passes.layouts import ATTN_LAYOUTS, FFN_LAYOUTS


@dataclass(frozen=True)
class Candidate:
    ffn: str
    attn: str
    spec: Spec
    estimate: Estimate | None  # None when illegal
    illegal: str = ""  # the LayoutError message
    module: Module | None = None

    @property
    def legal(self) -> bool:
        return self.estimate is not None

    @property
    def est(self) -> Estimate:
        """The estimate of a legal candidate (an illegal one has none: check ``legal`` first)."""
        if self.estimate is None:
            raise CostError(f"{self.ffn}/{self.attn} is illegal and has no estimate: {self.illegal}")
        return self.estimate

    @property
    def fits(self) -> bool:
        return self.estimate is not None and self.estimate.fits

    def key(self) -> tuple:
        e = self.est
        return (e.step_time_s, e.memory.total, FFN_LAYOUTS.index(self.ffn), ATTN_LAYOUTS.index(self.attn))


@dataclass(frozen=True)
class Choice:
    """The result of evaluating a spec's candidates: all of them, ranked, and the winner."""

    chip: Chip
    candidates: tuple[Candidate, ...]  # legal ones ranked best first, then the illegal ones
    chosen: Candidate | None  # None when nothing fits

    def report(self, limit: int = 4) -> list[str]:
        """Lines for --pass-stats: the choice, its runners-up, and the illegal candidates."""
        legal = [c for c in self.candidates if c.legal]
        shown = legal[:limit] + [c for c in legal[limit:] if c is self.chosen]
        lines = [f"auto layout on {self.chip.name}: {len(legal)} legal of {len(self.candidates)} candidates, "
                 "the fastest that fits wins"]
        for c in shown:
            e = c.est
            mark = "chosen" if c is self.chosen else ("does not fit" if not c.fits else "")
            lines.append(f"  {c.ffn:7} {c.attn:6} {e.step_time_s * 1e3:12.4f} ms/step  "
                         f"{e.memory.total / 2**30:8.2f} GiB/chip  {mark}".rstrip())
        if len(legal) > len(shown):
            lines.append(f"  ... {len(legal) - len(shown)} slower")
        for c in self.candidates:
            if not c.legal:
                lines.append(f"  {c.ffn:7} {c.attn:6} illegal: {c.illegal}")
        return lines


def open_fields(spec: Spec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The FFN and attention layouts left to try: every one for an ``auto`` field, else the spec's."""
    s = spec.serve
    ffns = FFN_LAYOUTS if s.ffn == "auto" else (s.ffn,)
    attns = ATTN_LAYOUTS if s.attn == "auto" else (s.attn,)
    return ffns, attns


def _compile(spec: Spec) -> tuple[Module, int]:
    """A candidate's program (``kv = auto`` decided first) and its nominal parameter count."""
    spec = resolve_kv(settle_kv(spec))
    m0 = build_for(spec, compile_config(spec))
    return compile_module(m0, default_pipeline(spec)).module, nominal_params(m0)


def evaluate(spec: Spec, chip: Chip, ffns: tuple[str, ...] | None = None,
             attns: tuple[str, ...] | None = None, keep_modules: bool = False, model: str = "calibrated") -> Choice:
    """Compiles and prices every (ffn, attn) candidate of ``spec`` (all of them by default) with
    the ``calibrated`` or ``bound`` cost model (compiler/cost/efficiency.py)."""
    eff = efficiency_for(chip, model)
    f0, a0 = open_fields(spec)
    ffns, attns = ffns or f0, attns or a0
    legal, illegal = [], []
    for ffn in ffns:
        for attn in attns:
            cs = replace(spec, serve=replace(spec.serve, ffn=ffn, attn=attn))
            try:
                m, n = _compile(cs)
            except LayoutError as e:
                illegal.append(Candidate(ffn, attn, cs, None, e.message))
                continue
            legal.append(Candidate(ffn, attn, cs, price(m, chip, n, eff, spec.serve.overlap),
                                   module=m if keep_modules else None))
    legal.sort(key=Candidate.key)
    fitting = [c for c in legal if c.fits]
    return Choice(chip, tuple(legal + illegal), fitting[0] if fitting else None)


@lru_cache(maxsize=64)
def _resolve(spec: Spec, chip: Chip, model: str = "calibrated") -> tuple[Spec, Choice]:
    choice = evaluate(spec, chip, model=model)
    if choice.chosen is None:
        legal = [c for c in choice.candidates if c.legal]
        if not legal:
            reasons = "; ".join(f"{c.ffn}/{c.attn}: {c.illegal}" for c in choice.candidates)
            raise CostError(f"no candidate layout is legal for this model and mesh ({reasons})")
        best = min(legal, key=lambda c: c.est.memory.total)
        m = best.est.memory
        raise CostError(
            f"no candidate layout fits in {chip.name}'s HBM ({chip.hbm_bytes / 2**30:g} GiB per chip); the smallest, "
            f"{best.ffn}/{best.attn}, needs {m.total / 2**30:.2f} GiB (weights {m.weights / 2**30:.2f}, "
            f"KV cache {m.kv / 2**30:.2f}, activations {m.activations / 2**30:.2f}, largest at {m.activations_at})",
            hint="use more chips (--mesh), a smaller batch or context, or int8 weights")
    c = choice.chosen
    return replace(spec, serve=replace(spec.serve, ffn=c.ffn, attn=c.attn)), choice


KV_CANDIDATES = ("shard", "replicate", "pad")


@lru_cache(maxsize=64)
def _resolve_kv(spec: Spec, chip: Chip) -> Spec:
    priced, error = [], None
    for i, kv in enumerate(KV_CANDIDATES):
        cs = replace(spec, serve=replace(spec.serve, kv=kv))
        try:
            m, n = _compile(cs)
        except LayoutError as e:
            error = e  # the last is pad's: a dim that no head padding resolves
            continue
        est = price(m, chip, n, efficiency_for(chip.name), spec.serve.overlap)  # as evaluate prices
        priced.append(((not est.fits, est.step_time_s, est.memory.total, i), cs))
    if not priced:
        assert error is not None
        raise error
    return min(priced, key=lambda c: c[0])[1]


def resolve_kv(spec: Spec, chip: Chip | None = None) -> Spec:
    """``kv = auto``: the grouped-query heads sharded (K over a prefix of the head axes, G over
    the rest), replicated (G over all of them) or padded, whichever legal candidate the cost
    model prices fastest among those that fit (ties: that order)."""
    if spec.serve.kv != "auto":
        return spec
    return _resolve_kv(spec, chip or get_chip(spec.serve.hardware))


def resolve_auto(spec: Spec, chip: Chip | None = None, model: str = "calibrated") -> tuple[Spec, Choice | None]:
    """The spec with ``auto`` layouts replaced by the cost model's choice, and the evaluation
    (None when nothing was auto). CostError when no candidate fits."""
    if spec.serve.ffn != "auto" and spec.serve.attn != "auto":
        return spec, None
    return _resolve(spec, chip or get_chip(spec.serve.hardware), model)
