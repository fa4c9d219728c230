"""One process of a multi-process group that checks every FFN x attention layout in turn.

`python tests/mp_every_layout.py run SPEC ... --coordinator H:P --num-processes N --process-id I`
runs `einshard run ... --check --json` once per layout inside one jax.distributed session (the
group is joined once; joining again with the same flags is a no-op), so the full layout matrix
costs one process start-up instead of one per layout. Process 0 prints one JSON report per layout.
"""

from __future__ import annotations

import sys

from compiler.cli import main
from passes.layouts import ATTN_LAYOUTS, FFN_LAYOUTS

if __name__ == "__main__":
    argv = sys.argv[1:]
    for ffn in FFN_LAYOUTS:
        for attn in ATTN_LAYOUTS:
            rc = main([*argv, "--ffn", ffn, "--attn", attn, "--check", "--json"])
            if rc:
                sys.exit(rc)
            sys.stdout.flush()
