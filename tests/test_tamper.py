"""A blob altered (or lost) on disk: verify exits 1 naming the expert; a build fails before any weight loads."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from store_tools import drop_cached, flip_byte  # noqa: E402
from synthetic_lora import assert_one_line, invoke, ok, write_adapter  # noqa: E402

from atmoe.errors import ChecksumMismatch  # noqa: E402
from atmoe.registry import Registry  # noqa: E402
from atmoe.registry.validate import CONFIG_FILE, WEIGHTS_FILE  # noqa: E402


@pytest.fixture
def catalog(tmp_path: Path) -> dict[str, str]:
    """dx, rx (functional), gastro (domain), composition med@1 with router 1; returns blob digests."""
    from safetensors.numpy import save

    from atmoe.registry.compositions import get_composition
    from atmoe.registry.routers import record_router

    for seed, (name, group, r) in enumerate(
        [("dx", "functional", 4), ("rx", "functional", 4), ("gastro", "domain", 2)]
    ):
        # gastro's rank differs, so its adapter_config.json is a blob of its own
        ok("add-expert", write_adapter(tmp_path / name, seed=seed, r=r), "--name", name, "--group", group)
    ok("compose", "--name", "med", "--groups", "functional,domain")
    with Registry.open() as registry:
        router_blob = registry.store.put_bytes(save({"router.weight": np.zeros((2, 2), np.float32)})).digest
        registry.transact(
            lambda s: record_router(
                s,
                get_composition(s, "med"),
                blob_digest=router_blob,
                data_digest=None,
                eval_data_digest=None,
                hyperparameters={},
                metrics={},
            )
        )
        files = {f.path: f.sha256 for f in registry.get_expert("gastro").files}
    return {"weights": files[WEIGHTS_FILE], "config": files[CONFIG_FILE], "router": router_blob}


def _alter(digest: str, *, offset: int = -1) -> None:
    flip_byte(digest, offset)


def _remove(digest: str) -> None:
    with Registry.open() as registry:
        registry.store.remove(digest)
    drop_cached(digest)


@pytest.fixture
def no_weights_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a build gets as far as loading the base model or parsing any weights."""
    import atmoe.loading
    import atmoe.registry.build as build

    def forbidden(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("a weight was loaded before the blobs were verified")

    monkeypatch.setattr(atmoe.loading, "load_base_model", forbidden)
    monkeypatch.setattr(build, "_adapter", forbidden)
    monkeypatch.setattr(build, "load_router_bytes", forbidden)


TAMPERS: dict[str, tuple[str, Callable[[str], None], str]] = {
    "expert weights altered": ("weights", _alter, "gastro@1 adapter_model.safetensors: blob sha256:{} is altered"),
    "expert weights altered at the header": ("weights", lambda d: _alter(d, offset=10), "gastro@1 adapter_model"),
    "expert config altered": ("config", _alter, "gastro@1 adapter_config.json: blob sha256:{} is altered"),
    "expert weights missing": ("weights", _remove, "gastro@1 adapter_model.safetensors: blob sha256:{} is missing"),
    "router weights altered": ("router", _alter, "med@1:1: blob sha256:{} is altered"),
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_verify_names_the_tampered_blob_and_build_fails_before_loading(
    case: str, catalog: dict[str, str], no_weights_loaded: None, snapshot: Callable[[], Any]
) -> None:
    which, tamper, message = TAMPERS[case]
    digest = catalog[which]
    tamper(digest)
    before = snapshot()

    assert_one_line(invoke("verify"), 1, message.format(digest))
    if which != "router":
        assert_one_line(invoke("verify", "gastro"), 1, "gastro@1")
        assert "OK:" in ok("verify", "dx").stderr  # the other experts are intact
    with Registry.open() as registry:
        with pytest.raises(ChecksumMismatch, match=digest):
            registry.build("med")
    assert_one_line(invoke("route", "med", "hello"), 1, f"sha256:{digest}")
    assert_one_line(invoke("generate", "med", "hello"), 1, f"sha256:{digest}")
    assert snapshot() == before  # detecting damage changes nothing


def test_build_fails_without_importing_torch(catalog: dict[str, str]) -> None:
    """Stronger than a patch: the failing build never even imports torch or transformers."""
    _alter(catalog["weights"])
    code = (
        "import sys\n"
        "from atmoe.errors import ChecksumMismatch\n"
        "from atmoe.registry import Registry\n"
        "try:\n"
        "    Registry.open().build('med')\n"
        "except ChecksumMismatch as error:\n"
        "    print(error)\n"
        "else:\n"
        "    raise SystemExit('built a composition with an altered blob')\n"
        "loaded = [m for m in ('torch', 'transformers', 'safetensors.torch') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    assert catalog["weights"] in result.stdout


def test_an_intact_catalog_verifies_and_the_same_blob_restored_verifies_again(catalog: dict[str, str]) -> None:
    assert "OK: " in ok("verify").stderr
    _alter(catalog["weights"])
    assert invoke("verify").exit_code == 1
    _alter(catalog["weights"])  # flip the bit back: the content is the original again
    assert "OK: " in ok("verify").stderr
