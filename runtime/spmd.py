"""numpy SPMD simulator: one thread per device, each holding only its local blocks.

Every device interprets the same sharded function with the shared kernel rules; collectives
meet at a rendezvous where each device contributes its block and takes what the collective
gives it. A missing or wrong collective therefore shows up as a wrong answer (or replicas that
disagree, which ``assemble`` checks) without JAX in the loop.
"""

from __future__ import annotations

import itertools
import math
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from ir.errors import CheckError
from ir.module import Module
from ir.types import TensorType
from runtime.kernels import Interpreter
from runtime.reference import NumpyBackend, to_backend_array


#: Replicas of a result that a looped collective einsum summed in device-dependent order may
#: differ by rounding; relative to the largest magnitude, float64 keeps them within this.
LOOPED_REPLICA_RTOL = 1e-12


class Rendezvous:
    """All devices deposit a value, wait, read everyone's, wait again."""

    def __init__(self, n: int):
        self.n = n
        self.slots: list[Any] = [None] * n
        self.barrier = threading.Barrier(n, timeout=120)

    def exchange(self, dev: int, value: Any) -> list[Any]:
        self.slots[dev] = value
        self.barrier.wait()
        vals = list(self.slots)
        self.barrier.wait()
        return vals


class Mesh:
    """Device coordinates of a mesh with named axes (row-major, first axis major)."""

    def __init__(self, axes: Sequence[tuple[str, int]]):
        self.axes = tuple(axes)
        self.names = tuple(a for a, _ in self.axes)
        self.sizes = dict(self.axes)
        self.coords = [dict(zip(self.names, c)) for c in itertools.product(*(range(s) for _, s in self.axes))]

    @property
    def n(self) -> int:
        return len(self.coords)

    def index(self, coord: Mapping[str, int], axes: Sequence[str]) -> int:
        """Composite index of a device along ``axes`` (major first)."""
        i = 0
        for a in axes:
            i = i * self.sizes[a] + coord[a]
        return i

    def group(self, dev: int, axes: Sequence[str]) -> list[int]:
        """The devices that differ from ``dev`` only along ``axes``, in composite order."""
        me = self.coords[dev]
        members = [d for d, c in enumerate(self.coords) if all(c[a] == me[a] for a in self.names if a not in axes)]
        return sorted(members, key=lambda d: self.index(self.coords[d], axes))


class SpmdBackend(NumpyBackend):
    def __init__(self, mesh: Mesh, dev: int, rv: Rendezvous, float_type: type = np.float64):
        super().__init__(float_type)
        self.m, self.dev, self.rv = mesh, dev, rv
        self.mesh = mesh.sizes

    def _members(self, x, axes):
        vals = self.rv.exchange(self.dev, x)
        return [vals[d] for d in self.m.group(self.dev, axes)]

    def group_size(self, axes):
        return math.prod(self.m.sizes[a] for a in axes)

    def axis_index(self, axes):
        return self.m.index(self.m.coords[self.dev], axes)

    def axis_offset(self, t: TensorType, dim: str):
        axes = t.dim(dim).axes
        return self.axis_index(axes) * (t.size(dim) // self.group_size(axes)) if axes else 0

    def psum(self, x, axes):
        return sum(self._members(x, axes))

    def all_gather(self, x, axes, axis):
        return np.concatenate(self._members(x, axes), axis=axis)

    def psum_scatter(self, x, axes, axis):
        total = sum(self._members(x, axes))
        return np.split(total, self.group_size(axes), axis=axis)[self.axis_index(axes)]

    def all_to_all(self, x, axes, split, concat):
        me = self.axis_index(axes)
        parts = [np.split(v, self.group_size(axes), axis=split)[me] for v in self._members(x, axes)]
        return np.concatenate(parts, axis=concat)

    def pmax(self, x, axes):
        return np.maximum.reduce(self._members(x, axes))

    def ppermute(self, x, axes, shift):
        """Every device sends to the one ``shift`` places after it in the group's ring."""
        members = self._members(x, axes)
        return members[(self.axis_index(axes) - shift) % len(members)]


def local_block(x: np.ndarray, t: TensorType, mesh: Mesh, dev: int) -> np.ndarray:
    """Device ``dev``'s block of the global array ``x`` laid out as ``t``."""
    idx = []
    for d, n in zip(t.dims, x.shape):
        if not d.axes:
            idx.append(slice(None))
            continue
        k = math.prod(mesh.sizes[a] for a in d.axes)
        size = n // k
        i = mesh.index(mesh.coords[dev], d.axes)
        idx.append(slice(i * size, (i + 1) * size))
    return x[tuple(idx)]


def assemble(blocks: Sequence[np.ndarray], t: TensorType, mesh: Mesh, what: str, rtol: float = 0.0) -> np.ndarray:
    """The global array from per-device blocks; replicas must agree exactly (or, where ``rtol``
    allows, to rounding relative to the largest magnitude)."""
    if t.partial:
        raise CheckError(f"{what} is still a partial sum over {sorted(t.partial)}")
    out = np.zeros(t.shape, dtype=blocks[0].dtype)
    seen = np.zeros(t.shape, dtype=bool)
    for dev, b in enumerate(blocks):
        idx = []
        for d in t.dims:
            if not d.axes:
                idx.append(slice(None))
                continue
            k = math.prod(mesh.sizes[a] for a in d.axes)
            size = d.size // k
            i = mesh.index(mesh.coords[dev], d.axes)
            idx.append(slice(i * size, (i + 1) * size))
        ix = tuple(idx)
        if seen[ix].any():
            tol = rtol * float(np.max(np.abs(b))) if rtol and b.size and b.dtype.kind == "f" else 0.0
            if not (np.array_equal(out[ix], b) or (tol and np.max(np.abs(out[ix] - b)) <= tol)):
                raise CheckError(f"{what}: replicas on different devices disagree (max diff "
                                 f"{float(np.max(np.abs(out[ix] - b)))}); a collective is missing or wrong")
        out[ix] = b
        seen[ix] = True
    return out


def run_spmd(module: Module, entry: str, args: Mapping[str, np.ndarray],
             float_type: type = np.float64) -> tuple[np.ndarray, ...]:
    """Runs ``entry`` on every device of the module's mesh and assembles the global results."""
    fn = module.function(entry)
    mesh = Mesh(module.mesh or (("_", 1),))
    rv = Rendezvous(mesh.n)
    results: list[tuple | None] = [None] * mesh.n
    errors: list[BaseException] = []

    def work(dev: int) -> None:
        try:
            local = [to_backend_array(local_block(np.asarray(args[p.name]), p.type, mesh, dev), p.type, float_type)
                     for p in fn.params]
            results[dev] = Interpreter(module, SpmdBackend(mesh, dev, rv, float_type)).call(fn, local)
        except threading.BrokenBarrierError:
            pass
        except BaseException as e:  # surfaced below, after every thread stops
            errors.append(e)
            rv.barrier.abort()

    threads = [threading.Thread(target=work, args=(d,)) for d in range(mesh.n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    # A looped collective einsum adds its partial products in a ring order that starts at each
    # device's own chunk, so replicated results agree only to rounding (float64: ~1e-16).
    looped = any(op.kind == "collective_einsum" for f in module.functions for op in f.ops)
    rtol = LOOPED_REPLICA_RTOL if looped else 0.0
    outs = []
    for i, t in enumerate(fn.result_types):
        outs.append(assemble([r[i] for r in results], t, mesh, f"@{entry} result {i}", rtol))  # type: ignore[index]
    return tuple(outs)


class SpmdExecutor:
    """Executor (see runtime/generate.py) that runs the simulator."""

    name = "spmd"

    def __init__(self, module: Module, float_type: type = np.float64):
        self.module, self.float_type = module, float_type

    def call(self, entry: str, args: Mapping[str, Any]) -> tuple:
        return run_spmd(self.module, entry, args, self.float_type)

    @staticmethod
    def to_host(x: Any) -> np.ndarray:
        return np.asarray(x)
