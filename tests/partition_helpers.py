"""Shared pieces of the partitioning tests (test_partition_*.py, test_hlo.py, test_layout_errors.py, ...).

The important one is :func:`expected_layout_problems`: an oracle, written from the layout
definitions of reference/partitioning.md §5–§6 (and the roles documented in passes/layouts.py),
that predicts *independently of the compiler's code* which (dim, mesh axes) pairs of a model,
batch, mesh and layout cannot be split evenly. Tests use it both ways: a predicted problem must
surface as a LayoutError naming that dim, size and axes; no predicted problem means the layout
must compile and compute the reference's logits. Nothing is filtered silently.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from hypothesis import event as _event
from hypothesis import note as _note
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from compiler.build import BuildConfig, build_module
from compiler.driver import compile_module, default_pipeline
from compiler.spec import MeshSpec, ModelSpec, ServeSpec, Spec
from ir.errors import LayoutError
from ir.module import Module
from passes.layouts import ATTN_LAYOUTS, FFN_LAYOUTS  # the one list of layout names

COLLECTIVE_KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")

Mesh = tuple[tuple[str, int], ...]

#: Meshes of up to 8 devices in 1-3 axes (the 8-device ones fit the simulated CPU devices).
MESHES: tuple[Mesh, ...] = (
    (("x", 2),),
    (("x", 4),),
    (("x", 8),),
    (("x", 2), ("y", 2)),
    (("x", 2), ("y", 4)),
    (("x", 4), ("y", 2)),
    (("x", 2), ("y", 2), ("z", 2)),
    (("x", 4), ("y", 1), ("z", 2)),  # a size-1 middle axis
)
MESH_8 = (("x", 2), ("y", 2), ("z", 2))


def n_devices(mesh: Mesh) -> int:
    return math.prod(s for _, s in mesh)


def mesh_str(mesh: Mesh) -> str:
    return ",".join(f"{a}={s}" for a, s in mesh)


# ---- the layout oracle ------------------------------------------------------------------------


def roles(mesh: Mesh) -> dict[str, tuple[str, ...]]:
    """Paper roles X, Y, Z = the mesh's axes in order (missing roles are empty)."""
    names = [a for a, _ in mesh]
    return {r: ((names[i],) if i < len(names) else ()) for i, r in enumerate("XYZ")}


def layout_axes(mesh: Mesh, ffn: str) -> dict[str, tuple[str, ...]]:
    """Where the paper's layouts put things (§5.1, §5.2, §5.4, §6; reference §13):

    * ``wide``: the axes of F and the heads in the weights. 1D-WS splits them over all chips
      (``E F_xyz``); 2D-WS and the weight-gathered layouts share one storage, ``E_x F_yz``.
    * ``narrow``: the axes of E in the weights (none for 1D, X otherwise).
    * ``batch``: the residual stream's batch axes at rest (X-WG ``B_x``, XY-WG ``B_xy``,
      XYZ-WG ``B_xyz``, none for weight-stationary).
    * ``rest_e``: the residual stream's E axes at rest: every axis not used by the batch.
    """
    r = roles(mesh)
    all_axes = tuple(a for a, _ in mesh)
    wide = all_axes if ffn == "1d-ws" else r["Z"] + r["Y"]
    narrow = () if ffn == "1d-ws" else r["X"]
    batch = {"wg-x": r["X"], "wg-xy": r["X"] + r["Y"], "wg-xyz": all_axes}.get(ffn, ())
    return {"wide": wide, "narrow": narrow, "batch": batch, "rest_e": tuple(a for a in all_axes if a not in batch),
            "all": all_axes}


@dataclass(frozen=True)
class Problem:
    dim: str
    size: int
    axes: frozenset[str]
    what: str


def head_devices(mesh: Mesh, ffn: str, attn: str) -> int:
    """Devices the default pipeline makes the heads divide: the wide weight axes (all of them
    in 1D), under either attention layout (under attn=heads Q's partial sums land elsewhere
    when the heads do not divide every device, and the scores einsum gathers them)."""
    return math.prod(dict(mesh)[a] for a in layout_axes(mesh, ffn)["wide"])


def grouped_split(mesh: Mesh, ffn: str, K: int, kv: str, split: tuple[str, int] | None = None
                  ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Grouped-query heads K x G jointly over the wide axes: K over the longest prefix of them
    that K divides (none when the K/V heads are replicated), the query groups G over the rest.
    ``split`` = (axis, g): attn=batch divided that axis into a major part of g devices and a
    minor one (``<axis>_1``), which the prefix may cut between (:func:`batch_split`)."""
    wide, sizes = layout_axes(mesh, ffn)["wide"], dict(mesh)
    if split and split[0] in wide:
        a, g = split
        sub = f"{a}_1"
        wide = tuple(x for w in wide for x in ((a, sub) if w == a else (w,)))
        sizes = {**sizes, a: g, sub: dict(mesh)[a] // g}
    i = 0 if kv == "replicate" else max(j for j in range(len(wide) + 1)
                                        if K % math.prod(sizes[a] for a in wide[:j]) == 0)
    return wide[:i], wide[i:]


def batch_split(mesh: Mesh, ffn: str, attn: str, batch: int, pad: bool) -> tuple[str, int] | None:
    """attn=batch in a weight-stationary layout: a batch (after padding, with ``pad``: to a
    multiple of the smallest factor of the axis when it shares none with it) that shares only
    part of the first cache axis's size divides that axis into sub-axes, g = gcd devices major."""
    ax, sizes = layout_axes(mesh, ffn), dict(mesh)
    if attn != "batch" or ax["batch"] or n_devices(mesh) == 1:
        return None
    a = (ax["wide"] + ax["narrow"])[0]
    size = sizes[a]
    if pad and math.gcd(batch, size) == 1 and size > 1:
        p = next(q for q in range(2, size + 1) if size % q == 0)
        batch = -(-batch // p) * p
    g = math.gcd(batch, size)
    return None if g in (1, size) else (a, g)


def padded_grouped(mesh: Mesh, ffn: str, K: int, G: int) -> tuple[int, int]:
    """kv=pad: the fewest query + K/V heads K' x G' + K' (K' >= K, G' >= G) such that some cut of
    the wide axes into a prefix and the rest has K' over the prefix and G' over the rest
    (ties: K over more axes)."""
    wide, sizes = layout_axes(mesh, ffn)["wide"], dict(mesh)
    options = []
    for i in range(len(wide) + 1):
        nk, ng = math.prod(sizes[a] for a in wide[:i]), math.prod(sizes[a] for a in wide[i:])
        k, g = -(-K // nk) * nk, -(-G // ng) * ng
        options.append((k * g + k, -i, k, g))
    return min(options)[2:]


def padded_heads(model: ModelSpec, mesh: Mesh, ffn: str, attn: str, pad: bool, kv: str = "shard") -> int:
    """Query heads after the default pipeline's pad-heads: H up to a multiple of
    :func:`head_devices`; grouped-query K x G as :func:`padded_grouped` says under kv=pad."""
    if not pad and kv != "pad":
        return model.heads
    if model.attention == "grouped":
        if kv != "pad" or n_devices(mesh) == 1:
            return model.heads
        k, g = padded_grouped(mesh, ffn, model.kv_heads, model.heads // model.kv_heads)
        return k * g
    k = head_devices(mesh, ffn, attn)
    if model.heads % k and n_devices(mesh) > 1:
        return -(-model.heads // k) * k
    return model.heads


def expected_layout_problems(model: ModelSpec, batch: int, mesh: Mesh, ffn: str, attn: str,
                             pad: bool = False, kv: str = "shard") -> list[Problem]:
    """Every (dim, axes) split that the layout needs and that does not divide. With ``pad`` (the
    default pipeline) d_ff, d_model and the batch are zero-padded until they divide (pad-dims),
    so only the heads' rules remain."""
    if n_devices(mesh) == 1:
        return []
    sizes = dict(mesh)
    ax = layout_axes(mesh, ffn)

    def k(axes: tuple[str, ...]) -> int:
        return math.prod(sizes[a] for a in axes)

    out: list[Problem] = []

    def need(dim: str, size: int, axes: tuple[str, ...], what: str) -> None:
        if pad and dim in "EFB":
            return  # pad-dims pads them
        if axes and size % k(axes):
            out.append(Problem(dim, size, frozenset(axes), what))

    heads = padded_heads(model, mesh, ffn, attn, pad, kv)
    E, F = model.d_model, model.d_ff
    # weights: E over narrow (every matrix has E), F over wide
    need("E", E, ax["narrow"], "weights")
    need("F", F, ax["wide"], "weights")
    # attention weights and the KV cache
    if model.attention == "grouped":
        K, G = model.kv_heads, model.heads // model.kv_heads
        if kv == "pad":
            K, G = padded_grouped(mesh, ffn, K, G)
        split = batch_split(mesh, ffn, attn, batch, pad)
        _, g_axes = grouped_split(mesh, ffn, K, kv, split)
        if split and split[0] + "_1" in g_axes:  # part of an axis: count its devices there
            g_dev = math.prod({**sizes, split[0]: split[1], split[0] + "_1": sizes[split[0]] // split[1]}[a]
                              for a in g_axes)
            if G % g_dev:
                out.append(Problem("G", G, frozenset(a.removesuffix("_1") for a in g_axes), "weights"))
        else:
            need("G", G, g_axes, "weights")  # K divides its prefix by construction
    else:
        need("H", heads, ax["wide"], "weights")  # wq/wo (and wk/wv, the cache under attn=heads, for MHA)
    if attn == "batch":
        # the KV cache's batch goes over the axes the query heads end up on (weight-stationary:
        # wide then narrow) or the activations' batch axes then the rest (weight-gathered); a
        # batch that does not divide all of them takes the longest prefix it divides, but at
        # least the first axis (the paper: one full axis at least) — in weight-stationary
        # layouts a part of it: the axis is split into sub-axes when it shares a factor with the
        # batch (x=8 -> 4 x 2 for batch 4)
        order = ax["batch"] + tuple(a for a in ax["all"] if a not in ax["batch"]) if ax["batch"] else (
            ax["wide"] + ax["narrow"])
        if ax["batch"] or math.gcd(batch, sizes[order[0]]) == 1:
            need("B", batch, order[:1], "cache")
    # the residual stream [B, L, E] at rest
    need("B", batch, ax["batch"], "residual")
    need("E", E, ax["rest_e"], "residual")
    return out


_MSG = re.compile(r"dim ([A-Z])=(\d+) does not divide over \{([a-z0-9_,]*)\} \((\d+) devices\)")


def check_layout_error(err: LayoutError, problems: list[Problem], mesh: Mesh) -> Problem:
    """The error names one of the predicted problems: dim, size, axes and device count, plus a hint."""
    m = _MSG.search(err.message)
    assert m, f"LayoutError does not name the dim, its size and the axes: {err.message!r}"
    # sub-axes of a split mesh axis (x=4 -> x, x_1 under attn=batch with a small batch) are
    # parts of the user's axis: compare on the axes of the mesh the user wrote
    axes = frozenset(re.sub(r"_\d+$", "", a) for a in m.group(3).split(","))
    dim, size, devs = m.group(1), int(m.group(2)), int(m.group(4))
    hit = [p for p in problems if (p.dim, p.size, p.axes) == (dim, size, axes)]
    assert hit, f"LayoutError names {dim}={size} over {sorted(axes)}, which the oracle does not predict; " \
                f"predicted: {problems}; message: {err.message}"
    if not re.search(r"_\d+\b", m.group(3)):  # sub-axes of a split axis hold part of its devices
        assert devs == math.prod(dict(mesh)[a] for a in axes)
    assert err.hint, f"LayoutError without a hint (options): {err.message}"
    return hit[0]


# ---- models and compilation -------------------------------------------------------------------


def spec_for(model: ModelSpec, mesh: Mesh, ffn: str, attn: str, batch: int, phase: str = "prefill",
             kv: str = "shard", pad: bool = True) -> Spec:
    return Spec(model, MeshSpec(mesh), ServeSpec(phase=phase, batch=batch, seq=8, ffn=ffn, attn=attn, kv=kv,
                                                 pad=pad))


def shard_pass(ffn: str, attn: str, kv: str = "shard") -> str:
    """kv=pad shards the (padded) heads like kv=shard."""
    return f"shard{{ffn={ffn},attn={attn}" + ("" if kv != "replicate" else f",kv={kv}") + "}"


def pipeline_for(model: ModelSpec, mesh: Mesh, ffn: str, attn: str, pad: bool, kv: str = "shard") -> str:
    """The default pipeline (which pads heads, the vocabulary, d_ff, d_model and the batch when
    they do not divide) or, without ``pad``, a bare shard pipeline (kv=pad: pad-heads for the
    grouped-query heads only). The batch padding is for batch 1: a multiple of what a batch must
    divide, so it pads the module's batch whatever it is."""
    if pad or kv == "pad":
        return default_pipeline(spec_for(model, mesh, ffn, attn, 1, kv=kv, pad=pad), rewrites=False)
    return f"{shard_pass(ffn, attn, kv)},insert-collectives,cleanup"


def build(model: ModelSpec, batch: int, prompt: int, cache: int, mesh: Mesh = (), dtype: str = "f32",
          entries: tuple[str, ...] = ("prefill", "decode"), logits: str = "all") -> Module:
    """Prefill logits for every prompt position by default: the layouts are checked everywhere."""
    return build_module(model, BuildConfig(batch, prompt, cache, entries, dtype, logits), mesh)


def compile_layout(model: ModelSpec, batch: int, prompt: int, cache: int, mesh: Mesh, ffn: str, attn: str,
                   pad: bool = False, dtype: str = "f32",
                   entries: tuple[str, ...] = ("prefill", "decode"), kv: str = "shard") -> Module:
    mod = build(model, batch, prompt, cache, mesh, dtype, entries)
    return compile_module(mod, pipeline_for(model, mesh, ffn, attn, pad, kv)).module


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """Normwise: max |got - ref| / max |ref| (elementwise relative error is meaningless near 0)."""
    scale = float(np.abs(ref).max()) or 1.0
    return float(np.abs(np.asarray(got, np.float64) - ref).max()) / scale


def tiny_model(attention: str = "mqa", heads: int = 8, **kw) -> ModelSpec:
    kv = {"mha": heads, "mqa": 1, "gqa": 2}[attention]
    base = dict(layers=2, d_model=32, heads=heads, kv_heads=kv, d_head=8, d_ff=64, vocab=64)
    base.update(kw)
    return ModelSpec(f"t-{attention}", **base)


def run_pair(sharded: Module, model: ModelSpec, batch: int, prompt: int, steps: int, executor, seed: int = 0):
    """(got, ref) logits of prefill + ``steps`` decode steps: ``executor(sharded)`` vs the float64
    reference interpreter on the unpartitioned module, with the same random weights and tokens."""
    from runtime.generate import ReferenceExecutor, generate
    from runtime.weights import random_tokens, random_weights

    cache = prompt + steps
    ref_mod = build(model, batch, prompt, cache)
    weights = random_weights(ref_mod.function("prefill"), seed=seed)
    tokens = random_tokens(batch, cache, model.vocab, seed=seed)
    ref = generate(ReferenceExecutor(ref_mod), weights, tokens, prompt)
    got = generate(executor(sharded), weights, tokens, prompt)
    return got.logits, ref.logits


# ---- hypothesis strategies and the per-example check -------------------------------------------


def note(text: str) -> None:
    if currently_in_test_context():
        _note(text)


def event(text: str) -> None:
    if currently_in_test_context():
        _event(text)


@st.composite
def model_specs(draw, n: int, divisible: bool, attention: str | None = None) -> ModelSpec:
    """A small model; with ``divisible`` its E and F are multiples of the mesh size ``n`` and its
    heads are either a multiple of ``n`` or padded by the default pipeline as far as the layout
    shards them (MHA/MQA)."""
    att = attention or draw(st.sampled_from(["mha", "mqa", "gqa"]))
    if divisible:
        unit = 8  # every mesh has at most 8 devices, and axis products divide 8
        d_model = unit * draw(st.integers(1, 4))
        d_ff = unit * draw(st.integers(1, 6))
    else:
        d_model = draw(st.sampled_from([4, 6, 8, 12, 16, 20, 24]))
        d_ff = draw(st.sampled_from([4, 6, 8, 12, 16, 24, 32, 36]))
    if att == "gqa":
        kv = draw(st.sampled_from([2, 4]))
        heads = kv * draw(st.sampled_from([2, 3, 4]))
    else:
        heads = draw(st.integers(2, 2 * n)) if not divisible else draw(st.sampled_from([n, 2 * n, 3, 5, 6]))
        kv = heads if att == "mha" else 1
    d_head = draw(st.sampled_from([2, 4, 8]))
    rotary_dim = draw(st.sampled_from([0, d_head // 2 if (d_head // 2) % 2 == 0 else 0]))
    return ModelSpec(
        f"p-{att}", layers=draw(st.integers(1, 2)), d_model=d_model, heads=heads, kv_heads=kv, d_head=d_head,
        d_ff=d_ff, vocab=draw(st.sampled_from([16, 24, 32, 40, 64])),
        block=draw(st.sampled_from(["serial", "parallel"])), mlp=draw(st.sampled_from(["gelu", "gelu-tanh", "swiglu"])),
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])), bias=draw(st.sampled_from(["none", "mlp", "all"])),
        tie_embeddings=draw(st.booleans()), rotary_dim=rotary_dim,
        rotary_style=draw(st.sampled_from(["half", "interleaved"])))


@st.composite
def cases(draw, divisible: bool, attention: tuple[str, ...], meshes: tuple[Mesh, ...] = MESHES):
    """(model, mesh, ffn, attn, phase, batch, prompt, steps, pad, kv). ``divisible``: batch a
    multiple of the device count, E and F multiples of 8, heads multiples of it or padded."""
    mesh = draw(st.sampled_from(meshes))
    n = n_devices(mesh)
    model = draw(model_specs(n, divisible, draw(st.sampled_from(attention))))
    ffn = draw(st.sampled_from(FFN_LAYOUTS))
    attn = draw(st.sampled_from(ATTN_LAYOUTS))
    phase = draw(st.sampled_from(["prefill", "decode"]))
    batch = n * draw(st.integers(1, 2)) if divisible else draw(st.integers(1, 9))
    prompt = draw(st.integers(1, 4))
    steps = 0 if phase == "prefill" else draw(st.integers(1, 3))
    # the default pipeline (pad-heads when needed) or a bare shard pipeline
    pad = draw(st.booleans()) if not divisible else model.heads % n != 0 or draw(st.booleans())
    # grouped-query heads: K then G over the head axes, the K/V heads replicated, or padded
    kv = draw(st.sampled_from(["shard", "replicate", "pad"])) if model.attention == "grouped" else "shard"
    return model, mesh, ffn, attn, phase, batch, prompt, steps, pad, kv


def check_partitioned(case, executor, tol: float, what: str) -> None:
    """Compiles a case from :func:`cases`; a predicted LayoutError must be the one raised, else
    ``executor(sharded)`` must reproduce the float64 reference within ``tol`` (normwise)."""
    model, mesh, ffn, attn, phase, batch, prompt, steps, pad, kv = case
    note(f"model={model}\nmesh={mesh_str(mesh)} ffn={ffn} attn={attn} kv={kv} phase={phase} batch={batch} "
         f"prompt={prompt} steps={steps} pad={pad}")
    problems = expected_layout_problems(model, batch, mesh, ffn, attn, pad=pad, kv=kv)
    try:
        sharded = compile_layout(model, batch, prompt, prompt + steps, mesh, ffn, attn, pad=pad, kv=kv)
    except LayoutError as e:
        assert problems, f"LayoutError for a layout the oracle says fits: {e}"
        p = check_layout_error(e, problems, mesh)
        event(f"LayoutError on {p.dim} ({p.what})")
        return
    assert not problems, f"compiled although {problems} do not divide"
    if padded_heads(model, mesh, ffn, attn, pad, kv) != model.heads:
        event("heads padded by the default pipeline")
    got, ref = run_pair(sharded, model, batch, prompt, steps, executor, seed=batch + 10 * prompt + steps)
    assert got.shape == ref.shape == (batch, prompt + steps, model.vocab)
    err = rel_err(got, ref)
    note(f"normwise error {err:.3e}")
    assert err <= tol, f"{what} logits differ from the reference: {err:.3e} > {tol:g}"
    event(f"ran {ffn}/{attn}/{phase}" + (f"/kv={kv}" if model.attention == "grouped" else ""))


# ---- every grouped-query (and multihead / multiquery) model on every mesh -----------------------


@st.composite
def any_meshes(draw) -> Mesh:
    """1-3 axes of any sizes (1 included) with at most 8 devices in all."""
    sizes: list[int] = []
    for _ in range(draw(st.integers(1, 3))):
        room = 8 // math.prod(sizes or [1])
        sizes.append(draw(st.integers(1, max(1, room))))
    return tuple(zip("xyz", sizes))


def refusals(batch: int, mesh: Mesh, ffn: str, attn: str, pad_batch: bool = True) -> list[Problem]:
    """The rule table of the configurations the compiler may refuse although it pads heads,
    grouped-query K x G, the vocabulary, d_ff and d_model: none, since the default pipeline pads
    the batch too (pad-dims). Without that (``pad_batch=False``: the generation runner and the
    serving engine choose their batches) only a batch that does not divide — the residual
    stream's batch axes of a weight-gathered layout, or the first axis of a batch-sharded KV
    cache (weight-gathered; weight-stationary layouts split that axis into sub-axes unless the
    batch shares no factor with it)."""
    ax, sizes = layout_axes(mesh, ffn), dict(mesh)
    if n_devices(mesh) == 1 or pad_batch:
        return []
    out = []
    if ax["batch"] and batch % math.prod(sizes[a] for a in ax["batch"]):
        out.append(Problem("B", batch, frozenset(ax["batch"]), "residual"))
    if attn == "batch":
        order = ax["batch"] + tuple(a for a in ax["all"] if a not in ax["batch"]) if ax["batch"] else (
            ax["wide"] + ax["narrow"])
        if batch % sizes[order[0]] and (ax["batch"] or math.gcd(batch, sizes[order[0]]) == 1):
            out.append(Problem("B", batch, frozenset(order[:1]), "cache"))
    return out


@st.composite
def any_head_cases(draw):
    """(model, mesh, ffn, attn, phase, batch, prompt, steps, kv): heads 1-16 with any kv_heads
    dividing them, tiny sizes (1 layer, d_head 2, d_model and d_ff multiples of the devices, any
    vocabulary), every layout, both phases, batch 1-16, kv = auto or pad."""
    mesh = draw(any_meshes())
    n = n_devices(mesh)
    heads = draw(st.integers(1, 16))
    kv_heads = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
    model = ModelSpec(
        "h", layers=1, d_model=2 * n * draw(st.integers(1, 2)), heads=heads, kv_heads=kv_heads, d_head=2,
        d_ff=2 * n, vocab=draw(st.integers(5, 40)), block=draw(st.sampled_from(["serial", "parallel"])),
        mlp=draw(st.sampled_from(["gelu", "swiglu"])), norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        bias=draw(st.sampled_from(["none", "all"])), tie_embeddings=draw(st.booleans()))
    phase = draw(st.sampled_from(["prefill", "decode"]))
    prompt = draw(st.integers(1, 3))
    steps = 0 if phase == "prefill" else draw(st.integers(1, 2))
    return (model, mesh, draw(st.sampled_from(FFN_LAYOUTS)), draw(st.sampled_from(ATTN_LAYOUTS)), phase,
            draw(st.integers(1, 16)), prompt, steps, draw(st.sampled_from(["auto", "pad"])))


def check_any_heads(case, executor, tol: float, what: str) -> None:
    """The default pipeline (hardware tpu-v4 for kv = auto's cost model) either refuses exactly
    as :func:`refusals` says, or runs and equals the float64 reference within ``tol``."""
    model, mesh, ffn, attn, phase, batch, prompt, steps, kv = case
    note(f"model={model}\nmesh={mesh_str(mesh)} ffn={ffn} attn={attn} kv={kv} phase={phase} batch={batch} "
         f"prompt={prompt} steps={steps}")
    spec = Spec(model, MeshSpec(mesh), ServeSpec(phase=phase, batch=batch, seq=8, ffn=ffn, attn=attn, kv=kv,
                                                 hardware="tpu-v4"))
    allowed = refusals(batch, mesh, ffn, attn)
    try:
        pipeline = default_pipeline(spec, rewrites=True)
        sharded = compile_module(build(model, batch, prompt, prompt + steps, mesh), pipeline).module
    except LayoutError as e:
        assert allowed, f"LayoutError outside the rule table: {e.message}"
        p = check_layout_error(e, allowed, mesh)
        event(f"refused: B ({p.what})")
        return
    assert not allowed, f"compiled although the rule table refuses {allowed}"
    note(f"pipeline {pipeline}")
    got, ref = run_pair(sharded, model, batch, prompt, steps, executor, seed=batch + 10 * prompt + steps)
    assert got.shape == ref.shape == (batch, prompt + steps, model.vocab)
    err = rel_err(got, ref)
    note(f"normwise error {err:.3e}")
    assert err <= tol, f"{what} logits differ from the reference: {err:.3e} > {tol:g}"
    event(f"ran {model.attention} {ffn}/{attn}" + (" padded" if "pad-heads" in pipeline else ""))
