"""``einshard serve``: an OpenAI-compatible server for a checkpoint (a Hugging Face directory or
a .gguf file), on the engine of runtime/serving.

The flags pick the checkpoint, the layout (the usual spec overrides: ``--mesh``, ``--ffn``,
``--attn``, ``--weights``, ``--set``), the slot buffer (``--slots``, ``--context``) and the
scheduler (``--policy``, ``--no-compact``, ``--chunk``, ``--max-queue``). The model is compiled
and warmed up (one short request) before the port opens, so the first client does not pay for
compiling the common shapes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from compiler.argv import argv_location
from ir.errors import SpecError

#: KV memory the default slot count may take (bytes); ``--slots`` overrides.
DEFAULT_KV_BUDGET = 2 << 30
MAX_DEFAULT_SLOTS = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="model spec file (optional: the checkpoint describes its model; "
                   "a spec given is checked against it and its mesh and serve blocks are used)")
    p.add_argument("--checkpoint", type=Path, required=True, help="a Hugging Face checkpoint directory or a .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", help="the model id clients give (default: the checkpoint's name)")
    from compiler.generate_cmd import add_layout_args

    add_layout_args(p)
    from compiler.multiprocess import add_multiprocess_args

    add_multiprocess_args(p)
    from compiler.offload import add_offload_args

    add_offload_args(p)
    s = p.add_argument_group("engine")
    s.add_argument("--slots", type=int, help="KV slots = requests decoded together "
                   f"(default: what {DEFAULT_KV_BUDGET >> 30} GiB of KV cache holds, at most {MAX_DEFAULT_SLOTS})")
    s.add_argument("--context", type=int, default=1024, help="KV positions per slot: prompt + max_tokens (default 1024)")
    s.add_argument("--policy", choices=("fused", "static"), default="fused",
                   help="fused: temporal fusion (default); static: FasterTransformer-style batches")
    s.add_argument("--no-compact", dest="compact", action="store_false",
                   help="mask finished slots in place instead of compacting the live ones")
    s.add_argument("--chunk", type=int, default=0, help="chunked prefill (Dynamic SplitFuse): tokens of one forward per device, the decode rows "
                   "plus a chunk of a longer prompt; a power of two above the slots per device (0: off)")
    s.add_argument("--step-tokens", type=int, default=2048, help="token budget of one iteration / one admission prefill")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get HTTP 503")
    s.add_argument("--no-warmup", dest="warmup", action="store_false", help="open the port before compiling")


def load_model(checkpoint: Path, *, spec: str | None = None, mesh: str | None = None, ffn: str | None = None,
               attn: str | None = None, weights: str | None = None, sets: tuple[str, ...] = (), context: int = 1024,
               slots: int | None = None, devices: int | None = None,
               process: argparse.Namespace | None = None,
               offload: argparse.Namespace | None = None) -> tuple[Any, Any, Any, int]:
    """(spec, runner, tokenizer, slots) for a checkpoint: its model (checked against ``spec``
    when given), the layout the overrides give, weights on device, and the slot count (given,
    or what the KV budget holds). Loading is ``einshard generate``'s (compiler.generate_cmd);
    ``process`` carries the multi-process flags (compiler.multiprocess), if any; ``offload`` the
    offload flags (compiler.offload): a streamed runner (disk) or pinned-host weights (host)."""
    from compiler.generate_cmd import load
    from compiler.multiprocess import MULTIPROCESS_DESTS

    mp = {d: getattr(process, d, None) for d in MULTIPROCESS_DESTS} if process is not None else {}
    mode = getattr(offload, "offload", None)
    ld = load(argparse.Namespace(checkpoint=checkpoint, spec=spec, mesh=mesh, ffn=ffn, attn=attn, weights=weights,
                                 sets=list(sets), devices=devices, **mp), with_weights=mode != "disk")
    from compiler.generation import make_runner  # JAX only now: load() has set up the devices

    from compiler.limits import check_serving_memory, kv_values

    if slots is None:
        per_slot = kv_values(ld.spec.model, 1, context) * 4  # f32 keys and values
        slots = 1
        while slots * 2 <= MAX_DEFAULT_SLOTS and slots * 2 * per_slot <= DEFAULT_KV_BUDGET:
            slots *= 2
    from runtime.model_runner import on_cpu

    if on_cpu():  # on an accelerator the device's memory is what counts, and XLA reports it
        check_serving_memory(ld.spec, slots, context, "--slots or --context", rows="slots",
                             resident_weights=mode != "disk")
    if mode == "disk":
        from compiler.offload import disk_runner

        runner = disk_runner(offload, ld, context, slots)
    elif mode == "host":
        from compiler.offload import host_runner

        runner = host_runner(ld, context, slots)
    else:
        runner = make_runner(ld.spec, ld.weights, context, batch=slots)
    return ld.spec, runner, ld.tokenizer, slots


def check_listen(host: str, port: int, argv: list[str]) -> None:
    """A SpecError unless this process can listen on ``host:port`` now: a port in use or a host
    that is not this machine's otherwise fails only after minutes of loading (uvicorn exits 3)."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise SpecError(f"--host {host!r} is not an address: {getattr(e, 'strerror', None) or e}",
                        argv_location(argv, "--host")) from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(addr)
        except OSError as e:
            import errno

            in_use = e.errno == errno.EADDRINUSE
            raise SpecError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                            argv_location(argv, "--port" if in_use else "--host"),
                            hint="another process holds the port: give another --port" if in_use
                            else "--host must be an address of this machine (127.0.0.1, 0.0.0.0, ...)") from None


def build_server(args: argparse.Namespace) -> tuple[Any, str, int]:
    """(ASGI app, served model name, slots) from parsed ``serve`` arguments."""
    from runtime.serving.scheduler import SchedulerConfig  # no JAX: devices are set up by load_model

    if getattr(args, "process_id", None) in (None, 0):  # process 0 serves; the others follow it
        check_listen(args.host, args.port, getattr(args, "argv", []))
    if args.context < 2:
        raise SpecError(f"--context must be at least 2, got {args.context}")
    try:
        SchedulerConfig(slots=args.slots or 1, policy=args.policy, chunk=args.chunk, max_queue=args.max_queue)
    except ValueError as e:  # before minutes of loading
        raise SpecError(str(e)) from None
    from compiler.offload import check_offload_args

    check_offload_args(args)
    spec, runner, tok, slots = load_model(args.checkpoint, spec=args.spec, mesh=args.mesh, ffn=args.ffn, attn=args.attn,
                                          weights=args.weights, sets=tuple(args.sets), context=args.context,
                                          slots=args.slots, devices=args.devices, process=args,
                                          offload=args)
    from runtime.sampling import SamplingParams
    from runtime.serving.async_engine import AsyncEngine
    from runtime.serving.engine import Engine
    from runtime.serving.http import make_app
    from runtime.serving.request import Request

    try:
        cfg = SchedulerConfig(slots=slots, policy=args.policy, compact=args.compact, chunk=args.chunk,
                              step_tokens=args.step_tokens, max_queue=args.max_queue)
    except ValueError as e:
        raise SpecError(str(e)) from None
    kernels = None
    if args.offload == "disk":  # layers streamed from the store: host-looped programs
        from runtime.sampling import sample
        from runtime.serving.kernels_streamed import StreamedKernels

        kernels = StreamedKernels(runner, slots, 1, sample)
    from runtime.serving.errors import ServingError

    try:
        engine = Engine(runner, cfg, pad_token=tok.eos_token_ids[0] if tok.eos_token_ids else 0, kernels=kernels)
    except ServingError as e:  # a flag combination the engine refuses (a chunk within the slots per device)
        raise SpecError(e.message, argv_location(getattr(args, "argv", []), f"--{e.param}") if e.param else None,
                        hint="raise --chunk or lower --slots" if e.param == "chunk" else e.hint) from None
    if args.warmup:
        engine.submit(Request("warmup", (tok.bos_token_id or 0,), SamplingParams(), 2))
        engine.run()
        engine.reset_metrics()
    name = args.served_model_name or args.checkpoint.name
    from runtime.distributed import current, is_primary

    aeng = AsyncEngine(engine)
    if current() is not None:  # every process warmed up alike; process 0 serves, the others follow
        from runtime.serving.lockstep import channel, follow, lead

        if not is_primary():
            follow(engine, channel())
            return None, name, slots
        args.stop_followers = lead(aeng, channel())
    return make_app(aeng, tok, name, runner.cache_len), name, slots


def run(args: argparse.Namespace) -> int:
    import uvicorn

    app, name, slots = build_server(args)
    if app is None:  # a follower of a multi-process server: process 0 has shut down
        return 0
    print(f"einshard: serving '{name}' on http://{args.host}:{args.port} ({slots} slots, context {args.context}, "
          f"{args.policy}{'' if args.compact else ', masking'}{f', chunk {args.chunk}' if args.chunk else ''})",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    except SystemExit as e:  # uvicorn's startup failure (3), its error logged above: a documented exit 1
        if e.code in (0, None):
            raise
        raise SpecError(f"the server did not start on {args.host}:{args.port} (uvicorn exit {e.code})",
                        hint="see uvicorn's error above") from None
    stop = getattr(args, "stop_followers", None)
    if stop is not None:
        stop()
    return 0


def subcommand() -> Any:
    from compiler.subcommand import Subcommand

    return Subcommand("serve", "an OpenAI-compatible HTTP server for a checkpoint (temporal fusion engine)",
                      add_arguments, run)
