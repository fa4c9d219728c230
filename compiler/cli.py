"""The ``einshard`` command line: compile, run, explain, spec-from-hf, passes.

Exit statuses (compiler/exit_codes.py): 0 ok; 1 a documented error (EinshardError, printed as
``file:line:col: kind: message`` with a caret and no traceback) or a ``run --check`` mismatch;
64 a usage error (argparse: unknown flag, missing argument, a value of the wrong type); 70 an
internal error (a bug: the traceback is printed); 130 interrupted.

Subcommands live in ``SUBCOMMANDS``: a name, a help line, a function that adds its arguments
and a function that runs it (``Subcommand``, from compiler/subcommand.py, which such modules
import instead of this one); generate, score and serve come from their own modules and are listed there. Numeric
flags are range-checked in one table (``VALUE_LIMITS``, keyed by the argparse ``dest``), so a
new subcommand that reuses ``--steps`` or ``--seed`` gets the same checks; a value out of range
is a SpecError pointing into the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from compiler import hints
from compiler.argv import argv_location
from compiler.exit_codes import EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from compiler.generate_cmd import subcommands as generation_subcommands
from compiler.launch import subcommand as launch_subcommand
from compiler.multiprocess import add_multiprocess_args, join
from compiler.serve_cmd import subcommand as serve_subcommand
from compiler.subcommand import Subcommand, ensure_devices
from ir.errors import EinshardError, FileError, Location, SpecError
from runtime.distributed import abandon, collective_errors, is_primary
from runtime.distributed import current as current_group

__all__ = ["EXIT_ERROR", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "SUBCOMMANDS",
           "Subcommand", "VALUE_LIMITS", "add_overrides", "add_pipeline_flags", "main", "make_parser"]

#: The most simulated CPU devices ``--devices`` asks XLA for (the largest mesh tested is 64).
MAX_DEVICES = 1024


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors on EXIT_USAGE (64) instead of 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# ---- arguments -----------------------------------------------------------------------------

#: Flags that change the spec; an ``.ir`` input has no spec, so they are refused with it.
OVERRIDE_FLAGS = {"mesh": "--mesh", "phase": "--phase", "batch": "--batch", "seq": "--seq", "ffn": "--ffn",
                  "attn": "--attn", "weights": "--weights", "overlap": "--overlap", "hardware": "--hardware",
                  "sets": "--set", "no_pad": "--no-pad"}


def add_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("spec overrides")
    g.add_argument("--mesh", help="mesh axes, e.g. x=2,y=2,z=2 ('1' for one device)")
    g.add_argument("--phase", help="prefill|decode (explain also: generate, a whole request)")
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
    g.add_argument("--no-pad", action="store_const", const=True, default=None,
                   help="refuse a layout whose heads, vocabulary, d_ff, d_model or batch do not divide its "
                        "devices instead of zero-padding them (serve.pad=false)")


def add_pipeline_flags(p: argparse.ArgumentParser) -> None:
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


def _args_compile(c: argparse.ArgumentParser) -> None:
    c.add_argument("input", help="model spec file (.model) or textual IR (.ir)")
    add_overrides(c)
    add_pipeline_flags(c)
    c.add_argument("-o", "--output", type=Path, help="write the final IR here instead of stdout")
    c.add_argument("--emit", choices=("ir", "none"), default="ir", help="what to print at the end")


def _args_run(r: argparse.ArgumentParser) -> None:
    r.add_argument("input", help="model spec file")
    add_overrides(r)
    add_pipeline_flags(r)
    r.add_argument("--checkpoint", type=Path, metavar="DIR|GGUF",
                   help="a Hugging Face checkpoint dir (*.safetensors) or a .gguf file; `--weights DIR` does the same")
    r.add_argument("--check", action="store_true", help="compare logits with the numpy float64 reference")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    r.add_argument("--steps", type=int, default=4, help="decode steps after the prompt (default 4)")
    r.add_argument("--prompt-len", type=int, help="prompt tokens (default: from serve.seq)")
    r.add_argument("--seed", type=int, default=0, help="seed of random weights and tokens (0 .. 2^63-1)")
    r.add_argument("--tolerance", type=float,
                   help="max normwise relative error vs the float64 reference (default by weight format)")
    r.add_argument("--devices", type=int, help=f"simulated CPU devices, 1..{MAX_DEVICES} (default: the mesh size)")
    r.add_argument("--spmd", action="store_true",
                   help="with --check, also run the numpy SPMD simulator (one thread per device)")
    add_multiprocess_args(r)


def _args_spec_from_hf(h: argparse.ArgumentParser) -> None:
    h.add_argument("dir", type=Path, help="a Hugging Face checkpoint directory or a .gguf file")


def _args_explain(x: argparse.ArgumentParser) -> None:
    x.add_argument("input", help="model spec file")
    add_overrides(x)
    x.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    x.add_argument("--kv-fraction", type=float, default=0.5,
                   help="share of HBM reserved for the KV cache when computing the longest context (default 0.5)")
    x.add_argument("--pareto", type=Path, metavar="FILE",
                   help="draw latency vs cost per token over batch sizes and weight formats (matplotlib)")
    x.add_argument("--batches", help="batch sizes for --pareto, e.g. 1,4,16,64,256,1024")
    x.add_argument("--model", dest="cost_model", choices=("calibrated", "bound"), default="calibrated",
                   help="calibrated: predictions with the chip's fitted efficiencies (default); bound: lower bounds")
    x.add_argument("--prompt-len", type=int, help="--phase generate: prompt tokens (default: serve.seq)")
    x.add_argument("--new-tokens", type=int, default=64, help="--phase generate: tokens generated (default 64)")
    x.add_argument("--offload", choices=("host", "disk"),
                   help="price decode with the layers' weights streamed from host memory or disk (ZeRO-Inference)")
    x.add_argument("--offload-target", type=float, default=0.9,
                   help="--offload: the fraction of resident throughput to find the batch for (default 0.9)")
    x.add_argument("--reprobe", action="store_true",
                   help="--hardware cpu: measure this machine again (runtime/probe.py; with --offload, its disk "
                        "too) instead of the cached figures; run it on a quiet machine")


def _args_none(p: argparse.ArgumentParser) -> None:
    pass


def make_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="einshard", description="A compiler for transformer inference.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in SUBCOMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.help)
        c.arguments(p)
        p.set_defaults(handler=c.run)
    return ap


# ---- values out of range: located in the command line ----------------------------------------


@dataclass(frozen=True)
class Limit:
    flag: str
    ok: Callable[[Any], bool]
    requirement: str


def _finite_in(lo: float, hi: float, lo_open: bool = True) -> Callable[[Any], bool]:
    return lambda v: math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi


#: Range checks by argparse ``dest``; a flag that is absent (None) is not checked.
VALUE_LIMITS: dict[str, Limit] = {
    "steps": Limit("--steps", lambda v: v >= 0, "a count >= 0"),
    "prompt_len": Limit("--prompt-len", lambda v: v >= 1, "a token count >= 1"),
    "seed": Limit("--seed", lambda v: 0 <= v < 2**63, "an integer in 0 .. 2^63-1"),
    "tolerance": Limit("--tolerance", _finite_in(0.0, math.inf), "a finite number > 0"),
    "devices": Limit("--devices", lambda v: 1 <= v <= MAX_DEVICES, f"a device count in 1 .. {MAX_DEVICES}"),
    "kv_fraction": Limit("--kv-fraction", _finite_in(0.0, 1.0), "in (0, 1]"),
    "port": Limit("--port", lambda v: 1 <= v <= 65535, "a TCP port in 1 .. 65535"),
    "slots": Limit("--slots", lambda v: v >= 1, "a count >= 1"),
    "max_queue": Limit("--max-queue", lambda v: v >= 0, "a count >= 0"),
    "step_tokens": Limit("--step-tokens", lambda v: v >= 1, "a token count >= 1"),
    "chunk": Limit("--chunk", lambda v: v == 0 or (v > 0 and v & (v - 1) == 0), "0 (off) or a power of two"),
}


def check_values(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Every numeric flag in VALUE_LIMITS is within its range, else a located SpecError."""
    for dest, lim in VALUE_LIMITS.items():
        v = getattr(args, dest, None)
        if v is not None and not lim.ok(v):
            raise SpecError(f"{lim.flag} must be {lim.requirement}, got {v!r}", argv_location(argv, lim.flag))


# ---- shared steps of the commands ------------------------------------------------------------

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
    raise SpecError(f"--weights {w!r} is not {what}", argv_location(args.argv, "--weights"),
                    f"weight formats: {', '.join(WEIGHT_FORMATS)}")


def _spec_with_overrides(args: argparse.Namespace):
    from compiler.driver import load_input
    from compiler.spec import apply_overrides

    from ir.module import Module

    loaded = load_input(args.input)
    if isinstance(loaded, Module):
        given = [flag for dest, flag in OVERRIDE_FLAGS.items() if getattr(args, dest, None) not in (None, [])]
        if given:
            raise SpecError(f"{', '.join(given)} change a model spec, but {args.input} is IR",
                            argv_location(args.argv, given[0]), "compile the .model file with the overrides instead")
        return loaded
    fmt, _ = _split_weights_flag(args)
    hw = getattr(args, "hardware", None)
    sets = [*args.sets, f"serve.hardware={hw}"] if hw is not None and not _is_chip_file(hw) else args.sets
    if getattr(args, "no_pad", None):
        sets = [*sets, "serve.pad=false"]
    return apply_overrides(loaded, mesh=args.mesh, phase=args.phase, batch=args.batch, seq=args.seq,
                           ffn=args.ffn, attn=args.attn, weights=fmt, overlap=args.overlap, sets=sets)


def _is_chip_file(hw: str) -> bool:
    return hw.endswith(".toml") or Path(hw).is_file()


def _chip(args: argparse.Namespace, spec):
    from compiler.cost.hardware import get_chip

    hw = getattr(args, "hardware", None)
    return get_chip(hw if hw is not None and _is_chip_file(hw) else spec.serve.hardware,
                    refresh=bool(getattr(args, "reprobe", False)))


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
    from ir.textfile import ensure_dir
    from passes.manager import Instrumentation

    if args.dump_dir is not None:
        ensure_dir(args.dump_dir, "--dump-dir")  # before the work, not after it
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


def _needs_spec(spec, args: argparse.Namespace):
    if not hasattr(spec, "model"):
        raise SpecError(f"einshard {args.command} needs a model spec, not IR: {args.input}")
    return spec


# ---- the commands ----------------------------------------------------------------------------


def cmd_compile(args: argparse.Namespace) -> int:
    from compiler.driver import build_for, compile_config, compile_module, default_pipeline
    from ir.printer import print_module
    from ir.textfile import check_output_file, write_user_text

    if args.output is not None:
        check_output_file(args.output, "-o")
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
        write_user_text(args.output, text, "-o")
    elif args.emit == "ir":
        sys.stdout.write(text)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from compiler.driver import run_config
    from compiler.limits import check_run_memory
    from compiler.run import RunOptions, execute, format_run

    if args.spmd and not args.check:  # the simulator's logits are only ever compared, under --check
        raise SpecError("--spmd runs the numpy SPMD simulator beside --check's reference; alone it does nothing",
                        hint="add --check")
    ck = args.checkpoint
    if ck is not None and not (ck.is_dir() or (ck.is_file() and ck.suffix == ".gguf")):
        raise FileError(f"--checkpoint '{ck}' is neither a folder nor a .gguf file",
                        argv_location(args.argv, "--checkpoint"))
    spec = _resolve_auto(args, _needs_spec(_spec_with_overrides(args), args))
    check_run_memory(spec, run_config(spec, args.steps, args.prompt_len))
    primary = join(args, spec.mesh.n_devices) is None or is_primary()
    instr = _instrumentation(args)
    # every process runs the program; only process 0 checks against the reference and prints
    opts = RunOptions(steps=args.steps, prompt_len=args.prompt_len, seed=args.seed, check=args.check and primary,
                      tolerance=args.tolerance, weights_dir=_split_weights_flag(args)[1], pipeline=args.passes,
                      spmd=args.spmd)
    report = execute(spec, opts, instr, _err_sink)
    if not primary:
        return EXIT_OK
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

    if args.phase == "generate":  # a whole request: each phase gets its own layout (auto unless given)
        args.phase = None
        args.ffn, args.attn = args.ffn or "auto", args.attn or "auto"
        return _explain_generation(args, _needs_spec(_spec_with_overrides(args), args))
    spec = _needs_spec(_spec_with_overrides(args), args)
    chip = _chip(args, spec)
    if getattr(args, "offload", None):
        from compiler.cost.offload import explain_offload

        if args.reprobe and chip.name == "cpu":
            from runtime.probe import io_probe

            io_probe(refresh=True)

        return explain_offload(spec, chip, args.offload, args.offload_target, args.cost_model, args.json)
    phases = (spec.serve.phase,) if args.phase else ("prefill", "decode")
    if args.pareto:
        from compiler.cost.pareto import DEFAULT_BATCHES, check_path, plot, sweep

        check_path(args.pareto)
        batches = DEFAULT_BATCHES if not args.batches else tuple(_positive_ints(args.batches, "--batches"))
        points, skipped = sweep(spec, chip, phases, batches, model=args.cost_model)
        plot(points, args.pareto, f"{spec.model.name} on {spec.mesh.n_devices} x {chip.name}")
        _pareto_report(points, skipped, args.pareto)
    reports = explain(spec, chip, phases, args.kv_fraction, args.cost_model)
    if args.json:
        print(json.dumps(to_json(spec, chip, reports), indent=2))
    else:
        sys.stdout.write(format_explain(spec, chip, reports))
    return EXIT_OK


def _pareto_report(points: list, skipped: list[str], path: Path) -> None:
    """What a --pareto sweep left out and warns about, and where it wrote, on stderr (stdout
    keeps the table or the JSON)."""
    from compiler.cost.pareto import warnings

    for line in skipped:
        print(f"pareto: skipped {line}", file=sys.stderr)
    for line in warnings(points):
        print(f"pareto: warning: {line}", file=sys.stderr)
    print(f"pareto: {len(points)} points written to {path}", file=sys.stderr)


def _explain_generation(args: argparse.Namespace, spec) -> int:
    from compiler.cost.generation import estimate_generation, format_generation

    chip = _chip(args, spec)
    prompt = args.prompt_len if args.prompt_len is not None else spec.serve.seq
    if args.pareto:
        from compiler.cost.pareto import DEFAULT_BATCHES, check_path, plot, sweep_generation

        check_path(args.pareto)
        batches = DEFAULT_BATCHES if not args.batches else tuple(_positive_ints(args.batches, "--batches"))
        points, skipped = sweep_generation(spec, chip, batches, prompt, args.new_tokens, args.cost_model)
        plot(points, args.pareto, f"{spec.model.name} on {spec.mesh.n_devices} x {chip.name}: prompt {prompt}, "
                                  f"{args.new_tokens} new tokens")
        _pareto_report(points, skipped, args.pareto)
    g = estimate_generation(spec, chip, prompt, args.new_tokens, args.cost_model)
    if args.json:
        print(json.dumps(g.to_json(), indent=2))
    else:
        sys.stdout.write(format_generation(spec, chip, g))
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




SUBCOMMANDS: list[Subcommand] = [
    Subcommand("compile", "build the IR of a spec (or read an .ir file) and run the pipeline",
               _args_compile, cmd_compile),
    Subcommand("run", "compile, execute prefill + decode steps with JAX, optionally check", _args_run, cmd_run),
    Subcommand("spec-from-hf", "write a spec for a Hugging Face checkpoint dir or a .gguf file",
               _args_spec_from_hf, cmd_spec_from_hf),
    Subcommand("explain", "price every candidate layout with the cost model (table, JSON, plot)",
               _args_explain, cmd_explain),
    Subcommand("passes", "list the registered passes and their options", _args_none, cmd_passes),
    serve_subcommand(),
    *generation_subcommands(),
    launch_subcommand(),
]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)  # usage errors exit EXIT_USAGE here
    args.argv = argv
    try:
        check_values(args, argv)
        with collective_errors():  # a peer lost mid-run: a DistributedError naming this process
            return args.handler(args)
    except EinshardError as e:
        e.hint = hints.prune(e.hint)  # never suggest a setting already in force
        print(e.render(), file=sys.stderr)
        status = EXIT_ERROR
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    except Exception:  # an internal bug: show everything
        traceback.print_exc()
        print("einshard: internal error (this is a bug; please report it with the command line)", file=sys.stderr)
        status = EXIT_INTERNAL
    if current_group() is not None:  # one process of several failed: leave now (runtime.distributed.abandon)
        abandon(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
