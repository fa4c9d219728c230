"""Pipeline candidates for ``explain``: the same chips as S pipeline stages x tensor parallelism.

For a spec whose mesh has a ``stage`` axis, every stage count S that divides the chips (up to
the layer count and at most 8) is compiled with the spec's layout inside each stage (Megatron's
1d-ws/heads when the spec leaves it to ``auto``, which is what FasterTransformer runs) and priced
by the cost model: the schedule (micro-batches M, M + S - 1 steps, bubble fraction (S - 1) /
(M + S - 1) of every chip's time), one stage's time per step, the ppermute between stages (over
the host links when stages span hosts: hardware.py ``crosses_hosts``), the whole step, memory,
and for decode the time per token of the schedule ``generate`` runs (``gen_token_s``): one call
that makes K tokens per row with the pipeline kept full across them (``pipeline_generate``,
passes/pipeline_generate.py), (K - 1) max(M, S) + M + S - 1 stage steps, each a stage body
plus the embedding and the head, which every stage runs (SPMD) while stage 0's result is kept.
S = 1 is plain tensor parallelism over all the chips, priced the same way beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from compiler.cost.autolayout import resolve_kv
from compiler.cost.efficiency import efficiency_for
from compiler.cost.hardware import Chip
from compiler.cost.model import Estimate, nominal_params, price
from compiler.pipelines import build_for, compile_config, compile_module, default_pipeline, settle_kv
from compiler.spec import MeshSpec, Spec
from compiler.stages import inner_mesh
from ir.errors import LayoutError
from ir.module import Module
from ir.pipeline_ops import Pipeline, generate_steps
from passes.ledger import repeats_of
from passes.pipeline_stages import STAGE_AXIS

#: Largest stage count explain lists (more stages than this only add bubbles at these scales).
MAX_STAGES = 8
#: Tokens per row of the ``generate`` call explain prices decode on stages at (the CLI's default
#: ``--new-tokens``): the fill and drain of the pipeline are paid once per call.
GENERATE_TOKENS = 64


@dataclass(frozen=True)
class StageCandidate:
    mesh: tuple[tuple[str, int], ...]
    ffn: str
    attn: str
    stages: int
    microbatches: int  # of this phase (1 without stages)
    estimate: Estimate | None
    stage_step_s: float = 0.0  # one stage's body once (its layers on one micro-batch, then the ppermute)
    ppermute_s: float = 0.0  # all the step's ppermutes on one chip
    illegal: str = ""
    head_s: float = 0.0  # the embedding, final norm, logits and their collectives once (one micro-batch each)

    @property
    def steps(self) -> int:
        return self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """Fraction of every chip's schedule spent on steps without a real micro-batch."""
        return (self.stages - 1) / self.steps

    def gen_steps(self, tokens: int = GENERATE_TOKENS) -> int:
        """Stage steps of ``generate``'s call that makes ``tokens`` tokens per row."""
        return generate_steps(tokens, self.microbatches, self.stages)

    def gen_token_s(self, tokens: int = GENERATE_TOKENS) -> float:
        """Decode time per token (every row) as ``generate`` runs it on stages: one call of
        :meth:`gen_steps` steps, each a stage body and, on every stage, the embedding and head
        (DeepSpeed's generation schedule: a micro-batch's next token enters stage 0 as its last
        one leaves the last stage). Without stages, the one-token step."""
        if self.estimate is None:
            return 0.0
        if self.stages == 1:
            return self.estimate.step_time_s
        return self.gen_steps(tokens) * (self.stage_step_s + self.head_s) / tokens

    def gen_bubble(self, tokens: int = GENERATE_TOKENS) -> float:
        """Fraction of the K-token call's stage steps without a real micro-batch."""
        return 1 - tokens * self.microbatches / self.gen_steps(tokens)

    @property
    def label(self) -> str:
        return ",".join(f"{a}={n}" for a, n in self.mesh)


def stage_meshes(spec: Spec) -> list[tuple[tuple[str, int], ...]]:
    """S x (the chips of one stage) for the stage counts S explain lists: the spec's inner axes
    when they hold n / S chips, else one axis x."""
    n, inner = spec.mesh.n_devices, inner_mesh(spec)
    inner_n = MeshSpec(inner).n_devices
    out = []
    for s in range(1, min(n, spec.model.layers, MAX_STAGES) + 1):
        if n % s:
            continue
        rest = inner if inner_n == n // s else (("x", n // s),)
        out.append(((STAGE_AXIS, s), *rest) if s > 1 else rest)
    return out


def schedule_of(module: Module, entry: str) -> tuple[int, int]:
    """(stages, micro-batches) of ``entry``'s pipeline, (1, 1) without one."""
    for op in module.function(entry).ops:
        if isinstance(op, Pipeline):
            return module.mesh_sizes[op.axis], op.microbatches
    return 1, 1


def head_seconds(module: Module, est: Estimate) -> float:
    """The entry's own ops once, but the all_reduce that hands the last stage's activations to
    every stage: the embedding, final norm, logits and their collectives of one call. The
    generation schedule runs them every step on one micro-batch; at decode batches they are
    bound by reading the output embedding, which does not shrink with the rows, so the whole
    batch's time is the price (an upper bound)."""
    entry = module.entries[0]
    handoff = {op.result for op in entry.ops if op.kind == "all_reduce" and STAGE_AXIS in op.axes}
    return sum(o.time_s for o in est.ops if o.function == entry.name and o.value not in handoff)


def generation_call_s(module: Module, est: Estimate, tokens: int) -> float:
    """Seconds of ``generate``'s call that makes ``tokens`` tokens per row on stages, from the
    priced one-token decode module: its schedule's steps, each a stage body plus the head."""
    stages, m = schedule_of(module, module.entries[0].name)
    return generate_steps(tokens, m, stages) * (price_stages(module, est)[0] + head_seconds(module, est))


def price_stages(module: Module, est: Estimate) -> tuple[float, float]:
    """(one stage-body call's time, all ppermutes of a step) on one chip."""
    reps = repeats_of(module)
    entry = module.entries[0].name
    stages, m = schedule_of(module, entry)
    steps = m + stages - 1
    body = sum(o.time_s * reps.get(o.function, 1) for o in est.ops if o.function != entry)
    perm = sum(o.comm_s * reps.get(o.function, 1) for o in est.ops if o.kind == "ppermute")
    return body / steps, perm


def stage_candidates(spec: Spec, chip: Chip, model: str = "calibrated") -> list[StageCandidate]:
    """The pipeline candidates of ``spec`` for its phase (see the module docstring)."""
    s = spec.serve
    ffn = s.ffn if s.ffn != "auto" else "1d-ws"
    attn = s.attn if s.attn != "auto" else "heads"
    eff = efficiency_for(chip, model)
    out = []
    for mesh in stage_meshes(spec):
        cs = replace(spec, mesh=MeshSpec(mesh), serve=replace(s, ffn=ffn, attn=attn))
        stages = dict(mesh).get(STAGE_AXIS, 1)
        try:
            cs = resolve_kv(settle_kv(cs), chip)
            m0 = build_for(cs, compile_config(cs))
            module = compile_module(m0, default_pipeline(cs)).module
        except LayoutError as e:
            out.append(StageCandidate(mesh, ffn, attn, stages, 1, None, illegal=e.message))
            continue
        est = price(module, chip, nominal_params(m0), eff, s.overlap)
        stage_s, perm_s = price_stages(module, est)
        out.append(StageCandidate(mesh, ffn, attn, stages, schedule_of(module, module.entries[0].name)[1], est,
                                  stage_s, perm_s, head_s=head_seconds(module, est) if stages > 1 else 0.0))
    return out


def fastest_stage(cands: list[StageCandidate], phase: str = "prefill") -> StageCandidate | None:
    """The stage count ``auto`` picks: the fastest candidate that fits, by the step for prefill and
    for decode by the time per token of the schedule ``generate`` runs (:meth:`gen_token_s`)."""
    def time(c: StageCandidate) -> float:
        assert c.estimate is not None
        return c.gen_token_s() if phase == "decode" else c.estimate.step_time_s

    fitting = [(time(c), i) for i, c in enumerate(cands) if c.estimate is not None and c.estimate.fits]
    return cands[min(fitting)[1]] if fitting else None


def stage_json(c: StageCandidate) -> dict:
    d: dict = {"mesh": dict(c.mesh), "ffn": c.ffn, "attn": c.attn, "stages": c.stages, "legal": c.estimate is not None}
    if c.estimate is None:
        d["illegal"] = c.illegal
        return d
    e = c.estimate
    d.update(microbatches=c.microbatches, steps=c.steps, bubble=c.bubble, stage_step_s=c.stage_step_s,
             generate_tokens=GENERATE_TOKENS, generate_steps=c.gen_steps(), generate_token_s=c.gen_token_s(),
             ppermute_s=c.ppermute_s, step_time_s=e.step_time_s, cost_chip_ms_per_token=e.cost_chip_ms_per_token,
             memory_per_chip_bytes=e.memory.total, fits=e.fits)
    return d
