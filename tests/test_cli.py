"""The `wmtp` command: output, JSON, exit codes, and a fast start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.builders import EXAMPLES, REAL
from wmtp.cli import main


def test_load_prints_what_was_loaded(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", str(EXAMPLES / "tiny-mtp")]) == 0
    out = capsys.readouterr().out
    assert "class: DistilGPT2MTP" in out
    assert "parameters: 60288" in out
    assert "dtype: float32" in out
    assert "seconds: " in out


def test_load_json_with_dtype(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", str(EXAMPLES / "tiny-mtp"), "--dtype", "bf16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["class"] == "DistilGPT2MTP"
    assert result["dtype"] == ["bfloat16"]
    assert result["weight_bytes"] == 60288 * 2
    assert set(result["phases"]) == {"fetch", "import", "build", "assign"}


def test_problem_exits_1_with_message(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["load", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"wmtp load: {tmp_path}/metadata.json does not exist")
    assert "Traceback" not in err


def test_problem_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resolve", "critic-wmpt", str(REAL / "tiny-reward-model"), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["error"] == "OptionError"
    assert "did you mean 'critic-wmtp'?" in result["message"]


def test_resolve_prints_choice(capsys: pytest.CaptureFixture[str]) -> None:
    paths = [str(REAL / "distilgpt2"), str(REAL / "tiny-reward-model")]
    assert main(["resolve", "critic-wmtp", *paths, "--role", "reward_model", "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)["roles"]["reward_model"]
    assert chosen["location"] == paths[1]
    assert chosen["passed_over"] == {paths[0]: "algorithm_compatibility is ['rho1-wmtp']"}


def test_bad_usage_exits_2() -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["load"])
    assert exit_.value.code == 2


def test_help_does_not_import_torch() -> None:
    code = "import sys; from wmtp.cli import parser; parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_import_wmtp_does_not_import_torch_or_transformers() -> None:
    code = "import sys, wmtp; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
