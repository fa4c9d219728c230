"""Model builder: a ModelSpec becomes an IR module with prefill and/or decode entry points.

Each entry embeds tokens, applies its layer body N times with ``scan`` over weights stacked
along N (so the IR and the compile time do not grow with depth), then the final norm and the
logits (a prefill's for its last prompt position unless ``logits = all``). Both phases read
and write a KV cache of ``cache_len`` positions; prefill writes the prompt at positions
0..L-1 and decode writes one token per sequence at ``pos``.

Attention is written in the paper's letters. Multihead shares the letter H between queries and
keys (``BLHD,BTHD->BHLT``); multiquery drops the K/V head dim (``BLHD,BTD->BHLT``, Fig. 4 of the
paper); grouped-query splits the query heads as K kv heads x G queries per group
(``BLKGD,BTKD->BKGLT``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compiler.spec import ModelSpec
from ir.builder import BuildContext, FunctionBuilder
from ir.errors import SpecError
from ir.fusion_ops import Flatten, Split, Unflatten
from ir.moe_ops import Combine, Dispatch, TopK
from ir.module import Function, Module
from ir.ops import (Binary, CacheUpdate, CausalMask, Einsum, Embed, Norm, Rope, Scale, Scan, Softmax,
                    Symbol, Unary)
from ir.types import Dim, TensorType

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class BuildConfig:
    """Shapes of the program: batch, prompt tokens (prefill L), cache positions (T), entries."""

    batch: int
    prompt_len: int
    cache_len: int
    entries: tuple[str, ...] = PHASES
    dtype: str = "f32"
    #: Prefill logits for the ``last`` prompt position only (what serving samples from; the
    #: ``[B, L, V]`` logits of a long batch outweigh the model on a chip) or for ``all`` (scoring).
    logits: str = "last"
    #: Mixture of experts: 0 for dropless dispatch (C = the tokens), else C = the capacity factor x
    #: tokens x top_k / experts (rounded up; compiler/pipelines.py build_for sets it from the spec).
    capacity_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.prompt_len < 1 or self.cache_len < 1:
            raise SpecError("batch, prompt length and cache length must be positive")
        if "prefill" in self.entries and self.prompt_len > self.cache_len:
            raise SpecError(f"the prompt ({self.prompt_len} tokens) does not fit the KV cache ({self.cache_len})")
        for e in self.entries:
            if e not in PHASES:
                raise SpecError(f"unknown entry {e!r}; valid: {', '.join(PHASES)}")
        if self.logits not in ("last", "all"):
            raise SpecError(f"logits must be 'last' or 'all', got {self.logits!r}")


@dataclass(frozen=True)
class AttnForm:
    """The einsum letters of one attention variant."""

    q: str  # query activation dims after the projection, e.g. "BLHD"
    kv: str  # new key/value dims, e.g. "BLD"
    heads: str  # query-head letters, e.g. "H" or "KG"
    kvheads: str  # key/value head letters, e.g. "" (multiquery), "H", "K"
    score: str  # score dims, e.g. "BHLT"

    @staticmethod
    def of(model: ModelSpec) -> "AttnForm":
        if model.kv_heads == model.heads:
            return AttnForm("BLHD", "BLHD", "H", "H", "BHLT")
        if model.kv_heads == 1:
            return AttnForm("BLHD", "BLD", "H", "", "BHLT")
        return AttnForm("BLKGD", "BLKD", "KG", "K", "BKGLT")

    def cache(self) -> str:
        return self.kv.replace("L", "T")


def dim_sizes(model: ModelSpec, cfg: BuildConfig, L: int) -> dict[str, int]:
    sizes = dict(B=cfg.batch, L=L, T=cfg.cache_len, E=model.d_model, F=model.d_ff, D=model.d_head,
                 V=model.vocab, N=model.layers)
    sizes.update(Q=model.heads * model.d_head)  # OLMoE's QK-norm: heads x D flattened (q_norm; k_norm: kv_heads x D)
    if model.moe:  # X experts, R routes per token, C dropless slots per expert (every token once)
        sizes.update(X=model.experts, R=model.top_k, C=cfg.batch * L)
    form = AttnForm.of(model)
    if form.heads == "KG":
        sizes.update(K=model.kv_heads, G=model.heads // model.kv_heads)
    else:
        sizes.update(H=model.heads)
    return sizes


def layer_weights(model: ModelSpec) -> dict[str, str]:
    """Per-layer weight name -> dim letters (unstacked; entries stack them along a leading N)."""
    f = AttnForm.of(model)
    w: dict[str, str] = {"ln1_scale": "E"}
    if model.norm == "layernorm":
        w["ln1_bias"] = "E"
    if model.block == "serial":
        w["ln2_scale"] = "E"
        if model.norm == "layernorm":
            w["ln2_bias"] = "E"
    w.update(wq="E" + f.heads + "D", wk="E" + f.kvheads + "D", wv="E" + f.kvheads + "D", wo=f.heads + "DE")
    if model.qk_norm == "head":
        w.update(q_norm="D", k_norm="D")
    elif model.qk_norm == "all":  # over the flattened heads x D (Q); a single K/V head is just D
        w.update(q_norm="Q", k_norm="Q" if f.kvheads else "D")
    if model.bias in ("all", "qkv"):
        w.update(bq=f.heads + "D", bk=f.kvheads + "D", bv=f.kvheads + "D")
    if model.bias == "all":
        w.update(bo="E")
    mlp_bias = model.bias in ("mlp", "all")
    if model.moe:
        w.update(w_router="EX")
        if model.router_bias:
            w.update(b_router="X")
        w.update(we_gate="XEF", we_up="XEF", we_down="XFE")
        if model.shared_experts:
            w.update(w_gate="EF", w_up="EF", w_down="FE")
            if model.shared_gate:
                w.update(w_shared_gate="E")
    elif model.mlp == "swiglu":
        w.update(w_gate="EF", w_up="EF", w_down="FE")
        if mlp_bias:
            w.update(b_gate="F", b_up="F", b_down="E")
    else:
        w.update(w_in="EF", w_out="FE")
        if mlp_bias:
            w.update(b_in="F", b_out="E")
    return w


#: The kind (ir/module.py KINDS) of each weight the builder names that is not a matrix or table.
WEIGHT_KINDS: dict[str, str] = {
    **{n: "norm" for n in ("ln1_scale", "ln2_scale", "final_scale", "q_norm", "k_norm")},
    **{n: "bias" for n in ("ln1_bias", "ln2_bias", "final_bias", "bq", "bk", "bv", "bo", "b_gate", "b_up",
                           "b_down", "b_in", "b_out", "lm_head_bias", "b_router", "w_shared_gate")},
}

#: Weights whose F is the routed experts' width (``expert_d_ff``), not ``d_ff``.
EXPERT_WEIGHTS = ("we_gate", "we_up", "we_down")


def weight_sizes(model: ModelSpec, name: str, sizes: dict[str, int]) -> dict[str, int]:
    """The dim sizes of weight ``name``: F is expert_d_ff for the routed experts' weights, and the
    flattened heads Q of OLMoE's key norm count the K/V heads."""
    if name in EXPERT_WEIGHTS:
        return {**sizes, "F": model.expert_d_ff}
    if name == "k_norm":
        return {**sizes, "Q": model.kv_heads * model.d_head}
    return sizes


def weight_kind(name: str) -> str:
    """The param kind of the builder's weight ``name``: from WEIGHT_KINDS, else a matrix ("")."""
    return WEIGHT_KINDS.get(name, "")


def global_weights(model: ModelSpec) -> dict[str, str]:
    """Weights outside the layer stack."""
    w = {"embed": "VE", "final_scale": "E"}
    if model.norm == "layernorm":
        w["final_bias"] = "E"
    if not model.tie_embeddings:
        w["lm_head"] = "VE"
    if model.bias in ("mlp", "all"):
        w["lm_head_bias"] = "V"
    return w


def _t(dtype: str, letters: str, sizes: dict[str, int]) -> TensorType:
    return TensorType(dtype, tuple(Dim(c, sizes[c]) for c in letters))


def expert_capacity(model: ModelSpec, batch: int, length: int, factor: float) -> int:
    """Slots per expert, C = batch x the slots of one sequence: its ``length`` tokens (dropless,
    factor 0), else factor x length x top_k / experts rounded up (at most length: an expert gets
    each token once). Per sequence, so a capacity drops the same tokens under every layout."""
    if not factor:
        return batch * length
    return batch * max(1, min(length, math.ceil(factor * length * model.top_k / model.experts)))


class _LayerEmitter:
    """Emits one transformer layer into a FunctionBuilder."""

    def __init__(self, b: FunctionBuilder, model: ModelSpec, w: dict[str, str], capacity_factor: float = 0.0):
        self.b, self.m, self.w = b, model, w
        self.capacity_factor = capacity_factor

    def norm(self, x: str, which: str) -> str:
        ops = [x, self.w[f"{which}_scale"]]
        if f"{which}_bias" in self.w:
            ops.append(self.w[f"{which}_bias"])
        return self.b.emit(Norm, ops, "h" if which == "ln1" else "h2", norm=self.m.norm, dim="E", eps=self.m.norm_eps)

    def proj(self, x: str, wname: str, spec: str, hint: str, bias: str | None) -> str:
        y = self.b.emit(Einsum, [x, self.w[wname]], hint, spec=spec)
        if bias and bias in self.w:
            y = self.b.emit(Binary, [y, self.w[bias]], hint, fn="add")
        return y

    def qk_norm(self, x: str, heads: str, which: str) -> str:
        """RMSNorm of queries or keys before rotary: over D per head (Qwen3), or over all heads and
        D jointly (OLMoE), as one flattened dim Q (the HF projection's row order)."""
        w, eps = self.w[f"{which}_norm"], self.m.norm_eps
        if self.m.qk_norm == "head" or not heads:
            return self.b.emit(Norm, [x, w], which, norm="rmsnorm", dim="D", eps=eps)
        t = self.b.types[x]
        dims = heads + "D"
        flat = self.b.emit(Flatten, [x], which, dims=dims, into="Q")
        flat = self.b.emit(Norm, [flat, w], which, norm="rmsnorm", dim="Q", eps=eps)
        return self.b.emit(Unflatten, [flat], which, dim="Q", into=dims, sizes=tuple(t.size(c) for c in dims))

    def attention(self, h: str, pos: str, k_cache: str, v_cache: str) -> tuple[str, str, str]:
        f = AttnForm.of(self.m)
        q = self.proj(h, "wq", f"BLE,E{f.heads}D->{f.q}", "q", "bq")
        k = self.proj(h, "wk", f"BLE,E{f.kvheads}D->{f.kv}", "k", "bk")
        v = self.proj(h, "wv", f"BLE,E{f.kvheads}D->{f.kv}", "v", "bv")
        if self.m.qk_norm != "none":
            q = self.qk_norm(q, f.heads, "q")
            k = self.qk_norm(k, f.kvheads, "k")
        rope = dict(style=self.m.rotary_style, rotary_dim=self.m.rotary_dim, theta=self.m.rope_theta)
        q = self.b.emit(Rope, [q, pos], "q", **rope)
        k = self.b.emit(Rope, [k, pos], "k", **rope)
        kc = self.b.emit(CacheUpdate, [k_cache, k, pos], "k_cache")
        vc = self.b.emit(CacheUpdate, [v_cache, v, pos], "v_cache")
        s = self.b.emit(Einsum, [q, kc], "scores", spec=f"{f.q},{f.cache()}->{f.score}")
        s = self.b.emit(Scale, [s], "scores", factor=1.0 / math.sqrt(self.m.d_head))
        window = {"window": self.m.sliding_window} if self.m.sliding_window else {}
        s = self.b.emit(CausalMask, [s, pos], "scores", **window)
        p = self.b.emit(Softmax, [s], "probs", dim="T")
        o = self.b.emit(Einsum, [p, vc], "attn", spec=f"{f.score},{f.cache()}->{f.q}")
        a = self.proj(o, "wo", f"{f.q},{f.heads}DE->BLE", "attn_out", "bo")
        return a, kc, vc

    def moe(self, h: str) -> str:
        """Router, top-k, dispatch by index into [X, C, E], the experts as einsums over X, combine;
        plus the shared expert (optionally sigmoid-gated) when the model has one."""
        m, b = self.m, self.b
        logits = self.proj(h, "w_router", "BLE,EX->BLX", "router", "b_router")
        if m.router == "topk-softmax":
            w, idx = b.emit(TopK, [logits], ["route_w", "route_x"], k=m.top_k, dim="X", into="R")
            w = b.emit(Softmax, [w], "route_w", dim="R")
        else:
            if m.router == "softmax-topk":
                p = b.emit(Softmax, [logits], "router_p", dim="X")
            else:
                p = b.emit(Unary, [logits], "router_p", fn="sigmoid")
            w, idx = b.emit(TopK, [p], ["route_w", "route_x"], k=m.top_k, dim="X", into="R")
            if m.norm_topk:
                total = b.emit(Einsum, [w], "route_sum", spec="BLR->BL")
                w = b.emit(Binary, [w, total], "route_w", fn="div")
        hb = b.types[h]
        buf, slot = b.emit(Dispatch, [h, idx], ["expert_in", "slot"], experts=m.experts,
                           capacity=expert_capacity(m, hb.size("B"), hb.size("L"), self.capacity_factor))
        g = b.emit(Einsum, [buf, self.w["we_gate"]], "expert_gate", spec="XCE,XEF->XCF")
        u = b.emit(Einsum, [buf, self.w["we_up"]], "expert_up", spec="XCE,XEF->XCF")
        g = b.emit(Unary, [g], "expert_gate", fn="silu")
        u = b.emit(Binary, [g, u], "expert_hidden", fn="mul")
        y = b.emit(Einsum, [u, self.w["we_down"]], "expert_out", spec="XCF,XFE->XCE")
        out = b.emit(Combine, [y, idx, slot, w], "moe_out")
        if m.shared_experts:
            s = self.swiglu(h)
            if m.shared_gate:
                gate = b.emit(Einsum, [h, self.w["w_shared_gate"]], "shared_gate", spec="BLE,E->BL")
                gate = b.emit(Unary, [gate], "shared_gate", fn="sigmoid")
                s = b.emit(Binary, [s, gate], "shared_out", fn="mul")
            out = b.emit(Binary, [out, s], "moe_out", fn="add")
        return out

    def swiglu(self, h: str) -> str:
        g = self.proj(h, "w_gate", "BLE,EF->BLF", "gate", "b_gate")
        u = self.proj(h, "w_up", "BLE,EF->BLF", "up", "b_up")
        g = self.b.emit(Unary, [g], "gate", fn="silu")
        u = self.b.emit(Binary, [g, u], "hidden", fn="mul")
        return self.proj(u, "w_down", "BLF,FE->BLE", "mlp_out", "b_down")

    def mlp(self, h: str) -> str:
        if self.m.moe:
            return self.moe(h)
        if self.m.mlp == "swiglu":
            g = self.proj(h, "w_gate", "BLE,EF->BLF", "gate", "b_gate")
            u = self.proj(h, "w_up", "BLE,EF->BLF", "up", "b_up")
            g = self.b.emit(Unary, [g], "gate", fn="silu")
            u = self.b.emit(Binary, [g, u], "hidden", fn="mul")
            return self.proj(u, "w_down", "BLF,FE->BLE", "mlp_out", "b_down")
        u = self.proj(h, "w_in", "BLE,EF->BLF", "hidden", "b_in")
        u = self.b.emit(Unary, [u], "hidden", fn="gelu" if self.m.mlp == "gelu" else "gelu_tanh")
        return self.proj(u, "w_out", "BLF,FE->BLE", "mlp_out", "b_out")

    def layer(self, x: str, pos: str, k_cache: str, v_cache: str) -> tuple[str, str, str]:
        h = self.norm(x, "ln1")
        a, kc, vc = self.attention(h, pos, k_cache, v_cache)
        if self.m.block == "parallel":
            m = self.mlp(h)
            y = self.b.emit(Binary, [a, m], "y", fn="add")
            return self.b.emit(Binary, [x, y], "x", fn="add"), kc, vc
        x = self.b.emit(Binary, [x, a], "x", fn="add")
        m = self.mlp(self.norm(x, "ln2"))
        return self.b.emit(Binary, [x, m], "x", fn="add"), kc, vc


def build_layer(model: ModelSpec, cfg: BuildConfig, phase: str, ctx: BuildContext) -> Function:
    L = cfg.prompt_len if phase == "prefill" else 1
    sizes = dim_sizes(model, cfg, L)
    f = AttnForm.of(model)
    b = FunctionBuilder(f"{phase}_layer", ctx)
    x = b.param("x", _t(cfg.dtype, "BLE", sizes))
    pos = b.param("pos", _t("i32", "BL", sizes))
    w = {n: b.param(n, _t(cfg.dtype, dims, weight_sizes(model, n, sizes)), kind=weight_kind(n))
         for n, dims in layer_weights(model).items()}
    kc = b.param("k_cache", _t(cfg.dtype, f.cache(), sizes))
    vc = b.param("v_cache", _t(cfg.dtype, f.cache(), sizes))
    out = _LayerEmitter(b, model, w, cfg.capacity_factor).layer(x, pos, kc, vc)
    return b.finish(out)


def build_entry(model: ModelSpec, cfg: BuildConfig, phase: str, ctx: BuildContext) -> Function:
    L = cfg.prompt_len if phase == "prefill" else 1
    sizes = dim_sizes(model, cfg, L)
    f = AttnForm.of(model)
    b = FunctionBuilder(phase, ctx, entry=True)
    tokens = b.param("tokens", _t("i32", "BL", sizes), "input")
    pos = b.param("pos", _t("i32", "BL", sizes), "input")
    gw = global_weights(model)
    b.param("embed", _t(cfg.dtype, gw["embed"], sizes), "weight")
    lw = [b.param(n, _t(cfg.dtype, "N" + dims, weight_sizes(model, n, sizes)), "weight", weight_kind(n))
          for n, dims in layer_weights(model).items()]
    g = {n: b.param(n, _t(cfg.dtype, dims, sizes), "weight", weight_kind(n)) for n, dims in gw.items() if n != "embed"}
    kc = b.param("k_cache", _t(cfg.dtype, "N" + f.cache(), sizes), "cache")
    vc = b.param("v_cache", _t(cfg.dtype, "N" + f.cache(), sizes), "cache")
    x = b.emit(Embed, ["embed", tokens], "x")
    x, kc2, vc2 = b.emit(Scan, [x, pos, *lw, kc, vc], ["x", "k_cache", "v_cache"],
                         body=Symbol(f"{phase}_layer"), carry=1, consts=1)
    if phase == "prefill" and cfg.logits == "last" and L > 1:
        _, x = b.emit(Split, [x], ["x_prompt", "x_last"], dim="L", names="LL", sizes=(L - 1, 1), groups=1)
    norm_ops = [x, g["final_scale"]] + ([g["final_bias"]] if "final_bias" in g else [])
    h = b.emit(Norm, norm_ops, "h", norm=model.norm, dim="E", eps=model.norm_eps)
    logits = b.emit(Einsum, [h, g.get("lm_head", "embed")], "logits", spec="BLE,VE->BLV")
    if "lm_head_bias" in g:
        logits = b.emit(Binary, [logits, g["lm_head_bias"]], "logits", fn="add")
    return b.finish([logits, kc2, vc2])


def module_name(model: ModelSpec) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in model.name) or "model"


def build_module(model: ModelSpec, cfg: BuildConfig, mesh: tuple[tuple[str, int], ...] = ()) -> Module:
    """The unsharded program for ``model`` at the shapes of ``cfg`` (mesh recorded, not applied)."""
    ctx = BuildContext(dict(mesh))
    fns: list[Function] = []
    for phase in cfg.entries:
        layer = build_layer(model, cfg, phase, ctx)
        ctx.add(layer)
        entry = build_entry(model, cfg, phase, ctx)
        fns += [entry, layer]
    return Module(module_name(model), tuple(mesh), tuple(fns))
