"""Multi-process runs on jax.distributed: `einshard launch`, the process flags, and the faults.

Every process here is a real OS process on loopback (gloo collectives on CPU). Starting one costs
seconds on this machine, so CI runs a compact set (2 and 4 processes, one layout pair each,
generate, the faults) and the full layout matrix is marked slow. Every subprocess has a timeout
and every test that starts processes stops them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from compiler.launch import Plan, free_port, plan, run_processes
from compiler.multiprocess import process_group
from conftest import EXAMPLES, ROOT
from ir.errors import SpecError
from passes.layouts import ATTN_LAYOUTS, FFN_LAYOUTS

PY = sys.executable
#: Longest a launched command may take here (compiles included) before the test fails.
LIMIT = 240


def einshard(*argv: str, timeout: float = LIMIT) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "compiler.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def launched_run(n: int, *argv: str) -> dict:
    """`einshard launch -n N -- run ... --check --json`: process 0's one JSON report."""
    r = einshard("launch", "-n", str(n), "--", "run", *argv, "--check", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)  # one object: only process 0 printed


# ---- flags and plans (no processes) ----------------------------------------------------------


class _Args:
    def __init__(self, **kw):
        self.coordinator = self.num_processes = self.process_id = self.devices = None
        self.init_timeout, self.peer_timeout = 60, 10
        self.__dict__.update(kw)


def test_process_group_from_flags() -> None:
    assert process_group(_Args(), 8) is None
    g = process_group(_Args(coordinator="h:1234", num_processes=2, process_id=1), 8)
    assert (g.num_processes, g.process_id, g.local_devices, g.coordinator) == (2, 1, 4, "h:1234")


@pytest.mark.parametrize("kw,match", [
    (dict(coordinator="h:1"), "needs --num-processes, --process-id"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), "process-id must be in 0 .. 1"),
    (dict(coordinator="h", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator="h:99999", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator="h:1", num_processes=3, process_id=0), "8 devices do not split evenly over 3"),
    (dict(coordinator="h:1", num_processes=2, process_id=0, peer_timeout=0), "--peer-timeout must be >= 1"),
])
def test_bad_process_flags(kw, match) -> None:
    with pytest.raises(SpecError, match=match):
        process_group(_Args(**kw), 8)


def test_a_mesh_must_span_every_process_device() -> None:
    from compiler.multiprocess import join

    with pytest.raises(SpecError, match="8 devices \\(--devices\\) but the mesh has 4"):
        join(_Args(coordinator="h:1", num_processes=2, process_id=0, devices=8), 4)


def test_launch_plan(tmp_path) -> None:
    pl = plan(["--", "run", "m.model", "--check"], 2, 4321, tmp_path, devices_per_process=4, init_timeout=9)
    assert pl.argvs[1][-10:] == ("--devices", "8", "--init-timeout", "9", "--coordinator", "127.0.0.1:4321",
                                 "--num-processes", "2", "--process-id", "1")
    assert pl.logs == (None, tmp_path / "process-1.log")
    for cmd, match in ((["compile", "m.model"], "not 'compile'"), (["run", "m", "--process-id", "0"], "itself"),
                       ([], "needs a command")):
        with pytest.raises(SpecError, match=match):
            plan(cmd, 2, 1, tmp_path)


# ---- run --check across processes -------------------------------------------------------------

# (processes, mesh, ffn, attn, model): 2 x 2 devices in CI, 4 x 1 slow (each launch costs ~30 s here)
CI_RUNS = [(2, "x=2,y=2", "2d-ws", "heads", "tiny-gqa"),
           pytest.param(4, "x=2,y=2", "wg-xy", "batch", "tiny-mqa", marks=pytest.mark.slow)]


@pytest.mark.parametrize("n,mesh,ffn,attn,model", CI_RUNS, ids=["2p-2d-ws-heads", "4p-wg-xy-batch"])
def test_launch_run_check_equals_reference(n, mesh, ffn, attn, model) -> None:
    rep = launched_run(n, str(EXAMPLES / f"{model}.model"), "--mesh", mesh, "--ffn", ffn, "--attn", attn)
    assert rep["ok"] and rep["checked"] and rep["max_rel_err"] <= rep["tolerance"]
    assert rep["config"]["mesh"] == {"x": 2, "y": 2} and rep["ledger"]  # collectives crossed processes


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_every_layout(n, tmp_path, capfd, monkeypatch) -> None:
    """Every FFN x attention layout on x=2,y=2,z=2 over 2 processes x 4 devices and 4 x 2, all
    checked against the reference inside one group (tests/mp_every_layout.py).

    The processes compile at XLA's backend optimization level 0 (the same programs and
    collectives, less optimized machine code): what is checked is each layout's cross-process
    collectives, and compiling 20 programs per process was nearly all of the test's time
    (test_every_layout[2]: 106 -> 63 s of CPU, 105 -> 49 s wall, cold cache).
    test_launch_run_check_equals_reference keeps XLA's defaults."""
    monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip())
    pl = plan(["run", str(EXAMPLES / "tiny-gqa.model"), "--mesh", "x=2,y=2,z=2"], n, free_port(), tmp_path)
    worker = str(ROOT / "tests" / "mp_every_layout.py")
    argvs = tuple(tuple(a if a != "-m" else worker for a in argv if a != "compiler.cli") for argv in pl.argvs)
    assert all(worker in a for a in argvs)
    assert run_processes(Plan(argvs, pl.logs), grace=10, timeout=LIMIT * 2) == 0
    out = capfd.readouterr().out
    dec, reports, i = json.JSONDecoder(), [], out.find("{")
    while i >= 0:
        rep, end = dec.raw_decode(out, i)
        reports.append(rep)
        i = out.find("{", end)
    assert len(reports) == len(FFN_LAYOUTS) * len(ATTN_LAYOUTS)  # only process 0 printed
    for rep in reports:
        assert rep["ok"] and rep["checked"] and rep["max_rel_err"] <= rep["tolerance"], rep["config"]
    assert {(r["config"]["serve"]["ffn"], r["config"]["serve"]["attn"]) for r in reports} == \
        {(f, a) for f in FFN_LAYOUTS for a in ATTN_LAYOUTS}


# ---- generate across processes ----------------------------------------------------------------


@pytest.fixture(scope="module", params=[pytest.param("safetensors", marks=pytest.mark.slow), "gguf"])
def tiny_llama(request, tmp_path_factory):
    """A tiny Llama saved by transformers, or written as a GGUF (every storage type, q/k rows
    permuted: tests/test_gguf.py) and read back by transformers' GGUF loader for the oracle.
    CI launches the GGUF only (each launch costs ~25 s here): the lazy, per-process path from
    generate to make_array_from_callback is the same for both, and tests/test_sliced_weights.py
    checks safetensors blocks."""
    import torch
    import transformers

    from gen_helpers import PROMPTS, hf_greedy, hf_model

    d = tmp_path_factory.mktemp("mp-llama")
    if request.param == "gguf":
        from test_gguf import _write_tiny_gguf

        _write_tiny_gguf(d / "tiny.gguf", tied=False)
        m = transformers.AutoModelForCausalLM.from_pretrained(str(d), gguf_file="tiny.gguf",
                                                              dtype=torch.float32).eval()
        d = d / "tiny.gguf"
    else:
        m = hf_model("llama")
        m.save_pretrained(d)
    prompt = [t % 96 for t in PROMPTS[0]]  # inside the GGUF's vocabulary
    return d, prompt, hf_greedy(m, prompt, 8)


def test_launch_generate_equals_transformers(tiny_llama) -> None:
    """Two processes x two devices give transformers' greedy tokens (as one process does:
    test_generate_cli.py), each process reading only its devices' blocks of the safetensors
    or GGUF file (runtime/sliced_weights.py)."""
    d, prompt, want = tiny_llama
    r = einshard("launch", "-n", "2", "--", "generate", "--checkpoint", str(d), "--prompt-ids",
                 ",".join(map(str, prompt)), "--max-new-tokens", "8", "--mesh", "x=2,y=2", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["tokens"] == [want]


@pytest.mark.slow
def test_launch_generate_int8_equals_one_process(tmp_path) -> None:
    """int8 weights are quantized on device by @prepare; across processes they stay there (a
    global array cannot be read back whole) and give one process's tokens."""
    from test_gguf import _write_tiny_gguf

    _write_tiny_gguf(tmp_path / "tiny.gguf", tied=False)
    argv = ["generate", "--checkpoint", str(tmp_path / "tiny.gguf"), "--prompt-ids", "1,5,7,9,11",
            "--max-new-tokens", "8", "--mesh", "x=2,y=2", "--weights", "int8", "--json"]
    one, two = einshard(*argv), einshard("launch", "-n", "2", "--", *argv)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    assert json.loads(two.stdout)["tokens"] == json.loads(one.stdout)["tokens"]


# ---- faults: every process ends, in bounded time, naming itself --------------------------------


def _timed(*argv: str, limit: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = einshard(*argv, timeout=limit + 60)
    return r, time.monotonic() - t0


RUN = ["run", str(EXAMPLES / "tiny-gqa.model"), "--mesh", "x=2"]


def test_peer_never_arrives() -> None:
    r, took = _timed(*RUN, "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "0",
                     "--init-timeout", "2", limit=30)
    assert r.returncode == 1 and took < 30
    assert "distributed error: process 0 of 2: the other processes did not all join" in r.stderr


def test_coordinator_port_in_use() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r, took = _timed(*RUN, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0",
                         "--init-timeout", "5", limit=30)
    assert r.returncode == 1 and took < 30
    assert "process 0 of 2: cannot start the coordinator on 127.0.0.1:" in r.stderr
    assert "Traceback" not in r.stderr


def _peer(port: int, pid: int, live_s: float) -> subprocess.Popen:
    """A process that joins the group as ``pid`` (1 device) and dies (exit 9) after ``live_s``."""
    code = textwrap.dedent(f"""
        import os, time
        from runtime.distributed import ProcessGroup, initialize
        initialize(ProcessGroup("127.0.0.1:{port}", 2, {pid}, 1, 30, 2))
        time.sleep({live_s})
        os._exit(9)
    """)
    return subprocess.Popen([PY, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("dead,me,match", [
    (1, 0, r"distributed error: process 0 of 2: (a collective failed because )?process 1 has died"),
    (0, 1, r"distributed error: process 1 of 2: (a collective failed because )?process 0 \(the coordinator at "
           r"127\.0\.0\.1:\d+\) has died"),
], ids=["peer-dies", "coordinator-dies"])
def test_a_process_dies(dead, me, match) -> None:
    """Whichever path notices first (the peer monitor, a failed collective, or JAX's own abort when
    the coordinator goes, caught by runtime/abort_guard.py), the survivor exits 1 naming the dead
    process; never JAX's bare abort (134)."""
    port = free_port()
    peer = _peer(port, dead, 1.0)
    try:
        r, took = _timed(*RUN, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(me),
                         "--init-timeout", "30", "--peer-timeout", "2", limit=60)
    finally:
        peer.kill()
        peer.wait()
    assert r.returncode == 1, r.stderr[-2000:]
    assert re.search(match, r.stderr), r.stderr[-2000:]
    assert took < 60


def test_abort_guard_reports_instead_of_an_abort() -> None:
    """The mechanism behind the coordinator-dies case, without JAX: an abort() from a native call
    on another thread (as JAX's error poll aborts) prints our message and exits 1, not 134."""
    code = textwrap.dedent("""
        import ctypes, threading, time
        from runtime import abort_guard
        assert abort_guard.install(lambda: "distributed error: process 1 of 2: process 0 has died", 1)
        threading.Thread(target=ctypes.CDLL(None).abort).start()
        time.sleep(30)
    """)
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().endswith("distributed error: process 1 of 2: process 0 has died")


def test_launch_shows_a_failing_process_and_its_status() -> None:
    r = einshard("launch", "-n", "2", "--", *RUN, "--ffn", "no-such-layout")
    assert r.returncode == 1
    assert "launch: process 1 exited with 1" in r.stderr and "[1] " in r.stderr


def _sleeper(pidfile: Path, status: int, seconds: float) -> tuple[str, ...]:
    return (PY, "-c", f"import os, sys, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
                      f"time.sleep({seconds}); sys.exit({status})")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_launch_kills_the_rest_after_a_failure(tmp_path, capsys) -> None:
    """One process fails at once, the other would hang: it is killed after the grace period and
    the worst status (137, killed) comes back."""
    # process 1 fails once process 0 has written its pid (not after a fixed 0.2 s: on a loaded
    # machine process 0 could be killed before it starts, leaving no pid to check)
    fail_after_0 = (PY, "-c", f"import pathlib, sys, time; p = pathlib.Path({str(tmp_path / '0')!r}); "
                              f"end = time.monotonic() + 60\n"
                              f"while not (p.exists() and p.read_text()) and time.monotonic() < end: time.sleep(0.05)\n"
                              f"sys.exit(3)")
    pl = Plan((_sleeper(tmp_path / "0", 0, 120), fail_after_0), (None, tmp_path / "1.log"))
    t0 = time.monotonic()
    assert run_processes(pl, grace=1.0, timeout=None) == 128 + signal.SIGKILL
    assert time.monotonic() - t0 < 30
    assert _gone(int((tmp_path / "0").read_text()))
    err = capsys.readouterr().err
    assert "process 1 exited with 3" in err and "killing process(es) 0" in err


def test_launch_names_a_process_killed_by_a_signal(tmp_path, capsys) -> None:
    """A process that dies by a signal is reported by number and name, and its status is 128 + it."""
    killer = (PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    pl = Plan((_sleeper(tmp_path / "0", 0, 0), killer), (None, tmp_path / "1.log"))
    assert run_processes(pl, grace=5.0, timeout=60) == 128 + signal.SIGKILL
    assert "launch: process 1 was killed by signal 9 (SIGKILL)" in capsys.readouterr().err


def test_launch_ctrl_c_stops_every_process(tmp_path) -> None:
    code = (f"import sys; from pathlib import Path; from compiler.launch import Plan, run_processes; "
            f"sys.exit(run_processes(Plan(({_sleeper(tmp_path / '0', 0, 120)!r}, {_sleeper(tmp_path / '1', 0, 120)!r}),"
            f" (None, Path({str(tmp_path / '1.log')!r}))), 5.0, None))")
    p = subprocess.Popen([PY, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        # both pids written (a file exists from open() on, before the pid is in it; a child
        # interrupted in between would leave it empty)
        while not all((tmp_path / i).exists() and (tmp_path / i).read_text() for i in "01"):
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 130
    finally:
        p.kill()
    for i in "01":
        pid = int((tmp_path / i).read_text())
        for _ in range(50):
            if _gone(pid):
                break
            time.sleep(0.1)
        assert _gone(pid)


# ---- serve across processes ---------------------------------------------------------------------


@pytest.mark.slow
def test_launch_serve_greedy_tokens_equal_transformers(tmp_path) -> None:
    """Two processes serve one sharded slot buffer (process 0 leads, process 1 follows in
    lockstep); a completion's tokens are transformers' greedy ones, and Ctrl-C stops both."""
    import httpx
    import torch

    from gen_helpers import checkpoint_with_tokenizer

    d = tmp_path / "ck"
    d.mkdir()
    m = checkpoint_with_tokenizer(d)
    prompt = list(range(30, 50))
    with torch.no_grad():
        want = m.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    port = free_port()
    log = (tmp_path / "launch.log").open("w")
    p = subprocess.Popen([PY, "-m", "compiler.cli", "launch", "-n", "2", "--log-dir", str(tmp_path), "--", "serve",
                          "--checkpoint", str(d), "--mesh", "x=2", "--attn", "batch", "--slots", "4", "--context", "64",
                          "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + LIMIT
        while True:
            assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "launch.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": "ck", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True})
        assert r.json()["choices"][0]["token_ids"] == want[0, len(prompt):].tolist()
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 130
    finally:
        p.kill()
        p.wait()
        log.close()
