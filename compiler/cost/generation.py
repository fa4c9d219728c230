"""``einshard explain --phase generate``: one whole request batch, as the paper's appendix
benchmarks measure it: prefill of P prompt tokens, then G decode steps with the context growing
from P to P + G, each phase with its own automatic layout, and the reshard between them.

* **Prefill** is one step of the prefill entry at ``seq = P``, its layout chosen by ``auto``
  (or the spec's, when it names one).
* **Decode** is G steps. A step's cost is affine in its context T (the KV cache it reads, the
  attention FLOPs) while the weights and collectives do not depend on T, so the G steps sum to
  G x the mean of the steps at T = P + 1 and T = P + G (exact for an affine cost; the per-op
  max of the roofline makes it convex, so the mean of the ends is an upper bound). The layout
  is chosen where the cache is largest (T = P + G), the context it must fit.
* **On pipeline stages** decode is the one call ``generate`` makes: G tokens per row with the
  pipeline kept full across them (compiler/cost/staging.py ``generation_call_s``), priced at
  T = P + G (the cache the call is compiled for).
* **Reshard** between the phases: the paper stores the weights of 2D weight-stationary and of
  every weight-gathered layout alike (E over X, F / heads over YZ), so switching between them
  moves no weights; 1D-WS stores them otherwise, and switching to or from it moves all of a
  chip's weights. The KV cache written by the prefill moves when its layout changes (another
  attention sharding, or another FFN layout under batch-sharded attention, whose batch axes
  follow the FFN). Moved bytes go at the link bandwidth (one all-to-all each).

MFU follows the paper (2 x nominal params FLOPs per token at peak): per phase over its own
tokens (B x P, B x G) and over the whole request (B x (P + G) tokens in ``total_s``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from compiler.cost.autolayout import Candidate, evaluate
from compiler.cost.efficiency import efficiency_for
from compiler.cost.hardware import Chip
from compiler.cost.staging import generation_call_s, schedule_of
from compiler.spec import Spec
from passes.pipeline_stages import STAGE_AXIS
from ir.errors import CostError, SpecError


@dataclass(frozen=True)
class PhaseChoice:
    ffn: str
    attn: str
    step_s: float  # prefill: the pass; decode: the mean step
    memory_bytes: int  # per chip
    fits: bool


@dataclass(frozen=True)
class GenerationEstimate:
    batch: int
    prompt_len: int
    new_tokens: int
    n_devices: int
    n_params: int
    peak_flops: float
    prefill: PhaseChoice
    decode: PhaseChoice | None  # None when no tokens are generated
    prefill_s: float
    decode_s: float
    reshard_s: float
    cost_model: str

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.reshard_s + self.decode_s

    def _mfu(self, tokens: int, seconds: float) -> float:
        ideal = 2.0 * self.n_params * tokens / (self.n_devices * self.peak_flops)
        return ideal / seconds if seconds > 0 else 0.0

    @property
    def mfu_prefill(self) -> float:
        return self._mfu(self.batch * self.prompt_len, self.prefill_s)

    @property
    def mfu_decode(self) -> float:
        return self._mfu(self.batch * self.new_tokens, self.decode_s)

    @property
    def mfu_total(self) -> float:
        return self._mfu(self.batch * (self.prompt_len + self.new_tokens), self.total_s)

    @property
    def cost_chip_ms_per_token(self) -> float:
        """Chip-milliseconds per generated token, the whole request (prefill included) charged."""
        return 1e3 * self.n_devices * self.total_s / (self.batch * max(self.new_tokens, 1))

    def to_json(self) -> dict:
        def phase(p: PhaseChoice | None) -> dict | None:
            return None if p is None else {"ffn": p.ffn, "attn": p.attn, "step_s": p.step_s,
                                           "memory_per_chip_bytes": p.memory_bytes, "fits": p.fits}

        return {"phase": "generate", "cost_model": self.cost_model, "batch": self.batch,
                "prompt_len": self.prompt_len, "new_tokens": self.new_tokens, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "reshard_s": self.reshard_s, "total_s": self.total_s,
                "mfu_prefill": self.mfu_prefill, "mfu_decode": self.mfu_decode, "mfu_total": self.mfu_total,
                "cost_chip_ms_per_token": self.cost_chip_ms_per_token,
                "layout": {"prefill": phase(self.prefill), "decode": phase(self.decode)}}


def _pick(spec: Spec, chip: Chip, model: str, ffn: str | None = None, attn: str | None = None) -> Candidate:
    """The spec's layout (its non-auto fields) or auto's: the fastest candidate that fits."""
    s = spec.serve
    ffns = (ffn,) if ffn else None
    attns = (attn,) if attn else None
    choice = evaluate(spec, chip, ffns, attns, model=model)
    legal = [c for c in choice.candidates if c.legal]
    if not legal:
        reasons = "; ".join(f"{c.ffn}/{c.attn}: {c.illegal}" for c in choice.candidates)
        raise CostError(f"{s.phase}: no candidate layout is legal ({reasons})")
    return choice.chosen or min(legal, key=lambda c: c.est.memory.total)


def _weights_storage(ffn: str) -> str:
    return "1d" if ffn == "1d-ws" else "2d"  # 2D-WS and the weight-gathered layouts share E_x F_yz


def reshard_seconds(chip: Chip, model: str, pre: Candidate, dec: Candidate) -> float:
    """Moving the weights and the prompt's KV cache from the prefill's layout to the decode's."""
    moved = 0.0
    if _weights_storage(pre.ffn) != _weights_storage(dec.ffn):
        moved += pre.est.memory.weights
    if pre.attn != dec.attn or (pre.attn == "batch" and pre.ffn != dec.ffn):
        moved += pre.est.memory.kv
    return moved / (chip.ici_bw * efficiency_for(chip, model).link) if moved else 0.0


def estimate_generation(spec: Spec, chip: Chip, prompt_len: int, new_tokens: int,
                        model: str = "calibrated") -> GenerationEstimate:
    """Prices one request batch of ``spec.serve.batch`` sequences (see the module docstring)."""
    if prompt_len < 1:
        raise SpecError(f"--prompt-len must be >= 1, got {prompt_len}")
    if new_tokens < 0:
        raise SpecError(f"--new-tokens must be >= 0, got {new_tokens}")
    s = spec.serve
    given = (None if s.ffn == "auto" else s.ffn, None if s.attn == "auto" else s.attn)
    pre_spec = replace(spec, serve=replace(s, phase="prefill", seq=prompt_len))
    pre = _pick(pre_spec, chip, model, *given)
    pe = pre.est
    prefill = PhaseChoice(pre.ffn, pre.attn, pe.step_time_s, pe.memory.total, pe.fits)
    if new_tokens == 0:
        return GenerationEstimate(s.batch, prompt_len, 0, pe.n_devices, pe.n_params, pe.peak_flops, prefill, None,
                                  pe.step_time_s, 0.0, 0.0, model)
    end = replace(spec, serve=replace(s, phase="decode", seq=prompt_len + new_tokens))
    dec = _pick(end, chip, model, *given)
    start = replace(spec, serve=replace(s, phase="decode", seq=prompt_len + 1))
    first = evaluate(start, chip, (dec.ffn,), (dec.attn,), model=model).candidates[0]
    if first.estimate is None:
        raise CostError(f"decode at context {prompt_len + 1}: {dec.ffn}/{dec.attn} is illegal: {first.illegal}")
    mean_step = (first.est.step_time_s + dec.est.step_time_s) / 2
    de = dec.est
    decode_s = new_tokens * mean_step
    if STAGE_AXIS in spec.mesh.names:
        # on stages `generate` makes the tokens in one call, the pipeline kept full across them
        kept = evaluate(end, chip, (dec.ffn,), (dec.attn,), keep_modules=True, model=model).candidates[0]
        if kept.module is not None and schedule_of(kept.module, "decode")[0] > 1:
            decode_s = generation_call_s(kept.module, kept.est, new_tokens)
            mean_step = decode_s / new_tokens
    decode = PhaseChoice(dec.ffn, dec.attn, mean_step, de.memory.total, de.fits)
    return GenerationEstimate(s.batch, prompt_len, new_tokens, pe.n_devices, pe.n_params, pe.peak_flops, prefill,
                              decode, pe.step_time_s, decode_s, reshard_seconds(chip, model, pre, dec),
                              model)


def format_generation(spec: Spec, chip: Chip, g: GenerationEstimate) -> str:
    from compiler.cost.explain import _ms, _sig

    lines = [f"model      {spec.model.name}: {spec.model.layers} layers, weights {spec.serve.weights}",
             f"hardware   {g.n_devices} x {chip.describe()}",
             *([f"probe      {chip.probe_info}; `--reprobe` measures again"] if chip.probe_info else []),
             f"cost model {g.cost_model}: {efficiency_for(chip, g.cost_model).source}",
             f"generate   batch {g.batch}: prompt {g.prompt_len} tokens, then {g.new_tokens} new tokens "
             f"(context {g.prompt_len} -> {g.prompt_len + g.new_tokens})", ""]
    lines.append(f"  {'phase':8}{'layout':14}{'time ms':>10}{'MFU':>8}{'GiB/chip':>10}  fits")
    rows = [("prefill", g.prefill, g.prefill_s, g.mfu_prefill)]
    if g.decode is not None:
        rows.append(("decode", g.decode, g.decode_s, g.mfu_decode))
    for name, p, t, mfu in rows:
        lines.append(f"  {name:8}{p.ffn + '/' + p.attn:14}{_ms(t):>10}{100 * mfu:7.1f}%"
                     f"{_sig(p.memory_bytes / 2**30):>10}  {'yes' if p.fits else 'no'}")
    lines.append(f"  {'reshard':8}{'':14}{_ms(g.reshard_s):>10}")
    lines.append(f"  {'total':8}{'':14}{_ms(g.total_s):>10}{100 * g.mfu_total:7.1f}%")
    if g.decode is not None:
        lines.append(f"  decode: {_ms(g.decode.step_s)} ms per step on average; "
                     f"{_sig(g.cost_chip_ms_per_token)} chip-ms per generated token (prefill included)")
    return "\n".join(lines) + "\n"


__all__ = ["GenerationEstimate", "PhaseChoice", "estimate_generation", "format_generation", "reshard_seconds"]
