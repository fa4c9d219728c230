"""``einshard generate`` and ``einshard score``: text in, text (or perplexity) out.

The model spec is optional: a checkpoint (a Hugging Face directory or a .gguf file) describes
its own model; a spec given alongside is checked against it (its mesh and serve blocks are
used). Prompts are tokenized with the checkpoint's tokenizer (or given as ids), generated in
one batch (runtime/generator.py) and detokenized; stop strings cut the text and the tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from ir.errors import FileError, SpecError, WeightsError

DEFAULT_MAX_NEW = 32


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="model spec file (optional: the checkpoint describes its model)")
    p.add_argument("--checkpoint", type=Path, required=True, help="a Hugging Face checkpoint directory or a .gguf file")
    add_layout_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_layout_args(p: argparse.ArgumentParser) -> None:
    """The layout flags every checkpoint command takes (generate, score, serve)."""
    g = p.add_argument_group("layout")
    g.add_argument("--mesh", help="mesh axes, e.g. x=2,y=2 ('1' for one device)")
    g.add_argument("--ffn", help="1d-ws|2d-ws|wg-x|wg-xy|wg-xyz|auto")
    g.add_argument("--attn", help="heads|batch|auto")
    g.add_argument("--weights", help="f32|bf16|int8 (the format weights are served in)")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any spec field (repeatable)")
    g.add_argument("--devices", type=int, help="simulated CPU devices (default: the mesh size)")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-ids", help="the prompt as token ids, e.g. 1,2,3")
    src.add_argument("--prompts-file", type=Path, help="one prompt per line")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW, help=f"tokens to generate (default {DEFAULT_MAX_NEW})")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=int, help="keep the k most likely tokens (default: all)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same tokens)")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat template")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    p.add_argument("--batch", type=int, help="compiled batch (default: the number of prompts)")
    p.add_argument("--context", type=int, help="KV positions (default: the longest prompt + max-new-tokens, rounded up)")
    from compiler.offload import add_offload_args

    add_offload_args(p)
    from compiler.multiprocess import add_multiprocess_args

    add_multiprocess_args(p)


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--text", type=Path, required=True, help="the text file to score")
    p.add_argument("--window", type=int, default=512, help="tokens per scoring window (default 512)")
    from compiler.offload import add_offload_args

    add_offload_args(p)


@dataclass(frozen=True)
class Loaded:
    spec: Any
    checkpoint: Any
    tokenizer: Any  # None when the checkpoint has none (ids only)
    weights: dict


def load(args: argparse.Namespace, need_tokenizer: bool = True, with_weights: bool = True) -> Loaded:
    """The checkpoint, its spec (checked against a given spec file), overrides, devices, weights
    (none when ``with_weights`` is false: --offload disk reads its own store)."""
    from compiler.multiprocess import join
    from compiler.spec import Spec, apply_overrides, load_spec
    from runtime.checkpoint import check_same_model, open_checkpoint

    if not args.checkpoint.exists():
        raise FileError(f"no checkpoint at '{args.checkpoint}'", hint="give a Hugging Face directory or a .gguf file")
    ck = open_checkpoint(args.checkpoint)
    model = ck.model_spec()
    if args.spec:
        spec = load_spec(args.spec)
        check_same_model(model, spec.model, str(args.checkpoint), args.spec)
    else:
        spec = Spec(model, path=str(args.checkpoint))
    spec = apply_overrides(spec, mesh=args.mesh, ffn=args.ffn, attn=args.attn, weights=args.weights,
                           sets=list(args.sets))
    group = join(args, spec.mesh.n_devices)  # simulated devices, or this process's share of them
    from runtime.model_runner import enable_compile_cache

    enable_compile_cache()
    tok = None
    try:
        tok = ck.tokenizer()
    except WeightsError:
        if need_tokenizer:
            raise
        # token ids in and out: a checkpoint without a tokenizer is fine; one that has one still
        # gives the EOS ids and the text (otherwise --json would not stop where plain output does)
    if tok is not None:
        tok.check_vocab(spec.model.vocab)
    from compiler.generation import weight_types

    from runtime.checkpoint import HFCheckpoint
    from runtime.gguf import GGUFCheckpoint

    if with_weights and group is not None and isinstance(ck, (HFCheckpoint, GGUFCheckpoint)):
        from runtime.sliced_weights import lazy_weights  # each process reads only its devices' blocks

        return Loaded(spec, ck, tok, lazy_weights(ck, spec.model, weight_types(spec)))
    weights = ck.load_weights(spec.model, weight_types(spec)) if with_weights else {}
    return Loaded(spec, ck, tok, weights)


def _prompts(args: argparse.Namespace, tok: Any) -> tuple[list[list[int]], list[str]]:
    """Token ids and texts of the prompts (texts are '' for --prompt-ids)."""
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t != ""]
        except ValueError:
            raise SpecError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        if not ids:
            raise SpecError("--prompt-ids is empty")
        return [ids], [""]
    if args.prompts_file is not None:
        try:
            texts = [l for l in args.prompts_file.read_text(encoding="utf-8").splitlines() if l.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise FileError(f"cannot read prompts file '{args.prompts_file}': {e}") from None
        if not texts:
            raise SpecError(f"prompts file '{args.prompts_file}' has no prompts")
    else:
        texts = [args.prompt]
    out = []
    for i, t in enumerate(texts):
        if not t:
            raise SpecError("the prompt is empty" + (f" (prompt {i})" if len(texts) > 1 else ""))
        if tok is None:
            raise SpecError("this checkpoint has no tokenizer; give --prompt-ids")
        if args.chat:
            t = tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
            out.append(tok.encode(t, add_special_tokens=False))
        else:
            out.append(tok.encode(t))
    return out, texts


def _check_flags(args: argparse.Namespace) -> None:
    """Sampling flags, checked before anything is loaded."""
    if getattr(args, "chat", False) and args.prompt_ids is not None:  # token ids are never templated
        raise SpecError("--chat wraps prompt text in the chat template; --prompt-ids are used as given",
                        hint="give the text with --prompt or --prompts-file, or drop --chat")
    if args.max_new_tokens < 1:
        raise SpecError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.top_k is not None and args.top_k < 1:
        raise SpecError(f"--top-k must be >= 1, got {args.top_k}", hint="leave it out to keep every token")
    if not (0 < args.top_p <= 1):
        raise SpecError(f"--top-p must be in (0, 1], got {args.top_p}", hint="1 keeps every token")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise SpecError(f"--temperature must be >= 0, got {args.temperature}", hint="0 is greedy")
    if not 0 <= args.seed < 2**32:
        raise SpecError(f"--seed must be in [0, 2^32), got {args.seed}")


def cut_at_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    hits = [i for s in stops if s and (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def run_generate(args: argparse.Namespace) -> int:
    _check_flags(args)
    if args.batch is not None and args.batch < 1:
        raise SpecError(f"--batch must be >= 1, got {args.batch}")
    from compiler.offload import check_offload_args

    check_offload_args(args)
    t0 = time.perf_counter()
    # JAX is imported only after load() has set up the simulated devices the mesh needs
    try:  # token ids in, token ids out (printed as ids) need no tokenizer; text and stop strings do
        ld = load(args, need_tokenizer=args.prompt_ids is None or bool(args.stop), with_weights=args.offload != "disk")
    except WeightsError as e:
        if args.prompt_ids is not None and args.stop:
            e.hint = "--stop matches text, which needs the checkpoint's tokenizer: drop --stop, or save the tokenizer"
        raise
    from runtime.generator import GenerateRequest, Generator
    from runtime.model_runner import bucket, roofline_fraction
    from runtime.distributed import is_primary
    from runtime.sampling import SamplingParams

    params = SamplingParams(args.temperature, args.top_k or 0, args.top_p, args.seed)
    prompts, texts = _prompts(args, ld.tokenizer)
    tok = ld.tokenizer
    eos = () if args.ignore_eos or tok is None else tok.eos_token_ids
    longest = max(len(p) for p in prompts)
    context = args.context or bucket(longest) + bucket(args.max_new_tokens)
    from compiler.generation import make_runner

    B = max(args.batch or len(prompts), len(prompts))
    from compiler.limits import check_serving_memory
    from runtime.model_runner import on_cpu

    if on_cpu():  # on an accelerator the device's memory is what counts, and XLA reports it
        check_serving_memory(ld.spec, B, context, "--batch or --context", rows="batch",
                             resident_weights=args.offload != "disk")
    if args.offload == "disk":
        from compiler.offload import disk_generator

        runner, gen = disk_generator(args, ld, context, B)
    elif args.offload == "host":
        from compiler.offload import host_generator

        runner, gen = host_generator(ld, context, B)
    else:
        runner = make_runner(ld.spec, ld.weights, context, batch=B)
        gen = Generator(runner)
    req = GenerateRequest.of(prompts, params, args.max_new_tokens, eos)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    compile_s = gen.compile(req, batch=B, stream=args.stream)
    streams = [tok.stream() for _ in prompts] if tok is not None else None
    shown = [""] * len(prompts)
    stopped = [False] * len(prompts)
    hold = max((len(s) for s in args.stop), default=1) - 1
    # every process runs the same steps (and stops rows alike); process 0 alone prints
    primary = is_primary()

    def on_token(row: int, token: int) -> bool:
        """Streams text (holding back what could start a stop string); True stops the row."""
        if streams is None or stopped[row]:
            return stopped[row]
        shown[row] += streams[row].push(token)
        cut = cut_at_stop(shown[row], args.stop)
        if cut is not None:
            stopped[row] = True
        if args.stream and not args.json and len(prompts) == 1 and primary:
            done_text = shown[row][:cut] if cut is not None else shown[row][: max(len(shown[row]) - hold, 0)]
            sys.stdout.write(done_text[len(_printed[row]):])
            sys.stdout.flush()
            _printed[row] = done_text
        return stopped[row]

    _printed = [""] * len(prompts)
    res = gen.generate(req, stream=on_token if args.stream else None, batch=B)
    if not primary:
        return 0
    total_s = time.perf_counter() - t1
    out_tokens, out_text, reasons = [], [], []
    for i, toks in enumerate(res.tokens):
        reason = res.finish_reasons[i]
        text = tok.decode(toks) if tok is not None else ""
        cut = cut_at_stop(text, args.stop) if tok is not None else None
        if cut is not None:
            text = text[:cut]
            # the shortest prefix of tokens whose text reaches the stop string
            for n in range(1, len(toks) + 1):
                if cut_at_stop(tok.decode(toks[:n]), args.stop) is not None:
                    toks = toks[: n]
                    break
            reason = "stop"
        out_tokens.append(toks)
        out_text.append(text)
        reasons.append(reason)
    # without a tokenizer (--prompt-ids only) the plain output is the token ids
    shown_text = out_text if tok is not None else [",".join(map(str, t)) for t in out_tokens]
    if args.stream and not args.json and len(prompts) == 1:
        sys.stdout.write(shown_text[0][len(_printed[0]):] + "\n")
    s = ld.spec
    layout = {"mesh": dict(s.mesh.axes), "ffn": s.serve.ffn, "attn": s.serve.attn, "weights": s.serve.weights}
    from compiler.generation import fixed_layout

    fx = fixed_layout(s, B).serve
    layout.update(ffn=fx.ffn, attn=fx.attn)
    report = {
        "tokens": out_tokens, "text": out_text, "prompt_tokens": [len(p) for p in prompts],
        "finish_reason": reasons, "ttft_s": res.ttft_s, "decode_tokens_per_s": res.decode_tokens_per_s,
        "step_ms_p50": res.step_ms_p50, "compile_s": compile_s, "load_s": load_s, "total_s": total_s,
        "batch": B, "context": context, "layout": layout,
    }
    report["weight_bytes"] = runner.weight_bytes()
    report["roofline_fraction"] = roofline_fraction(runner, res.step_ms_p50, B, res.context or None)
    schedules = getattr(getattr(gen, "pipelined", None), "schedules", None)
    if schedules:  # pipeline stages: decode as one call kept full (runtime/pipelined_generate.py)
        report["decode_schedule"] = list(schedules.values())[-1]
    if args.offload == "disk":
        from compiler.offload import offload_report

        report["offload"] = offload_report(runner)
    if args.json:
        print(json.dumps(report, indent=2))
    elif not (args.stream and len(prompts) == 1):
        for i, t in enumerate(shown_text):
            if len(prompts) > 1:
                print(f"--- prompt {i}: {texts[i]!r}")
            print(t)
    if not args.json:
        roof = report["roofline_fraction"]
        print(f"[{sum(len(t) for t in out_tokens)} tokens; ttft {res.ttft_s * 1e3:.0f} ms; decode "
              f"{res.decode_tokens_per_s:.1f} tok/s (step p50 {res.step_ms_p50:.1f} ms"
              + (f", {roof:.0%} of the memory roofline" if roof else "") + f"); compile {compile_s:.1f} s; "
              f"{', '.join(reasons)}]", file=sys.stderr)
    return 0


def run_score(args: argparse.Namespace) -> int:
    from runtime.scoring import score_tokens

    if args.window < 2:
        raise SpecError(f"--window must be >= 2, got {args.window}")
    try:
        text = args.text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FileError(f"cannot read text file '{args.text}': {e}") from None
    from compiler.offload import check_offload_args

    check_offload_args(args)
    ld = load(args, with_weights=args.offload != "disk")
    ids = ld.tokenizer.encode(text)
    if len(ids) < 2:
        raise SpecError(f"'{args.text}' has {len(ids)} tokens; scoring needs at least 2")
    from compiler.generation import module_for

    t0 = time.perf_counter()

    def build(length: int) -> Any:
        return module_for(ld.spec, "prefill", 1, length, length, logits="all")

    offload = None
    if args.offload == "disk":  # layers streamed from the offload store through the budget
        from compiler.offload import offload_report, score_runner
        from runtime.offload import stream_logits
        from runtime.scoring import score_with

        runner = score_runner(args, ld, args.window)
        try:
            res = score_with(stream_logits(runner), ids, args.window)
            offload = offload_report(runner)
        finally:
            runner.close()
    elif args.offload == "host":  # per-layer weights in pinned host memory
        if ld.spec.mesh.n_devices > 1:
            raise SpecError("--offload host moves layers to one device; drop --mesh")
        from runtime.offload_host import host_logits
        from runtime.scoring import score_with

        res = score_with(host_logits(build, ld.weights), ids, args.window)
    else:
        res = score_tokens(build, ld.weights, ids, args.window)
    report = {"tokens": len(ids), "scored": res.count, "mean_nll": res.mean_nll, "perplexity": math.exp(res.mean_nll),
              "windows": res.windows, "window": args.window, "weights": ld.spec.serve.weights,
              "seconds": time.perf_counter() - t0}
    if offload is not None:
        report["offload"] = offload
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"perplexity {report['perplexity']:.4f}  mean NLL {res.mean_nll:.6f} nats over {res.count} tokens "
              f"({res.windows} windows of <= {args.window}; weights {ld.spec.serve.weights})")
    return 0


def subcommands() -> list[Any]:
    from compiler.subcommand import Subcommand

    return [
        Subcommand("generate", "generate text from a checkpoint (greedy or sampled; batched; streamed)",
                   add_generate_arguments, run_generate),
        Subcommand("score", "perplexity of a text under a checkpoint", add_score_arguments, run_score),
    ]
