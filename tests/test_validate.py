"""Adapter validation without torch: PEFT directories, safetensors headers, shapes, NaN/Inf, pickles."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from atmoe.adapter_format import pattern_key
from atmoe.errors import InvalidAdapter, PickleRefused
from atmoe.registry.validate import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    FiniteCheck,
    check_finite_file,
    read_safetensors_header,
    validate_adapter,
)

PREFIX = "base_model.model.model.layers.0.self_attn."


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], *, dtypes: dict[str, str] | None = None) -> None:
    """A minimal safetensors writer (numpy arrays; ``dtypes`` overrides the recorded dtype, e.g. BF16)."""
    names = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64", np.dtype("<u2"): "BF16"}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        dtype = (dtypes or {}).get(name) or names[array.dtype.newbyteorder("<")]
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def make_adapter(
    root: Path,
    *,
    r: int = 2,
    modules: dict[str, tuple[int, int, int]] | None = None,
    config: dict[str, Any] | None = None,
    dtype: str = "<f4",
) -> Path:
    """An adapter directory written by hand: modules {name: (rank, in, out)}."""
    root.mkdir(parents=True, exist_ok=True)
    modules = modules or {"q_proj": (r, 8, 8), "v_proj": (r, 8, 4)}
    rng = np.random.default_rng(0)
    tensors = {}
    for module, (rank, fan_in, fan_out) in modules.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = rng.standard_normal((rank, fan_in)).astype(dtype)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = rng.standard_normal((fan_out, rank)).astype(dtype)
    write_safetensors(root / WEIGHTS_FILE, tensors)
    base_config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": sorted(modules)}
    base_config.update(config or {})
    (root / CONFIG_FILE).write_text(json.dumps(base_config))
    return root


# -- real PEFT adapters ------------------------------------------------------------------------------


def test_peft_adapter_is_described(adapters: dict[str, Path]) -> None:
    info = validate_adapter(adapters["rigorous"])
    assert info.peft_type == "LORA"
    assert (info.r, info.alpha, info.use_rslora) == (4, 8.0, True)
    assert info.target_modules == ["k_proj", "q_proj", "v_proj"]
    assert info.rank_pattern == {"k_proj": 2}
    assert info.module_ranks == {
        "model.layers.0.self_attn.k_proj": 2,
        "model.layers.0.self_attn.q_proj": 4,
        "model.layers.0.self_attn.v_proj": 4,
    }
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(info.files)


def test_validation_does_not_import_torch(adapters: dict[str, Path]) -> None:
    code = (
        "import sys; from atmoe.registry.validate import validate_adapter; "
        f"validate_adapter({str(adapters['gastro'])!r}); "
        "import atmoe.cli, atmoe.registry; from atmoe.registry import Registry; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- directory level ---------------------------------------------------------------------------------


def test_not_a_directory(tmp_path: Path) -> None:
    file = tmp_path / "x.safetensors"
    file.write_bytes(b"")
    with pytest.raises(InvalidAdapter, match="not a directory"):
        validate_adapter(file)
    with pytest.raises(InvalidAdapter, match="no such directory"):
        validate_adapter(tmp_path / "missing")


def test_not_a_peft_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InvalidAdapter, match="not a PEFT LoRA adapter directory"):
        validate_adapter(tmp_path)


@pytest.mark.parametrize("name", ["adapter_model.bin", "training_args.bin", "w.pt", "w.pth", "w.ckpt", "w.pkl"])
def test_pickle_files_are_refused_unopened(tmp_path: Path, name: str) -> None:
    make_adapter(tmp_path)
    pickle = tmp_path / name
    pickle.write_bytes(b"\x80\x04 not even a pickle")
    pickle.chmod(0o000)  # proves the file is never opened
    try:
        with pytest.raises(PickleRefused, match="save_pretrained") as caught:
            validate_adapter(tmp_path)
        assert name in str(caught.value)
    finally:
        pickle.chmod(0o644)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"peft_type": "IA3"}, "only LORA"),
        ({"peft_type": None}, "only LORA"),
        ({"r": 0}, "r must be a positive integer"),
        ({"r": "4"}, "r must be a positive integer"),
        ({"lora_alpha": "x"}, "lora_alpha must be a finite number"),
        ({"use_rslora": "yes"}, "use_rslora"),
        ({"use_dora": True, "lora_bias": True}, "PEFT itself refuses"),
        ({"lora_alpha": 0}, "lora_alpha must be > 0"),
        ({"lora_alpha": -4}, "lora_alpha must be > 0"),
        ({"lora_alpha": float("inf")}, "Infinity is not a JSON number"),
        ({"lora_alpha": 1e308}, "overflows float32"),
        ({"alpha_pattern": {"q_proj": 1e300}, "use_rslora": True}, "overflows float32"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters is set"),
        ({"trainable_token_indices": [3, 4]}, "trainable_token_indices is set"),
        ({"alora_invocation_tokens": [5]}, "aLoRA"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights is 'pissa_niter_4'"),
        ({"bias": "all"}, "bias is 'all'"),
        ({"lora_bias": "yes"}, "lora_bias must be true or false"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"(": 2}}, "invalid pattern"),
        ({"rank_pattern": {"q_proj": 0}}, "positive integer"),
        ({"target_modules": 3}, "target_modules"),
    ],
)
def test_bad_configs(tmp_path: Path, config: dict[str, Any], match: str) -> None:
    make_adapter(tmp_path, config=config)
    with pytest.raises(InvalidAdapter, match=match) as caught:
        validate_adapter(tmp_path)
    assert str(caught.value).startswith(CONFIG_FILE)


def test_config_not_json(tmp_path: Path) -> None:
    make_adapter(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{\n  'r': 4,\n}")
    with pytest.raises(InvalidAdapter, match=r"adapter_config.json: is not valid JSON \(line 2"):
        validate_adapter(tmp_path)


def test_missing_weights(tmp_path: Path) -> None:
    make_adapter(tmp_path)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(InvalidAdapter, match="only safetensors"):
        validate_adapter(tmp_path)


# -- safetensors header ------------------------------------------------------------------------------


def _header_bytes(header: dict[str, Any], data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "too short"),
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 10**12), "exceeds"),
        (struct.pack("<Q", 64) + b"{}", "truncated or corrupt"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid JSON"),
        (_header_bytes([]), "not a JSON object"),  # type: ignore[arg-type]
        (_header_bytes({"t": {"dtype": "Q8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "unknown dtype"),
        (_header_bytes({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "invalid shape"),
        (
            _header_bytes({"t": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}, b"\0" * 8),
            "invalid data_offsets",
        ),
        (_header_bytes({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8), "needs 8 bytes"),
        (
            _header_bytes({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
            "truncated: tensor 't'",
        ),
        (
            _header_bytes(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "overlaps",
        ),
        (_header_bytes({"__metadata__": {"a": 1}}), "__metadata__"),
        (_header_bytes({"t": [1, 2]}), "no dtype"),
    ],
)
def test_corrupt_headers(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / WEIGHTS_FILE
    path.write_bytes(content)
    with pytest.raises(InvalidAdapter, match=match) as caught:
        read_safetensors_header(path)
    assert str(caught.value).startswith(WEIGHTS_FILE)


def test_truncated_peft_weights(adapter_copy: Any) -> None:
    root = adapter_copy("gastro")
    weights = root / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(InvalidAdapter, match="truncated"):
        validate_adapter(root)


def test_header_matches_the_safetensors_library(adapters: dict[str, Path]) -> None:
    from safetensors import safe_open

    header = read_safetensors_header(adapters["rigorous"] / WEIGHTS_FILE)
    with safe_open(adapters["rigorous"] / WEIGHTS_FILE, framework="numpy") as handle:
        assert sorted(handle.keys()) == sorted(header.tensors)
        for name, info in header.tensors.items():
            assert tuple(handle.get_slice(name).get_shape()) == info.shape


# -- shapes ------------------------------------------------------------------------------------------


def test_rank_disagrees_with_config(tmp_path: Path) -> None:
    make_adapter(tmp_path, r=2, config={"r": 3})
    with pytest.raises(InvalidAdapter, match=r"rank 2 but the config says r = 3"):
        validate_adapter(tmp_path)


def test_a_and_b_disagree(tmp_path: Path) -> None:
    make_adapter(tmp_path)
    rng = np.random.default_rng(1)
    write_safetensors(
        tmp_path / WEIGHTS_FILE,
        {
            f"{PREFIX}q_proj.lora_A.weight": rng.standard_normal((2, 8)).astype("<f4"),
            f"{PREFIX}q_proj.lora_B.weight": rng.standard_normal((8, 3)).astype("<f4"),
        },
    )
    with pytest.raises(InvalidAdapter, match="disagree on the rank"):
        validate_adapter(tmp_path)


def test_rank_pattern_is_honoured(tmp_path: Path) -> None:
    modules = {"q_proj": (4, 8, 8), "v_proj": (2, 8, 4)}
    info = validate_adapter(make_adapter(tmp_path, r=4, modules=modules, config={"rank_pattern": {"v_proj": 2}}))
    assert info.module_ranks == {
        "model.layers.0.self_attn.q_proj": 4,
        "model.layers.0.self_attn.v_proj": 2,
    }


def test_rank_pattern_mismatch(tmp_path: Path) -> None:
    modules = {"q_proj": (4, 8, 8), "v_proj": (4, 8, 4)}
    make_adapter(tmp_path, r=4, modules=modules, config={"rank_pattern": {"v_proj": 2}})
    with pytest.raises(InvalidAdapter, match=r"rank_pattern\['v_proj'\] = 2"):
        validate_adapter(tmp_path)


@pytest.mark.parametrize(
    ("patterns", "module", "expected"),
    [
        (["v_proj"], "model.layers.0.self_attn.v_proj", "v_proj"),
        (["proj"], "model.layers.0.self_attn.v_proj", None),  # a dotted suffix, not a substring
        (["layers.0.self_attn.v_proj"], "model.layers.0.self_attn.v_proj", "layers.0.self_attn.v_proj"),
        ([r"layers\.[01]\..*q_proj"], "model.layers.1.self_attn.q_proj", r"layers\.[01]\..*q_proj"),
        (["k_proj"], "model.layers.0.self_attn.v_proj", None),
    ],
)
def test_pattern_key_follows_peft(patterns: list[str], module: str, expected: str | None) -> None:
    assert pattern_key(patterns, module) == expected
    from peft.utils.other import get_pattern_key

    assert get_pattern_key(patterns, module) == (expected if expected is not None else module)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        (f"{PREFIX}q_proj.lora_C.weight", "not a LoRA tensor"),
        (f"{PREFIX}q_proj.lora_magnitude_vector", "holds no LoRA tensors"),
        ("model.layers.0.self_attn.q_proj.lora_A.weight", "does not start with 'base_model.model.'"),
        (f"{PREFIX}q_proj.weight", "not a LoRA tensor"),
        (f"{PREFIX}../q_proj.lora_A.weight", "not a valid module path"),
        ("base_model.model..lora_A.weight", "not a valid module path"),
    ],
)
def test_tensor_names(tmp_path: Path, name: str, match: str) -> None:
    make_adapter(tmp_path)
    write_safetensors(tmp_path / WEIGHTS_FILE, {name: np.zeros((2, 8), "<f4")})
    with pytest.raises(InvalidAdapter, match=match):
        validate_adapter(tmp_path)


def test_missing_half_of_a_pair(tmp_path: Path) -> None:
    make_adapter(tmp_path)
    write_safetensors(tmp_path / WEIGHTS_FILE, {f"{PREFIX}q_proj.lora_A.weight": np.zeros((2, 8), "<f4")})
    with pytest.raises(InvalidAdapter, match="has no lora_B.weight"):
        validate_adapter(tmp_path)


def test_not_two_dimensional(tmp_path: Path) -> None:
    make_adapter(tmp_path)
    write_safetensors(
        tmp_path / WEIGHTS_FILE,
        {
            f"{PREFIX}q_proj.lora_A.weight": np.zeros((2, 8, 1, 1), "<f4"),
            f"{PREFIX}q_proj.lora_B.weight": np.zeros((8, 2, 1, 1), "<f4"),
        },
    )
    with pytest.raises(InvalidAdapter, match="expected 2-D"):
        validate_adapter(tmp_path)


# -- NaN / Inf -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8", "bf16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_found(tmp_path: Path, dtype: str, bad: float) -> None:
    make_adapter(tmp_path)
    a = np.ones((2, 8), "<f4")
    b = np.ones((8, 2), "<f4")
    b[5, 1] = bad
    tensors = {f"{PREFIX}q_proj.lora_A.weight": a, f"{PREFIX}q_proj.lora_B.weight": b}
    dtypes = None
    if dtype == "bf16":  # bfloat16 is the top half of a float32
        tensors = {k: (v.view("<u4") >> 16).astype("<u2") for k, v in tensors.items()}
        dtypes = {k: "BF16" for k in tensors}
    else:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    write_safetensors(tmp_path / WEIGHTS_FILE, tensors, dtypes=dtypes)
    validate_adapter(tmp_path, check_values=False)  # the header alone is fine
    with pytest.raises(InvalidAdapter, match=r"tensor '.*q_proj.lora_B.weight' contains NaN or Inf"):
        validate_adapter(tmp_path)


@settings(max_examples=60, deadline=None)
@given(
    values=st.sampled_from(["<f2", "<f4", "<f8"]).flatmap(
        lambda dtype: hnp.arrays(dtype, st.integers(0, 300), elements=st.floats(width=16))
    ),
    chunk=st.integers(1, 97),
)
def test_streamed_check_matches_numpy_for_any_chunking(values: np.ndarray, chunk: int) -> None:
    dtype = values.dtype.str
    tensors = {"x.lora_A.weight": values.reshape(1, -1), "x.lora_B.weight": np.ones((3, 1), dtype)}
    import io
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WEIGHTS_FILE
        write_safetensors(path, tensors)
        content = path.read_bytes()
        check = FiniteCheck(read_safetensors_header(path))
        stream = io.BytesIO(content)
        try:
            while piece := stream.read(chunk):
                check(memoryview(piece))
            check.finish()
            found = False
        except InvalidAdapter:
            found = True
    assert found == (not np.isfinite(values).all())


def test_check_finite_file_on_peft_weights(adapters: dict[str, Path]) -> None:
    check_finite_file(adapters["diagnosis"] / WEIGHTS_FILE)
