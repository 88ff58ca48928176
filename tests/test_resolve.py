"""`resolve`: the first candidate whose metadata serves the algorithm, or why none does."""

from __future__ import annotations

from pathlib import Path

import pytest

import wmtp
from tests.builders import REAL


def real(name: str) -> str:
    return str(REAL / name)


def test_resolve_picks_first_compatible_in_order() -> None:
    paths = [real("distilgpt2-mtp"), real("distilgpt2"), real("tiny-reward-model")]
    assert wmtp.resolve("rho1-wmtp", paths) == real("distilgpt2-mtp")
    assert wmtp.resolve("rho1-wmtp", paths[1:]) == real("distilgpt2")
    assert wmtp.resolve("critic-wmtp", paths[1:]) == real("tiny-reward-model")


def test_resolve_by_role() -> None:
    paths = [real("distilgpt2-mtp"), real("tiny-reward-model-gpt2")]
    assert wmtp.resolve("critic-wmtp", paths, role="reward_model") == real("tiny-reward-model-gpt2")


def test_resolve_reads_only_metadata(tmp_path: Path) -> None:
    # A folder with nothing but metadata.json resolves: weights are never opened.
    folder = tmp_path / "only-metadata"
    folder.mkdir()
    (folder / "metadata.json").write_bytes((REAL / "distilgpt2" / "metadata.json").read_bytes())
    assert wmtp.resolve("rho1-wmtp", [str(folder)]) == str(folder)


def test_resolve_explains_every_candidate(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.json").write_text("{")
    empty = tmp_path / "empty"
    empty.mkdir()
    paths = [real("distilgpt2"), str(broken), str(empty), real("tiny-reward-model")]
    with pytest.raises(wmtp.NoCompatibleModelError) as err:
        wmtp.resolve("critic-wmtp", paths, role="base_model")
    lines = str(err.value).splitlines()
    assert lines[0] == "no candidate serves 'critic-wmtp' as base_model:"
    assert lines[1] == f"  {real('distilgpt2')}: algorithm_compatibility is ['rho1-wmtp']"
    assert lines[2].startswith(f"  {broken}: MetadataError: {broken}/metadata.json: not valid JSON")
    assert lines[3].startswith(f"  {empty}: ModelFileError: {empty}/metadata.json does not exist")
    assert lines[4] == (
        f"  {real('tiny-reward-model')}: serves critic-wmtp but wmtp_type is 'reward_model', "
        "not 'base_model'"
    )


def test_resolve_suggests_close_algorithm() -> None:
    with pytest.raises(wmtp.NoCompatibleModelError, match=r"did you mean 'critic-wmtp'\?"):
        wmtp.resolve("critic-wmpt", [real("tiny-reward-model"), real("distilgpt2")])


def test_resolve_no_strategy_is_invalid() -> None:
    folder = str(REAL.parent / "wmtp-no-strategy" / "distilgpt2")
    with pytest.raises(
        wmtp.NoCompatibleModelError, match=r"MetadataError: .*no `loading_strategy`"
    ):
        wmtp.resolve("rho1-wmtp", [folder])


def test_resolve_rejects_unknown_role() -> None:
    with pytest.raises(wmtp.OptionError, match=r"role 'critic' is not a wmtp_type"):
        wmtp.resolve("critic-wmtp", [real("distilgpt2")], role="critic")  # type: ignore[arg-type]


def test_resolve_with_no_candidates() -> None:
    with pytest.raises(wmtp.NoCompatibleModelError, match=r"no candidates given"):
        wmtp.resolve("rho1-wmtp", [])
