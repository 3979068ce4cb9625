"""PEFT-shaped LoRA adapter directories written with numpy + safetensors alone (no torch, no PEFT).

Used by the registry robustness tests (concurrency, crashes, bad input, tamper, archives), which need
many distinct or large adapters quickly. Import it from a test module with::

    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic_lora import write_adapter
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner, Result

MODULES = ("q_proj", "v_proj")


def write_adapter(
    path: str | Path,
    *,
    seed: int = 0,
    r: int = 4,
    modules: tuple[str, ...] = MODULES,
    layers: int = 1,
    hidden: int = 16,
    base_model: str | None = "tiny/base",
    config: dict[str, Any] | None = None,
) -> Path:
    """A LoRA directory: lora_A [r, hidden] and lora_B [hidden, r] per module and layer, finite F32.

    ``layers=160, hidden=2048, r=16`` makes a ~40 MB adapter.
    """
    from safetensors.numpy import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(layers):
        for module in modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, hidden), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, r), dtype=np.float32)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    document = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": list(modules),
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_dropout": 0.0,
        "base_model_name_or_path": base_model,
        "task_type": "CAUSAL_LM",
        **(config or {}),
    }
    (root / "adapter_config.json").write_text(json.dumps(document))
    return root


def invoke(*args: Any) -> Result:
    from atmoe.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def ok(*args: Any) -> Result:
    result = invoke(*args)
    assert result.exit_code == 0, (args, result.output)
    return result


def assert_one_line(result: Result, code: int, fragment: str = "", *, prefix: str = "Error: ") -> str:
    """Exit ``code``, exactly one line on stderr starting with ``prefix``, no traceback."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix) and fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def assert_one_line_error(result: Result, code: int, fragment: str) -> str:
    """``assert_one_line``, and nothing on stdout: a refused command prints no partial result."""
    line = assert_one_line(result, code, fragment)
    assert result.stdout == "", result.stdout
    return line
