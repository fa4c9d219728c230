"""Chips the cost model knows: peak matmul FLOP/s, HBM capacity and bandwidth, interconnect.

Bandwidth convention (used everywhere in the cost model, stated once here):

* **Interconnect.** ``ici_bw`` is the paper's single "network bandwidth" constant: the sum, over
  the chip's links, of the bandwidth in *one* direction. On TPU v4 that is 6 links x 45 GB/s =
  270 GB/s, the figure the paper quotes (reference/partitioning.md §2). Every collective moves
  the bytes the collective ledger charges it (the paper's accounting, §4.3: an all-gather its
  per-device output, a reduce-scatter its per-device input, an all-reduce twice its input, an
  all-to-all its input) at ``ici_bw``, whatever mesh axes it spans, with App. A.1's (K-1)/K
  dropped as the paper's analysis drops it (kept, it makes 1- and 2-axis collectives cheaper
  than those axes' links carry under this one constant, and moves Fig. 3's crossovers: WG-XY
  to WG-XYZ from 786,432 tokens to 1,048,576).
  This is the convention under which the paper derived its layouts (X = 0.5 sqrt(n) for 2D
  weight-stationary, 2D beats 1D past 16 chips, §5.2); the scaling-book's per-axis convention
  (k axes give k x W_ici) would move those optima (§5.3). Achieved fractions of these peaks
  are not here: compiler/cost/efficiency.py holds them per chip, fitted to measurements.
* **Latency.** A collective takes at least ``hops x hop_latency_s``: on a torus, hops =
  sum over its axes of floor(size / 2) (a bidirectional ring per axis, scaling-book §12.3); on a
  switch (NVLink) or in shared memory (simulated CPU devices), one hop. The TPU entries set it
  to 0, as the paper's collective model (App. A.1) has no latency term; the scaling-book's
  ~1 us per hop would make the many small collectives of 2D layouts at decode latency-bound
  and move the 1D/2D crossover (a chip file can set it).
* **HBM.** ``hbm_bw`` is the chip's memory bandwidth; ``hbm_bytes`` its capacity.
* **Compute.** ``flops`` maps the einsum's arithmetic dtype to the chip's dense peak. int8
  weights are dequantized to bf16 before their einsums (the paper's §4.4), so they run at the
  bf16 peak; a dtype missing from the table runs at the bf16 peak.

Sources are given per chip. Users add a chip with a small TOML file (``--hardware FILE``)::

    name = "my-chip"
    source = "vendor datasheet"
    flops_bf16 = 4.0e14      # FLOP/s; flops_f32, flops_int8 optional
    hbm_bytes = 34359738368
    hbm_bw = 1.6e12          # bytes/s
    ici_bw = 3.0e11          # bytes/s, one direction, summed over links
    hop_latency_s = 1e-6     # optional
    topology = "torus"       # torus | switch | shared-memory
    dcn_bw = 2.5e10          # optional: bytes/s per chip between hosts (InfiniBand, DCN)
    dcn_latency_s = 5e-6     # optional
    host_devices = 8         # optional: chips per host (consecutive in the mesh's device order)
    host_bw = 2.5e10         # optional: bytes/s host memory -> chip (PCIe), for --offload host
    disk_bw = 7.0e9          # optional: bytes/s disk -> host (NVMe), for --offload disk

    [efficiency]             # optional: the calibrated model's fit (compiler/cost/efficiency.py)
    flops = 0.7              # achieved fraction of peak FLOP/s on large matmuls
    matmul_half = 256        # smallest local matmul dim at which that fraction halves
    hbm = 0.8                # achieved fraction of hbm_bw
    link = 1.0               # achieved fraction of ici_bw
    step_latency_s = 1e-6    # per ring step of a collective
    convert_s = 0            # per element of an int8/bf16 weight converted inside its dot (CPU)
    layer_overhead_s = 0     # per layer call
    source = "my fit"

``cpu`` is measured on the spot by ``runtime/probe.py`` (JAX, imported only then) and cached.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from compiler.cost.efficiency import Efficiency
from ir.errors import CostError, did_you_mean
from ir.textfile import read_user_text

GiB = 1 << 30
TOPOLOGIES = ("torus", "switch", "shared-memory")


@dataclass(frozen=True)
class Chip:
    name: str
    flops: Mapping[str, float] | tuple  # dense peak FLOP/s by arithmetic dtype (bf16 required); stored as pairs
    hbm_bytes: int
    hbm_bw: float  # bytes/s
    ici_bw: float  # bytes/s, one direction, summed over the chip's links (the paper's constant)
    hop_latency_s: float = 0.0
    topology: str = "torus"
    source: str = ""
    #: Fixed cost of launching one op (s); measured for ``cpu``, 0 for accelerators (lower bound).
    op_overhead_s: float = 0.0
    #: Achieved efficiencies for the ``calibrated`` model, when the chip file gives them
    #: (compiler/cost/efficiency.py; table chips keep theirs there, in ``CALIBRATED``).
    efficiency: Efficiency | None = None
    #: Links between hosts (data-center network: InfiniBand between GPU nodes, DCN between TPU
    #: slices): bytes/s per chip, one direction, and latency per transfer. A collective whose
    #: group spans more than one host (``host_devices`` chips each, consecutive in the mesh's
    #: row-major device order) runs at this bandwidth; 0: no slower links (one host).
    dcn_bw: float = 0.0
    dcn_latency_s: float = 0.0
    host_devices: int = 0
    #: Offloading (compiler/cost/offload.py): bytes/s from host memory to the chip (PCIe) and
    #: from the disk (NVMe); 0: the offload model's LINKS table (or the probe, for ``cpu``).
    host_bw: float = 0.0
    disk_bw: float = 0.0
    #: A measured chip (``cpu``): when its figures were measured (unix seconds; 0: a datasheet
    #: or file chip) and runtime/probe.py's account of how (load, key, cached or measured now).
    measured_at: float = 0.0
    probe_info: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "flops", tuple(sorted(dict(self.flops).items())))  # hashable
        if "bf16" not in dict(self.flops):
            raise CostError(f"chip {self.name!r}: flops needs a bf16 entry")
        for what, v in (("hbm_bytes", self.hbm_bytes), ("hbm_bw", self.hbm_bw), ("ici_bw", self.ici_bw),
                        *((f"flops_{k}", v) for k, v in dict(self.flops).items())):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise CostError(f"chip {self.name!r}: {what} must be a positive number, got {v!r}")
        if self.topology not in TOPOLOGIES:
            raise CostError(f"chip {self.name!r}: unknown topology {self.topology!r}",
                            hint=did_you_mean(self.topology, TOPOLOGIES))

    def peak(self, dtype: str) -> float:
        table: dict[str, float] = dict(self.flops)
        return table.get(dtype, table["bf16"])

    def hops(self, axes: tuple[str, ...], mesh: Mapping[str, int]) -> int:
        if self.topology != "torus":
            return 1
        return max(1, sum(mesh[a] // 2 for a in axes))

    def crosses_hosts(self, axes: tuple[str, ...], mesh: Mapping[str, int]) -> bool:
        """Whether a group over ``axes`` spans more than one host: the device-index span of the
        group (mesh row-major, first axis major) exceeds ``host_devices``."""
        if not self.dcn_bw or not self.host_devices:
            return False
        stride, span = 1, 0
        for a in reversed(list(mesh)):
            if a in axes:
                span += (mesh[a] - 1) * stride
            stride *= mesh[a]
        return span + 1 > self.host_devices

    def collective_seconds(self, nbytes: float, axes: tuple[str, ...], mesh: Mapping[str, int]) -> float:
        """Time of one collective that the ledger charges ``nbytes`` per device (the paper's
        volume, (K-1)/K dropped), or its hops' latency if longer; over the host links
        (``dcn_bw``, ``dcn_latency_s``) when its group spans hosts."""
        k = math.prod(mesh[a] for a in axes)
        if nbytes <= 0 or k <= 1:
            return 0.0
        if self.crosses_hosts(axes, mesh):
            return max(nbytes / self.dcn_bw, self.dcn_latency_s)
        return max(nbytes / self.ici_bw, self.hops(axes, mesh) * self.hop_latency_s)

    def describe(self) -> str:
        return (f"{self.name}: {self.peak('bf16') / 1e12:.4g} TFLOP/s bf16, HBM {self.hbm_bytes / GiB:.4g} GiB at "
                f"{self.hbm_bw / 1e9:.4g} GB/s, interconnect {self.ici_bw / 1e9:.4g} GB/s ({self.topology})"
                + (f", {self.dcn_bw / 1e9:.4g} GB/s between hosts of {self.host_devices}" if self.dcn_bw else ""))


_SB = "scaling-book tpus.md"
CHIPS: dict[str, Chip] = {
    "tpu-v4": Chip("tpu-v4", {"bf16": 275e12, "int8": 275e12}, 32 * GiB, 1.2e12, 270e9, 0.0, "torus",
                   "Pope et al. §4 (reference/partitioning.md §2): 275 TFLOP/s, 32 GiB, 1.2 TB/s, 270 GB/s "
                   "(6 links x 45 GB/s); int8 = bf16 from the scaling-book"),
    "tpu-v5e": Chip("tpu-v5e", {"bf16": 1.97e14, "int8": 3.94e14}, 16 * GiB, 8.1e11, 4 * 4.5e10, 0.0, "torus",
                    f"{_SB}: 1.97e14 bf16, 3.94e14 int8, 16 GB, 8.1e11 B/s, 2D torus of 4 links x 4.5e10 B/s"),
    "tpu-v5p": Chip("tpu-v5p", {"bf16": 4.59e14, "int8": 9.18e14}, 95 * GiB, 2.76e12, 6 * 9e10, 0.0, "torus",
                    f"{_SB}: 4.59e14 bf16, 9.18e14 int8, 95 GB, 2.76e12 B/s, 3D torus of 6 links x 9e10 B/s"),
    # NVLink within a node of 8 GPUs (NVSwitch: one hop), InfiniBand between nodes: the DGX
    # datasheets give each GPU its own NIC (A100: ConnectX-6 HDR 200 Gb/s = 25 GB/s one way;
    # H100: ConnectX-7 NDR 400 Gb/s = 50 GB/s); ~5 us per transfer is the usual MPI/NCCL
    # small-message latency over one InfiniBand switch.
    "a100-80g": Chip("a100-80g", {"bf16": 312e12, "f32": 19.5e12, "int8": 624e12}, 80 * GiB, 2.039e12, 300e9,
                     3e-6, "switch",
                     "NVIDIA A100 datasheet (SXM 80GB): 312 TFLOP/s bf16 dense, 2039 GB/s, NVLink3 600 GB/s "
                     "bidirectional (300 one way); DGX A100 datasheet: 8 GPUs per node, 8x ConnectX-6 "
                     "HDR InfiniBand 200 Gb/s (25 GB/s per GPU) between nodes",
                     dcn_bw=25e9, dcn_latency_s=5e-6, host_devices=8),
    "h100": Chip("h100", {"bf16": 989e12, "f32": 67e12, "int8": 1979e12}, 80 * GiB, 3.35e12, 450e9, 3e-6, "switch",
                 "NVIDIA H100 SXM datasheet: 989 TFLOP/s bf16 dense, 3.35 TB/s, NVLink4 900 GB/s bidirectional"),
    "h100-80g": Chip("h100-80g", {"bf16": 989e12, "f32": 67e12, "int8": 1979e12}, 80 * GiB, 3.35e12, 450e9,
                     3e-6, "switch",
                     "NVIDIA H100 SXM datasheet: 989 TFLOP/s bf16 dense, 3.35 TB/s, NVLink4 900 GB/s "
                     "bidirectional (450 one way); DGX H100 datasheet: 8 GPUs per node, 8x ConnectX-7 "
                     "NDR InfiniBand 400 Gb/s (50 GB/s per GPU) between nodes",
                     dcn_bw=50e9, dcn_latency_s=5e-6, host_devices=8),
    "h200": Chip("h200", {"bf16": 989e12, "f32": 67e12, "int8": 1979e12}, 141 * 10**9, 4.8e12, 450e9, 3e-6,
                 "switch",
                 "NVIDIA H200 SXM datasheet: 989 TFLOP/s bf16 dense, 141 GB at 4.8 TB/s, NVLink4 900 GB/s"),
}
CHIP_NAMES = (*CHIPS, "cpu")


def chip_from_mapping(d: Mapping, where: str) -> Chip:
    """A Chip from a chip file's table (or the probe's fields), every field checked: an unknown
    or mistyped one is a CostError naming ``where``, not a silently default figure."""
    known = {"name", "source", "flops_bf16", "flops_f32", "flops_int8", "hbm_bytes", "hbm_bw", "ici_bw",
             "hop_latency_s", "topology", "op_overhead_s", "efficiency", "dcn_bw", "dcn_latency_s", "host_devices",
             "host_bw", "disk_bw"}
    for k in d:
        if k not in known:
            raise CostError(f"{where}: unknown chip field {k!r}", hint=did_you_mean(k, sorted(known)))
    missing = [k for k in ("name", "flops_bf16", "hbm_bytes", "hbm_bw", "ici_bw") if k not in d]
    if missing:
        raise CostError(f"{where}: chip file lacks {', '.join(missing)}")
    flops = {k[6:]: _number(d, k, where) for k in ("flops_bf16", "flops_f32", "flops_int8") if k in d}
    for k in ("name", "topology", "source"):
        if k in d and not isinstance(d[k], str):
            raise CostError(f"{where}: chip field {k!r} must be a string, got {d[k]!r}")
    hbm = _number(d, "hbm_bytes", where)
    if hbm != int(hbm):
        raise CostError(f"{where}: chip field 'hbm_bytes' must be a whole number, got {d['hbm_bytes']!r}")
    return Chip(d["name"], flops, int(hbm), _number(d, "hbm_bw", where), _number(d, "ici_bw", where),
                _number(d, "hop_latency_s", where, 0.0), d.get("topology", "torus"), d.get("source", where),
                _number(d, "op_overhead_s", where, 0.0), _efficiency(d.get("efficiency"), where),
                _number(d, "dcn_bw", where, 0.0), _number(d, "dcn_latency_s", where, 0.0),
                int(_number(d, "host_devices", where, 0.0)),
                host_bw=_number(d, "host_bw", where, 0.0), disk_bw=_number(d, "disk_bw", where, 0.0))


def _efficiency(table: object, where: str) -> Efficiency | None:
    """A chip file's ``[efficiency]`` table: the calibrated model's fitted fractions and costs."""
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise CostError(f"{where}: chip field 'efficiency' must be a table ([efficiency]), got {table!r}")
    names = ("flops", "matmul_half", "hbm", "link", "step_latency_s", "layer_overhead_s", "convert_s")
    for k in table:
        if k not in (*names, "source"):
            raise CostError(f"{where}: unknown efficiency field {k!r}", hint=did_you_mean(k, names))
    if "source" in table and not isinstance(table["source"], str):
        raise CostError(f"{where}: efficiency field 'source' must be a string")
    vals = {k: _number(table, k, f"{where} [efficiency]", 0.0) for k in names if k in table}
    try:
        return Efficiency(**vals, source=table.get("source", where))
    except CostError as e:
        raise CostError(f"{where}: {e.message}") from None


def _number(d: Mapping, key: str, where: str, default: float | None = None) -> float:
    """A finite number from a chip table: TOML strings, lists, tables, booleans, inf and nan are
    refused here, before any conversion can raise an untyped error."""
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CostError(f"{where}: chip field {key!r} must be a finite number, got {v!r}")
    if v < 0 or (default is None and v == 0):
        raise CostError(f"{where}: chip field {key!r} must be {'>= 0' if default is not None else '> 0'}, got {v!r}")
    return float(v)


def load_chip_file(path: str | Path) -> Chip:
    p = Path(path)
    try:
        data = tomllib.loads(read_user_text(p, CostError, "chip file"))
    except tomllib.TOMLDecodeError as e:
        raise CostError(f"chip file {p} is not valid TOML: {e}") from None
    return chip_from_mapping(data, str(p))


def get_chip(name_or_file: str, cache_dir: Path | None = None, refresh: bool = False) -> Chip:
    """A chip by table name, ``cpu`` (measured and cached; ``refresh``: measured again), or a
    TOML chip file."""
    if name_or_file in CHIPS:
        return CHIPS[name_or_file]
    if name_or_file == "cpu":
        from compiler.cost.efficiency import CPU_FIT_FILE, load_cpu_fit
        from runtime.probe import cpu_probe, default_cache_dir  # JAX lives in runtime/ only

        rec = cpu_probe(cache_dir, refresh)
        chip = chip_from_mapping(rec.figures, "cpu probe")
        eff = load_cpu_fit((cache_dir or default_cache_dir()) / CPU_FIT_FILE, rec.figures, rec.key)
        return replace(chip, efficiency=eff, measured_at=rec.measured_at, probe_info=rec.describe())
    p = Path(name_or_file)
    if p.suffix == ".toml" or p.is_file():
        return load_chip_file(p)
    raise CostError(f"unknown hardware {name_or_file!r}",
                    hint=did_you_mean(name_or_file, CHIP_NAMES) + ", or a chip file (.toml)")


def with_hbm(chip: Chip, hbm_bytes: int) -> Chip:
    return replace(chip, hbm_bytes=hbm_bytes)


__all__ = ["CHIPS", "CHIP_NAMES", "Chip", "GiB", "chip_from_mapping", "get_chip", "load_chip_file", "with_hbm"]
