"""The PEFT LoRA adapter format, in one place and without torch: file names, the tensor-key grammar,
the config fields that decide the math, and the scaling rules.

Both ends use it: ``atmoe.registry.validate`` (``add-expert`` and ``import``, no torch) and
``atmoe.adapters`` (building a model). So whatever ``add-expert`` accepts, the builder reads the
same way, and whatever cannot be mixed exactly is refused at ``add-expert`` with the field named.

Keys, as ``PeftModel.save_pretrained`` writes them (the adapter name stripped; an adapter-name
segment, ``lora_A.default.weight``, is accepted too):

    base_model.model.<module>.lora_A.weight            [r, in]     Linear / Conv1D
    base_model.model.<module>.lora_B.weight            [out, r]
    base_model.model.<module>.lora_B.bias              [out]       lora_bias=True
    base_model.model.<module>.lora_magnitude_vector    [out]       use_dora=True (DoRA's m)
    base_model.model.<module>.lora_embedding_A         [r, vocab]  nn.Embedding
    base_model.model.<module>.lora_embedding_B         [dim, r]
    base_model.model.<module>.base_layer.weight        the frozen base weight that PEFT saves with
                                                       adapted embeddings; it must equal the base
                                                       model's (checked when building)

Scaling (PEFT's ``LoraModel._create_and_replace``): r and alpha come from ``rank_pattern`` /
``alpha_pattern`` when a pattern matches the module (``get_pattern_key``), else ``r`` /
``lora_alpha`` (PEFT's defaults: 8 and 8); s = alpha / sqrt(r) with ``use_rslora``, else alpha / r.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from atmoe.errors import InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_HINT = (
    "pickle weights are never loaded: convert them where you trust the file, e.g. "
    "PeftModel.from_pretrained(base_model, DIR).save_pretrained(OUT, safe_serialization=True), "
    "and add OUT (without any pickle files)"
)
KEY_PREFIX = "base_model.model."
PEFT_DEFAULT_R = 8  # peft.LoraConfig's field defaults, used when adapter_config.json omits them
PEFT_DEFAULT_ALPHA = 8
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors names
_FLOAT32_MAX = 3.4028234663852886e38

# The parts of one adapted module, by what follows the module path in a key:
# (part, the key's tail after the optional adapter-name segment)
_PARTS = {
    "lora_A": {("weight",): "A"},
    "lora_B": {("weight",): "B", ("bias",): "B_bias"},
    "lora_magnitude_vector": {(): "magnitude", ("weight",): "magnitude"},
    "lora_embedding_A": {(): "embedding_A"},
    "lora_embedding_B": {(): "embedding_B"},
    "base_layer": {("weight",): "base_weight"},
}
_SEGMENT = re.compile(r"^[A-Za-z0-9_]+$")

# Config fields that change what a module computes in ways a mixture of LoRA deltas cannot express
# (or that PEFT applies outside the LoRA tensors): refused when set, with the reason.
_NOT_MIXABLE = {
    "modules_to_save": "modules_to_save replaces whole modules; an expert may only add LoRA deltas",
    "target_parameters": "target_parameters adapts raw parameters (e.g. MoE expert weights), not modules",
    "trainable_token_indices": "trainable_token_indices retrains embedding rows; an expert may only add LoRA deltas",
    "layer_replication": "layer_replication changes the base model's layers",
    "alora_invocation_tokens": "aLoRA applies the adapter only after its invocation tokens; it cannot be mixed per request",
    "use_qalora": "QA-LoRA pools the input groupwise; it is not a plain LoRA delta",
    "use_bdlora": "block-diagonal LoRA variants are not plain LoRA deltas",
    "arrow_config": "an Arrow config is PEFT's own router; add the plain experts and route them here",
    "velora_config": "VeLoRA changes the LoRA forward",
    "kasa_config": "KaSA changes the LoRA forward",
    "monteclora_config": "MonteCLoRA samples its LoRA weights",
}
# init_lora_weights that rewrite the base weights (W_res = W - BA): such an adapter needs that
# residual base model unless it was converted when saved
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class LoraSettings:
    """The fields of ``adapter_config.json`` that decide what an expert computes."""

    r: int
    alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_dora: bool
    lora_bias: bool
    fan_in_fan_out: bool
    target_modules: list[str]
    base_model_name_or_path: str | None
    revision: str | None

    def module_rank(self, module: str) -> tuple[int, str]:
        """(r, where it comes from: ``r`` or ``rank_pattern['...']``) of one module."""
        key = pattern_key(self.rank_pattern, module)
        if key is None:
            return self.r, "r"
        return self.rank_pattern[key], f"rank_pattern[{key!r}]"

    def module_scaling(self, module: str) -> tuple[int, float]:
        """(r, s) of one module path (``model.layers.0.self_attn.q_proj``), as PEFT resolves them."""
        r, _ = self.module_rank(module)
        key = pattern_key(self.alpha_pattern, module)
        alpha = self.alpha_pattern[key] if key is not None else self.alpha
        return r, (alpha / math.sqrt(r) if self.use_rslora else alpha / r)


@dataclass(frozen=True)
class TensorKey:
    """One tensor of an adapter: the module it belongs to and its part (see ``_PARTS``)."""

    module: str
    part: str


@dataclass(frozen=True)
class ModuleLayout:
    """What one adapted module holds: ``kind`` "linear" (Linear / Conv1D) or "embedding", the rank,
    the input and output sizes the tensors imply, and the optional DoRA magnitude, LoRA bias and
    saved base weight (its shape)."""

    module: str
    kind: str
    rank: int
    in_features: int  # Linear: inputs; Embedding: vocabulary size
    out_features: int  # Linear: outputs; Embedding: embedding size
    has_bias: bool
    has_magnitude: bool
    base_weight_shape: tuple[int, ...] | None


def _config_error(problem: str) -> InvalidAdapter:
    return InvalidAdapter(f"{CONFIG_FILE}: {problem}")


def _weights_error(problem: str) -> InvalidAdapter:
    return InvalidAdapter(f"{WEIGHTS_FILE}: {problem}")


# -- adapter_config.json ---------------------------------------------------------------------


def pattern_key(pattern_keys: Iterable[str], module: str) -> str | None:
    """The first pattern that matches a dotted suffix of ``module`` (``re.match``, in the config's
    order), exactly as ``peft.utils.other.get_pattern_key``; None where PEFT returns the key itself."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _positive_int(value: Any, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _config_error(f"{field_name} must be a positive integer, not {value!r}")
    return value


def _positive_number(value: Any, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _config_error(f"{field_name} must be a finite number, not {value!r}")
    if value <= 0:
        raise _config_error(
            f"{field_name} must be > 0, not {value!r} (the expert would add nothing or subtract itself)"
        )
    return float(value)


def _flag(config: Mapping[str, Any], field_name: str) -> bool:
    value = config.get(field_name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _config_error(f"{field_name} must be true or false, not {value!r}")
    return value


MAX_PATTERN_LENGTH = 512
MAX_MODULE_PATH = 1024  # characters of a module path in a tensor key (the deepest real ones are ~100)


def _nested_repeat(items: Any, inside_repeat: bool = False) -> bool:
    """Does a parsed regex repeat something that itself repeats or branches, as ``(a+)+`` or
    ``(a|aa)*``? Those backtrack exponentially on a long non-matching name; flat ones do not."""
    from re import _constants as c  # type: ignore[attr-defined]

    repeat_ops = tuple(
        getattr(c, name) for name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") if hasattr(c, name)
    )
    group_ops = tuple(getattr(c, name) for name in ("SUBPATTERN", "ATOMIC_GROUP") if hasattr(c, name))
    for op, arg in items:
        if op in repeat_ops:
            low, high, body = arg
            repeats = high is c.MAXREPEAT or high > 1
            if repeats and inside_repeat:
                return True
            if _nested_repeat(body, inside_repeat or repeats):
                return True
        elif op == c.BRANCH:
            if inside_repeat and len(arg[1]) > 1:
                return True
            if any(_nested_repeat(branch, inside_repeat) for branch in arg[1]):
                return True
        elif op in group_ops:
            body = arg[-1]
            if _nested_repeat(body, inside_repeat):
                return True
        elif op in (c.ASSERT, c.ASSERT_NOT):
            if _nested_repeat(arg[1], inside_repeat):
                return True
    return False


def _check_pattern(pattern: str, field_name: str) -> None:
    """A module pattern must compile as PEFT uses it and match in bounded time."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise _config_error(f"{field_name} has a pattern of {len(pattern)} characters (at most {MAX_PATTERN_LENGTH})")
    try:  # as get_pattern_key uses it: "(?i)" alone compiles, but not inside the suffix pattern
        re.compile(rf"(.*\.)?({pattern})$")
        from re import _parser  # type: ignore[attr-defined]

        parsed = _parser.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        raise _config_error(f"{field_name} has an invalid pattern {pattern!r}") from None
    if _nested_repeat(parsed.data):
        raise _config_error(
            f"{field_name} has the pattern {pattern!r}, which repeats a repetition or an alternative and can "
            "take exponential time to match; write it without the nested quantifier"
        )


def _pattern(config: Mapping[str, Any], field_name: str, check) -> dict[str, Any]:
    value = config.get(field_name) or {}
    if not isinstance(value, dict):
        raise _config_error(f"{field_name} must be an object mapping module patterns to values")
    for pattern, entry in value.items():
        _check_pattern(pattern, field_name)
        check(entry, f"{field_name}[{pattern!r}]")
    return dict(value)


def _target_modules(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sorted(value)
    raise _config_error(f"target_modules must be a string or a list of strings, not {value!r}")


def _optional_str(config: Mapping[str, Any], field_name: str) -> str | None:
    value = config.get(field_name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _config_error(f"{field_name} must be a string, not {value!r}")
    return value


def read_settings(config: Mapping[str, Any]) -> LoraSettings:
    """Check ``adapter_config.json`` (a parsed JSON object) and return the fields that decide the math.

    Raises ``InvalidAdapter`` ("adapter_config.json: <field> ...") for a non-LoRA ``peft_type``,
    fields that cannot be mixed (``modules_to_save``, ``target_parameters``, ...), and malformed or
    non-positive ranks, alphas and patterns.
    """
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise _config_error(f"peft_type is {peft_type!r}; only LORA adapters are accepted")
    for field_name, reason in _NOT_MIXABLE.items():
        if config.get(field_name):
            raise _config_error(f"{field_name} is set: {reason}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise _config_error(
            f"init_lora_weights is {init!r}: such an adapter expects the base weights it rewrote; save it "
            "converted to plain LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise _config_error(f"bias is {bias!r}: it trains the base model's biases; an expert may only add LoRA")
    r = _positive_int(config.get("r", PEFT_DEFAULT_R), "r")
    alpha = _positive_number(config.get("lora_alpha", PEFT_DEFAULT_ALPHA), "lora_alpha")
    use_dora, lora_bias = _flag(config, "use_dora"), _flag(config, "lora_bias")
    if use_dora and lora_bias:
        raise _config_error("use_dora and lora_bias are both set; PEFT itself refuses that combination")
    settings = LoraSettings(
        r=r,
        alpha=alpha,
        use_rslora=_flag(config, "use_rslora"),
        rank_pattern=_pattern(config, "rank_pattern", _positive_int),
        alpha_pattern={k: float(v) for k, v in _pattern(config, "alpha_pattern", _positive_number).items()},
        use_dora=use_dora,
        lora_bias=lora_bias,
        fan_in_fan_out=_flag(config, "fan_in_fan_out"),
        target_modules=_target_modules(config.get("target_modules")),
        base_model_name_or_path=_optional_str(config, "base_model_name_or_path"),
        revision=_optional_str(config, "revision"),
    )
    _check_scales(settings)
    return settings


def _check_scales(settings: LoraSettings) -> None:
    """Every scaling s the config can give must be a finite float32 (alpha 1e308 is not)."""
    alphas = [("lora_alpha", settings.alpha)] + [
        (f"alpha_pattern[{k!r}]", v) for k, v in settings.alpha_pattern.items()
    ]
    ranks = [settings.r, *settings.rank_pattern.values()]
    for field_name, alpha in alphas:
        for r in ranks:
            scale = alpha / math.sqrt(r) if settings.use_rslora else alpha / r
            if not scale < _FLOAT32_MAX:
                raise _config_error(
                    f"{field_name} = {alpha!r} gives a LoRA scaling of {scale:.3g}, which overflows float32"
                )


# -- adapter_model.safetensors ---------------------------------------------------------------


def parse_key(name: str) -> TensorKey:
    """Split a PEFT tensor key into module path and part; ``InvalidAdapter`` naming the key otherwise."""
    if not name.startswith(KEY_PREFIX):
        raise _weights_error(
            f"tensor {name!r} does not start with {KEY_PREFIX!r}: not saved by PeftModel.save_pretrained "
            "(PEFT would not load it onto the base model)"
        )
    if len(name) > len(KEY_PREFIX) + MAX_MODULE_PATH + 64:
        raise _weights_error(f"tensor name of {len(name)} characters is too long to be a module path")
    segments = name[len(KEY_PREFIX) :].split(".")
    if not all(_SEGMENT.match(segment) for segment in segments):
        raise _weights_error(f"tensor name {name!r} is not a valid module path")
    for index, segment in enumerate(segments):
        tails = _PARTS.get(segment)
        if tails is None or index == 0:
            continue
        rest = tuple(segments[index + 1 :])
        part = tails.get(rest) or (tails.get(rest[1:]) if rest and segment != "base_layer" else None)
        if part is None:
            break
        return TensorKey(module=".".join(segments[:index]), part=part)
    raise _weights_error(
        f"tensor {name!r} is not a LoRA tensor (expected <module>.lora_A.weight / .lora_B.weight, "
        "lora_B.bias, lora_magnitude_vector or lora_embedding_A / _B)"
    )


def module_layouts(
    settings: LoraSettings, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str] | None = None
) -> dict[str, ModuleLayout]:
    """Group the tensors (``{key: shape}``, safetensors dtype names optional) by module and check them
    against each other and against the config: ranks, pairs, DoRA magnitudes, LoRA biases.
    Returns ``{module: ModuleLayout}``, sorted by module path."""
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        key = parse_key(name)
        if dtypes is not None and dtypes[name] not in FLOAT_DTYPES:
            raise _weights_error(
                f"tensor {name!r} has dtype {dtypes[name]}; LoRA weights must be F16, BF16, F32 or F64"
            )
        if key.part in parts.setdefault(key.module, {}):
            raise _weights_error(f"module {key.module!r} has its {key.part} tensor twice ({name!r})")
        parts[key.module][key.part] = tuple(shape)
    if not any({"A", "embedding_A"} & set(found) for found in parts.values()):
        raise _weights_error("holds no LoRA tensors")
    return {module: _module_layout(settings, module, parts[module]) for module in sorted(parts)}


def _module_layout(settings: LoraSettings, module: str, found: dict[str, tuple[int, ...]]) -> ModuleLayout:
    embedding = "embedding_A" in found or "embedding_B" in found
    first, second = ("embedding_A", "embedding_B") if embedding else ("A", "B")
    if embedding and ("A" in found or "B" in found):
        raise _weights_error(f"module {module!r} holds both lora_A/B and lora_embedding_A/B")
    for part in (first, second):
        if part not in found:
            label = f"lora_{part}" if embedding else f"lora_{part}.weight"
            raise _weights_error(f"module {module!r} has no {label}")
    a, b = found[first], found[second]
    for part, shape in ((first, a), (second, b)):
        if len(shape) != 2:
            raise _weights_error(f"module {module!r}: lora_{part} has shape {list(shape)}; expected 2-D")
    if a[0] != b[1]:
        raise _weights_error(
            f"module {module!r}: lora_{first} {list(a)} and lora_{second} {list(b)} disagree on the rank"
        )
    expected, source = settings.module_rank(module)
    if a[0] != expected:
        raise _weights_error(
            f"module {module!r}: lora_{first} {list(a)} has rank {a[0]} but the config says {source} = {expected}"
        )
    out_features = b[0]
    has_bias = "B_bias" in found
    if has_bias != (settings.lora_bias and not embedding):
        if has_bias:
            raise _weights_error(f"module {module!r} has lora_B.bias but the config's lora_bias is false")
        if embedding and settings.lora_bias:
            raise _config_error(f"lora_bias is set but {module!r} is an embedding (PEFT refuses lora_bias there)")
        raise _weights_error(f"module {module!r} has no lora_B.bias but the config sets lora_bias")
    if has_bias and found["B_bias"] != (out_features,):
        raise _weights_error(
            f"module {module!r}: lora_B.bias {list(found['B_bias'])} does not match {out_features} outputs"
        )
    has_magnitude = "magnitude" in found
    if has_magnitude != settings.use_dora:
        if has_magnitude:
            raise _weights_error(f"module {module!r} has lora_magnitude_vector but the config's use_dora is false")
        raise _weights_error(f"module {module!r} has no lora_magnitude_vector but the config sets use_dora")
    if has_magnitude and embedding:
        raise _config_error(
            f"use_dora on the embedding {module!r}: DoRA on embeddings cannot be mixed, only on linears"
        )
    if has_magnitude and found["magnitude"] != (out_features,):
        raise _weights_error(
            f"module {module!r}: lora_magnitude_vector {list(found['magnitude'])} does not match {out_features} outputs"
        )
    return ModuleLayout(
        module=module,
        kind="embedding" if embedding else "linear",
        rank=a[0],
        in_features=a[1],
        out_features=out_features,
        has_bias=has_bias,
        has_magnitude=has_magnitude,
        base_weight_shape=found.get("base_weight"),
    )
