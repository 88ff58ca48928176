"""Model folders built once per test session; tests that change one work on a copy."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import builders
from tests.s3server import S3Server, start_gateway, stop_gateway

Copy = Callable[[Path], Path]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Remote downloads of every test go to a temporary cache, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("wmtp-cache")
        patch.setenv("WMTP_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every kind of model the loader serves, by name."""
    root = tmp_path_factory.mktemp("models")
    return {
        "mtp": builders.save_mtp(root / "mtp"),
        "llama_mtp": builders.save_llama_mtp(root / "llama_mtp"),
        "gpt2_reference": builders.save_gpt2_reference(root / "gpt2_reference"),
        "gpt2_reward": builders.save_gpt2_reward(root / "gpt2_reward"),
        "distilbert_reward": builders.save_distilbert_reward(root / "distilbert_reward"),
    }


@pytest.fixture
def copy(tmp_path: Path) -> Copy:
    """A fresh copy of a model folder, safe to edit."""

    def make(src: Path) -> Path:
        dest = tmp_path / src.name
        shutil.copytree(src, dest)
        return dest

    return make


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (JuiceFS gateway) on 127.0.0.1, for the whole session."""
    server = start_gateway(tmp_path_factory.mktemp("s3gateway"))
    try:
        yield server
    finally:
        stop_gateway(server)
