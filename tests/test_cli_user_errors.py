"""What a new user ran into walking through the README (session 14, helper "qa"): each case was a
traceback, an undocumented exit status, minutes of loading before a plain error, or a flag
accepted and silently ignored. Each is now a located error with exit 1, raised before any
checkpoint is read (the checkpoints given here do not exist, so a later check would say so).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from compiler import serve_cmd
from compiler.cli import EXIT_ERROR, main

ROOT = Path(__file__).resolve().parent.parent
MQA = str(ROOT / "examples" / "tiny-mqa.model")


def cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_serve_port_out_of_range(capsys, tmp_path: Path) -> None:
    # was: the model loaded and compiled, then uvicorn's OverflowError traceback, exit 70
    rc, err = cli(capsys, "serve", "--checkpoint", str(tmp_path / "none.gguf"), "--port", "99999")
    assert rc == EXIT_ERROR
    assert "--port must be a TCP port in 1 .. 65535, got 99999" in err


def test_serve_port_in_use_is_refused_before_loading(capsys, tmp_path: Path) -> None:
    # was: 20-70 s of loading, "serving on ..." printed, then uvicorn's bind error and exit 3
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        rc, err = cli(capsys, "serve", "--checkpoint", str(tmp_path / "none.gguf"), "--port", str(port))
    assert rc == EXIT_ERROR
    assert f"cannot listen on 127.0.0.1:{port}" in err and "give another --port" in err
    assert "no checkpoint" not in err  # refused before the checkpoint is looked at


def test_serve_host_not_of_this_machine(capsys, tmp_path: Path) -> None:
    rc, err = cli(capsys, "serve", "--checkpoint", str(tmp_path / "none.gguf"), "--host", "192.0.2.1")
    assert rc == EXIT_ERROR
    assert "cannot listen on 192.0.2.1:8000" in err and "--host must be an address of this machine" in err


def test_uvicorn_startup_failure_is_exit_1(capsys, monkeypatch, tmp_path: Path) -> None:
    # a port taken between the check and the bind: uvicorn logs its error and exits 3 (undocumented)
    import uvicorn

    def fail(*a, **k):
        raise SystemExit(3)

    monkeypatch.setattr(serve_cmd, "build_server", lambda args: (object(), "m", 1))
    monkeypatch.setattr(uvicorn, "run", fail)
    rc, err = cli(capsys, "serve", "--checkpoint", str(tmp_path / "none.gguf"), "--port", "1")  # port 1: not bound
    assert rc == EXIT_ERROR
    assert "the server did not start on 127.0.0.1:1 (uvicorn exit 3)" in err


def test_chat_with_prompt_ids_is_refused(capsys, tmp_path: Path) -> None:
    # was: --chat silently ignored, the ids generated from as given
    rc, err = cli(capsys, "generate", "--checkpoint", str(tmp_path / "none.gguf"), "--prompt-ids", "1,2", "--chat")
    assert rc == EXIT_ERROR
    assert "--chat wraps prompt text in the chat template" in err


def test_spmd_without_check_is_refused(capsys) -> None:
    # was: exit 0 with no simulator line (the simulator only runs under --check)
    rc, err = cli(capsys, "run", MQA, "--spmd")
    assert rc == EXIT_ERROR
    assert "--spmd runs the numpy SPMD simulator beside --check" in err and "add --check" in err


def test_listen_check_accepts_a_free_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_cmd.check_listen("127.0.0.1", port, [])  # no error: the socket it bound is closed again
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # and the port is free for the server


@pytest.mark.parametrize("mode", [[], ["--stream"]])
def test_prompt_ids_without_a_tokenizer_print_token_ids(capsys, tmp_path: Path, mode: list[str]) -> None:
    # was: "no tokenizer.json ... or pass token ids instead of text" although token ids were
    # passed; only --json worked. Now the plain output is the ids, transformers' greedy ones.
    from gen_helpers import hf_greedy, hf_model

    m = hf_model("llama")
    m.save_pretrained(tmp_path)  # weights and config only, no tokenizer
    rc = main(["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "5,17,42", "--max-new-tokens", "6",
               "--ignore-eos", *mode])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip() == ",".join(map(str, hf_greedy(m, [5, 17, 42], 6)))
    rc, err = cli(capsys, "generate", "--checkpoint", str(tmp_path), "--prompt-ids", "5,17", "--stop", "x")
    assert rc == EXIT_ERROR and "--stop matches text, which needs the checkpoint's tokenizer" in err


@pytest.mark.parametrize("flag,value,message", [
    ("--slots", "0", "--slots must be a count >= 1, got 0"),  # was: "slots must be >= 1 and max_queue >= 0"
    ("--max-queue", "-1", "--max-queue must be a count >= 0, got -1"),
    ("--step-tokens", "0", "--step-tokens must be a token count >= 1, got 0"),  # was accepted
    ("--chunk", "-4", "--chunk must be 0 (off) or a power of two, got -4"),
])
def test_serve_engine_flags_point_into_the_command_line(capsys, tmp_path: Path, flag: str, value: str,
                                                        message: str) -> None:
    rc, err = cli(capsys, "serve", "--checkpoint", str(tmp_path / "none.gguf"), flag, value)
    assert rc == EXIT_ERROR and message in err and err.startswith("<command line>:1:")


def test_generate_and_serve_refuse_a_kv_cache_beyond_memory(capsys, tmp_path: Path) -> None:
    # was: no check; XLA allocated (and zero-filled) the cache, failing deep inside or swapping the machine
    from gen_helpers import checkpoint_with_tokenizer

    checkpoint_with_tokenizer(tmp_path)  # serve needs the tokenizer
    rc, err = cli(capsys, "generate", "--checkpoint", str(tmp_path), "--prompt-ids", "1,2", "--batch", "1000000000")
    assert rc == EXIT_ERROR and "batch 1000000000 x context 40 needs at least" in err and "lower --batch" in err
    rc, err = cli(capsys, "serve", "--checkpoint", str(tmp_path), "--slots", "64", "--context", "10000000000")
    assert rc == EXIT_ERROR and "slots 64 x context 10000000000 needs at least" in err and "lower --slots" in err


def test_serving_memory_is_a_lower_bound_of_smollm2s_sizes() -> None:
    from compiler.limits import check_serving_memory, serving_memory_bytes
    from compiler.spec import load_spec
    from ir.errors import SpecError

    spec = load_spec(str(ROOT / "examples" / "tiny-gqa.model"))
    m = spec.model
    parts = serving_memory_bytes(spec, 4, 100)
    assert parts["KV cache"] == m.layers * 2 * 4 * 100 * m.kv_heads * m.d_head * 2
    assert parts["weights"] >= m.layers * 2 * m.d_model * m.d_ff * 4
    assert serving_memory_bytes(spec, 4, 100, resident_weights=False)["weights"] == 0
    check_serving_memory(spec, 4, 100, "--batch", available=sum(parts.values()))
    with pytest.raises(SpecError, match="batch 4 x context 100 needs"):
        check_serving_memory(spec, 4, 100, "--batch", available=sum(parts.values()) - 1)


def test_serve_chunk_within_the_slots_points_at_chunk(capsys, tmp_path: Path) -> None:
    # was: "request error: a chunk budget of 4 tokens must exceed ..." (an HTTP error kind, no location)
    from gen_helpers import checkpoint_with_tokenizer

    checkpoint_with_tokenizer(tmp_path)
    capsys.readouterr()  # the save's progress bar
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    rc, err = cli(capsys, "serve", "--checkpoint", str(tmp_path), "--slots", "4", "--chunk", "4", "--context", "64",
                  "--port", port, "--no-warmup")
    assert rc == EXIT_ERROR and err.startswith("<command line>:1:") and "spec error: a chunk budget of 4 tokens" in err
    assert "raise --chunk or lower --slots" in err


def test_spec_from_hf_given_a_spec_file(capsys) -> None:
    # was: "config.json is not valid JSON" about a file that is not named config.json
    rc, err = cli(capsys, "spec-from-hf", MQA)
    assert rc == EXIT_ERROR and "tiny-mqa.model is not valid JSON" in err
    assert "give a Hugging Face checkpoint directory, its config.json or a .gguf file" in err
