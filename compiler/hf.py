"""``einshard spec-from-hf``: a Hugging Face checkpoint → einshard ``Spec`` (default mesh and serve).

The config.json mapping itself lives in ``runtime.hf_config`` (the runtime's checkpoint loader
needs it and must not import the compiler); its names are re-exported here for existing callers.
"""

from __future__ import annotations

from pathlib import Path

from compiler.spec import MeshSpec, ServeSpec, Spec
from runtime.hf_config import (FAMILIES, HFConfig, falcon_qkv_layout, hf_family, model_from_config,
                               read_hf_config)

__all__ = ["FAMILIES", "HFConfig", "falcon_qkv_layout", "hf_family", "model_from_config", "read_hf_config",
           "spec_from_hf"]


def spec_from_hf(path: str | Path) -> Spec:
    """The einshard Spec (default mesh and serve blocks) of a Hugging Face checkpoint directory
    or a ``.gguf`` file (its metadata, ``runtime.gguf``).

    Every failure — no or malformed config.json, an unsupported model_type or GGUF architecture, a
    field whose value einshard cannot represent exactly — is a SpecError naming the field.
    """
    p = Path(path)
    if p.suffix == ".gguf" or (p.is_dir() and not (p / "config.json").exists() and len(list(p.glob("*.gguf"))) == 1):
        from runtime.checkpoint import open_checkpoint

        ck = open_checkpoint(p)
        return Spec(ck.model_spec(), MeshSpec(), ServeSpec(), str(ck.path))
    cfg = read_hf_config(path)
    return Spec(model_from_config(cfg), MeshSpec(), ServeSpec(), str(cfg.path))
