"""The ``einshard`` command line: compile, run, explain, spec-from-hf, passes.

Documented errors (EinshardError) print as ``file:line:col: kind: message`` with a caret and
exit 1; anything else is an internal bug and exits 2 with its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

from ir.errors import EinshardError, SpecError

EXIT_OK, EXIT_ERROR, EXIT_INTERNAL = 0, 1, 2


def _add_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("spec overrides")
    g.add_argument("--mesh", help="mesh axes, e.g. x=2,y=2,z=2 ('1' for one device)")
    g.add_argument("--phase", help="prefill|decode")
    g.add_argument("--batch", help="sequences per step")
    g.add_argument("--seq", help="prefill: tokens per sequence; decode: KV cache length")
    g.add_argument("--ffn", help="1d-ws|2d-ws|wg-x|wg-xy|wg-xyz|auto")
    g.add_argument("--attn", help="heads|batch|auto")
    g.add_argument("--weights", metavar="FORMAT|DIR",
                   help="weight format f32|bf16|int8; for `run`, a checkpoint directory is also accepted")
    g.add_argument("--overlap", help="none|looped|bidirectional")
    g.add_argument("--hardware", metavar="CHIP|FILE",
                   help="chip for the cost model (tpu-v4, tpu-v5e, tpu-v5p, a100-80g, h100, h200, cpu) or a chip .toml")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="any spec field, e.g. model.layers=2 (repeatable)")


def _add_pipeline(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pass pipeline")
    g.add_argument("--passes", help="pipeline string replacing the default, e.g. 'cleanup'")
    g.add_argument("--print-ir-after-all", action="store_true", help="dump the IR after every pass (stderr)")
    g.add_argument("--print-ir-after", action="append", default=[], metavar="PASS", help="dump after PASS")
    g.add_argument("--print-ir-before", action="append", default=[], metavar="PASS", help="dump before PASS")
    g.add_argument("--print-ir-after-change", action="store_true", help="dump after each pass that changed the IR")
    g.add_argument("--dump-dir", type=Path, help="write numbered IR files (00-input.ir, 01-cleanup.ir, ...)")
    g.add_argument("--time-passes", action="store_true", help="report wall time per pass (stderr)")
    g.add_argument("--pass-stats", action="store_true", help="report pass statistics (stderr)")
    g.add_argument("--no-verify-each", dest="verify_each", action="store_false",
                   help="do not verify the IR after every pass")


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="einshard", description="A compiler for transformer inference.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="build the IR of a spec (or read an .ir file) and run the pipeline")
    c.add_argument("input", help="model spec file (.model) or textual IR (.ir)")
    _add_overrides(c)
    _add_pipeline(c)
    c.add_argument("-o", "--output", type=Path, help="write the final IR here instead of stdout")
    c.add_argument("--emit", choices=("ir", "none"), default="ir", help="what to print at the end")

    r = sub.add_parser("run", help="compile, execute prefill + decode steps with JAX, optionally check")
    r.add_argument("input", help="model spec file")
    _add_overrides(r)
    _add_pipeline(r)
    r.add_argument("--checkpoint", type=Path, metavar="DIR",
                   help="Hugging Face checkpoint dir (*.safetensors); `--weights DIR` does the same")
    r.add_argument("--check", action="store_true", help="compare logits with the numpy float64 reference")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    r.add_argument("--steps", type=int, default=4, help="decode steps after the prompt (default 4)")
    r.add_argument("--prompt-len", type=int, help="prompt tokens (default: from serve.seq)")
    r.add_argument("--seed", type=int, default=0, help="seed of random weights and tokens")
    r.add_argument("--tolerance", type=float, help="max relative error allowed (default by weight format)")
    r.add_argument("--devices", type=int, help="simulated CPU devices (default: the mesh size)")
    r.add_argument("--spmd", action="store_true",
                   help="with --check, also run the numpy SPMD simulator (one thread per device)")

    h = sub.add_parser("spec-from-hf", help="write a spec for a Hugging Face checkpoint dir")
    h.add_argument("dir", type=Path)

    x = sub.add_parser("explain", help="price every candidate layout with the cost model (table, JSON, plot)")
    x.add_argument("input", help="model spec file")
    _add_overrides(x)
    x.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    x.add_argument("--kv-fraction", type=float, default=0.5,
                   help="share of HBM reserved for the KV cache when computing the longest context (default 0.5)")
    x.add_argument("--pareto", type=Path, metavar="FILE",
                   help="draw latency vs cost per token over batch sizes and weight formats (matplotlib)")
    x.add_argument("--batches", help="batch sizes for --pareto, e.g. 1,4,16,64,256,1024")

    sub.add_parser("passes", help="list the registered passes and their options")
    return ap


WEIGHT_FORMATS = ("f32", "bf16", "int8")


def _split_weights_flag(args: argparse.Namespace) -> tuple[str | None, Path | None]:
    """``--weights`` names a weight format, or (for `run`) a checkpoint directory."""
    w = args.weights
    if w is None or w in WEIGHT_FORMATS:
        return w, getattr(args, "checkpoint", None)
    if args.command == "run" and Path(w).is_dir():
        if getattr(args, "checkpoint", None) is not None:
            raise SpecError("give the checkpoint once: --weights DIR or --checkpoint DIR, not both")
        return None, Path(w)
    what = "a weight format or a checkpoint directory" if args.command == "run" else "a weight format"
    raise SpecError(f"--weights {w!r} is not {what}", hint=f"weight formats: {', '.join(WEIGHT_FORMATS)}")


def _spec_with_overrides(args: argparse.Namespace):
    from compiler.driver import load_input
    from compiler.spec import apply_overrides

    fmt, _ = _split_weights_flag(args)
    loaded = load_input(args.input)
    if not hasattr(loaded, "model"):
        return loaded
    hw = getattr(args, "hardware", None)
    sets = [*args.sets, f"serve.hardware={hw}"] if hw is not None and not _is_chip_file(hw) else args.sets
    return apply_overrides(loaded, mesh=args.mesh, phase=args.phase, batch=args.batch, seq=args.seq,
                           ffn=args.ffn, attn=args.attn, weights=fmt, overlap=args.overlap, sets=sets)


def _is_chip_file(hw: str) -> bool:
    return hw.endswith(".toml") or Path(hw).is_file()


def _chip(args: argparse.Namespace, spec):
    from compiler.cost.hardware import get_chip

    hw = getattr(args, "hardware", None)
    return get_chip(hw if hw is not None and _is_chip_file(hw) else spec.serve.hardware)


def _resolve_auto(args: argparse.Namespace, spec):
    """ffn/attn = auto: the cost model's choice; its report goes with --pass-stats."""
    if not hasattr(spec, "model") or (spec.serve.ffn != "auto" and spec.serve.attn != "auto") \
            or spec.mesh.n_devices == 1:
        return spec
    from compiler.cost.autolayout import resolve_auto

    resolved, choice = resolve_auto(spec, _chip(args, spec))
    if args.pass_stats and choice is not None:
        print("\n".join(choice.report()), file=sys.stderr)
    return resolved


def _instrumentation(args: argparse.Namespace):
    from passes.manager import Instrumentation

    return Instrumentation(
        verify_each=args.verify_each, print_ir_after_all=args.print_ir_after_all,
        print_ir_after=frozenset(args.print_ir_after), print_ir_before=frozenset(args.print_ir_before),
        print_ir_after_change=args.print_ir_after_change, dump_dir=args.dump_dir)


def _report(args: argparse.Namespace, res) -> None:
    from passes.manager import format_stats, format_timing

    if args.pass_stats:
        print(format_stats(res.run.records), file=sys.stderr)
    if args.time_passes:
        print(format_timing(res.run.records, res.run.total_seconds, res.run.verify_seconds), file=sys.stderr)


def _err_sink(text: str) -> None:
    sys.stderr.write(text if text.endswith("\n") else text + "\n")


def cmd_compile(args: argparse.Namespace) -> int:
    from compiler.driver import build_for, compile_config, compile_module, default_pipeline
    from ir.printer import print_module

    spec_or_module = _resolve_auto(args, _spec_with_overrides(args))
    if hasattr(spec_or_module, "model"):
        module = build_for(spec_or_module, compile_config(spec_or_module))
        pipeline = args.passes if args.passes is not None else default_pipeline(spec_or_module)
    else:
        module, pipeline = spec_or_module, args.passes if args.passes is not None else default_pipeline(None)
    res = compile_module(module, pipeline, _instrumentation(args), _err_sink)
    _report(args, res)
    text = print_module(res.module)
    if args.output:
        args.output.write_text(text)
    elif args.emit == "ir":
        sys.stdout.write(text)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from compiler.run import RunOptions, execute, format_run

    spec = _spec_with_overrides(args)
    if not hasattr(spec, "model"):
        raise SpecError(f"einshard run needs a model spec, not IR: {args.input}")
    spec = _resolve_auto(args, spec)
    _ensure_devices(args.devices or spec.mesh.n_devices)
    opts = RunOptions(steps=args.steps, prompt_len=args.prompt_len, seed=args.seed, check=args.check,
                      tolerance=args.tolerance, weights_dir=_split_weights_flag(args)[1], pipeline=args.passes,
                      spmd=args.spmd)
    report = execute(spec, opts, _instrumentation(args), _err_sink)
    _report(args, report.compiled)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_run(report))
    return EXIT_OK if report.ok else EXIT_ERROR


def cmd_spec_from_hf(args: argparse.Namespace) -> int:
    from compiler.hf import spec_from_hf
    from compiler.spec import format_spec

    sys.stdout.write(format_spec(spec_from_hf(args.dir)))
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from compiler.cost.explain import explain, format_explain, to_json

    spec = _spec_with_overrides(args)
    if not hasattr(spec, "model"):
        raise SpecError(f"einshard explain needs a model spec, not IR: {args.input}")
    if not 0 < args.kv_fraction <= 1:
        raise SpecError(f"--kv-fraction must be in (0, 1], got {args.kv_fraction}")
    chip = _chip(args, spec)
    phases = (spec.serve.phase,) if args.phase else ("prefill", "decode")
    if args.pareto:
        from compiler.cost.pareto import DEFAULT_BATCHES, check_path, plot, sweep

        check_path(args.pareto)
        batches = DEFAULT_BATCHES if not args.batches else tuple(_positive_ints(args.batches, "--batches"))
        points, skipped = sweep(spec, chip, phases, batches)
        plot(points, args.pareto, f"{spec.model.name} on {spec.mesh.n_devices} x {chip.name}")
        for line in skipped:
            print(f"pareto: skipped {line}", file=sys.stderr)
        print(f"pareto: {len(points)} points written to {args.pareto}", file=sys.stderr)
    reports = explain(spec, chip, phases, args.kv_fraction)
    if args.json:
        print(json.dumps(to_json(spec, chip, reports), indent=2))
    else:
        sys.stdout.write(format_explain(spec, chip, reports))
    return EXIT_OK


def _positive_ints(text: str, flag: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or any(n < 1 for n in out):
        raise SpecError(f"{flag} must be positive integers separated by commas, got {text!r}")
    return out


def cmd_passes(args: argparse.Namespace) -> int:
    import dataclasses

    from passes.registry import all_passes

    for name, cls in sorted(all_passes().items()):
        print(f"{name}: {cls.summary or (cls.__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(cls):
            print(f"    {f.name}={f.default!s:<12} ({f.type})")
    return EXIT_OK


def _ensure_devices(n: int) -> None:
    """Simulated CPU devices must be requested before JAX is first imported (a no-op after)."""
    if n <= 1:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


COMMANDS = {"compile": cmd_compile, "run": cmd_run, "spec-from-hf": cmd_spec_from_hf, "explain": cmd_explain,
            "passes": cmd_passes}


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except EinshardError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception:  # an internal bug: show everything
        traceback.print_exc()
        print("einshard: internal error (this is a bug; please report it with the command line)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
