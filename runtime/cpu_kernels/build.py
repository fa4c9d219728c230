"""Compiles int_rows_dot.cc into a shared library in the user cache, once per source and jaxlib.

The library lands in ``$XDG_CACHE_HOME/einshard/kernels`` (``~/.cache`` when unset) under a
name that hashes the source, the flags, the compiler's version and jaxlib's version (whose FFI
headers it includes), so a changed source or a new jaxlib rebuilds it and several processes
(pytest workers) share one build: each compiles into a temporary file and renames it into
place, so none loads a half-written library. The flags name the ISA (AVX2), not
``-march=native``, so a cache shared between machines never holds code a CPU cannot run; the
library checks the CPU itself (``einshard_cpu_supported``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

from runtime.probe import default_cache_dir

SOURCE = Path(__file__).with_name("int_rows_dot.cc")
FLAGS = ("-O3", "-mavx2", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")


class BuildError(Exception):
    """The kernels could not be compiled here (no compiler, or it failed)."""


def cache_dir() -> Path:
    return default_cache_dir() / "kernels"


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise BuildError("no C++ compiler (g++, c++ or clang++) on PATH")
    return cxx


def build() -> Path:
    """The compiled library's path, compiling it first if the cache lacks it."""
    cxx = compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"{cxx} --version failed: {e}") from e
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version,
                                    jaxlib.__version__]).encode()).hexdigest()[:16]
    out = cache_dir() / f"int_rows_dot-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed:\n{r.stderr[:2000]}")
        os.replace(tmp, out)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"{' '.join(cmd)}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
