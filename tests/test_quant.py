"""Quantised loading (`load(quantization=)`): bitsandbytes' layers filled as the checkpoint is
read, bit for bit what `from_pretrained` with the same `BitsAndBytesConfig` gives."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Final

import pytest
import torch
import transformers

import wmtp
from tests import builders
from tests.conftest import Copy
from wmtp.check import check
from wmtp.cli import main
from wmtp.errors import MetadataError, OptionError, WmtpError

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")  # from_pretrained's quantisation needs it (the peer)

# bitsandbytes' packed CPU kernel for 4-bit inference (CPUs with AVX512-BF16) takes layers of
# whole 64-input blocks only: the peer's forward fails on narrower ones, so these are wider.
WIDE: Final = {"n_embd": 64}
LLAMA_WIDE: Final = {
    **{k: v for k, v in builders.LLAMA.items() if k != "mtp_config"},
    "hidden_size": 64,
    "intermediate_size": 128,
}
IDS: Final = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [12, 11, 10, 9, 8, 7, 6, 5]])


def loaded(folder: Path, **options: Any) -> Any:
    """`wmtp.load`, its model typed for attribute access."""
    return wmtp.load(folder, **options)


def bnb_config(quantization: str, dtype: torch.dtype = torch.bfloat16) -> Any:
    """The `BitsAndBytesConfig` that wmtp's `quantization=` (with `dtype=`) stands for."""
    if quantization == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    return transformers.BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=dtype
    )


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A GPT-2 reference and reward model and a Llama causal LM, wide enough for the peer's
    4-bit forward; the Llama saved by transformers' own `save_pretrained`."""
    root = tmp_path_factory.mktemp("quant")
    shrink = builders.GPT2_SHRINK_ALL | WIDE
    llama = root / "llama"
    builders.hf_model("AutoModelForCausalLM", LLAMA_WIDE).save_pretrained(llama)  # type: ignore[operator]
    meta = {
        "wmtp_type": "reference_model",
        "storage_version": "2.0",
        "loading_strategy": {
            "loader_type": "huggingface",
            "transformers_class": "AutoModelForCausalLM",
            "required_files": ["config.json", "model.safetensors"],
        },
        "algorithm_compatibility": ["rho1-wmtp"],
    }
    (llama / "metadata.json").write_text(json.dumps(meta))
    return {
        "gpt2": builders.save_hf(root / "gpt2", "distilgpt2", "AutoModelForCausalLM", shrink),
        "reward": builders.save_hf(
            root / "reward", "tiny-reward-model-gpt2", "AutoModelForCausalLM", shrink, 1
        ),
        "llama": llama,
    }


def peer(folder: Path, quantization: str, dtype: torch.dtype | None = None) -> Any:
    """`from_pretrained` with the `BitsAndBytesConfig` of `quantization`, on the CPU."""
    config = bnb_config(quantization, dtype or torch.bfloat16)
    options = {} if dtype is None else {"dtype": dtype}
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map="cpu", **options
    )


def quant_state(param: torch.Tensor) -> dict[str, Any]:
    """What bitsandbytes keeps beside a quantised weight: SCB for int8; absmax, quant_map and
    the rest of the QuantState (as `Linear4bit` saves it) for 4-bit."""
    if isinstance(param, bnb.nn.Int8Params):
        return {"SCB": param.SCB, "CB": param.CB}
    if isinstance(param, bnb.nn.Params4bit):
        state: dict[str, Any] = param.quant_state.as_dict(packed=True)
        return {**state, "absmax": param.quant_state.absmax, "quant_map": param.quant_map}
    return {}


def assert_same(mine: torch.nn.Module, theirs: torch.nn.Module, apart: str = "") -> None:
    """The same module classes, and every parameter and buffer bit for bit: data, type, dtype,
    quantisation state; all but module `apart`, when given."""
    kinds = {name: type(m).__name__ for name, m in mine.named_modules() if name != apart}
    assert kinds == {name: type(m).__name__ for name, m in theirs.named_modules() if name != apart}
    params, others = dict(mine.named_parameters()), dict(theirs.named_parameters())
    assert params.keys() == others.keys()
    for name, param in params.items():
        if apart and name.startswith(f"{apart}."):
            continue
        other = others[name]
        assert type(param) is type(other), name
        assert param.dtype == other.dtype and param.shape == other.shape, name
        assert torch.equal(param.data, other.data), name
        state, expected = quant_state(param), quant_state(other)
        assert state.keys() == expected.keys(), name
        for key, value in state.items():
            assert torch.equal(value, expected[key]), f"{name}.{key}"
    buffers = dict(theirs.named_buffers())
    for name, buffer in mine.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


def logits(model: torch.nn.Module) -> torch.Tensor:
    """The logits for `IDS`, in eval mode without gradients (as a frozen model is used)."""
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=torch.ones_like(IDS))
    found: torch.Tensor = out["logits"] if isinstance(out, dict) else out.logits
    return found


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_weights_and_logits_are_from_pretrained_s(
    wide: dict[str, Path], name: str, quantization: str
) -> None:
    mine, theirs = loaded(wide[name], quantization=quantization), peer(wide[name], quantization)
    assert_same(mine, theirs)  # before a forward pass, which repacks 4-bit weights on some CPUs
    kind = bnb.nn.Linear8bitLt if quantization == "int8" else bnb.nn.Linear4bit
    layers = {"gpt2": 2 * 4, "llama": 2 * 7}[name]  # attention and MLP of each block
    assert sum(isinstance(m, kind) for m in mine.modules()) == layers
    assert torch.equal(logits(mine), logits(theirs))


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_a_sequence_classifier_is_from_pretrained_s(
    models: dict[str, Path], quantization: str
) -> None:
    folder = models["distilbert_reward"]  # DistilBertForSequenceClassification, 32 wide
    auto = transformers.AutoModelForSequenceClassification
    theirs = auto.from_pretrained(
        folder, quantization_config=bnb_config(quantization), device_map="cpu"
    )
    mine, full = loaded(folder, quantization=quantization), loaded(folder)
    # transformers means to keep the last layer, but names a last bias "classifier.bias", which
    # is no module: from_pretrained quantises the reward head; wmtp keeps it
    assert isinstance(theirs.classifier, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit)
    assert type(mine.classifier) is torch.nn.Linear
    assert torch.equal(mine.classifier.weight, full.classifier.weight)
    assert_same(mine, theirs, apart="classifier")


def test_llama_quantises_its_seven_linear_layers_per_block(wide: dict[str, Path]) -> None:
    model = loaded(wide["llama"], quantization="nf4")
    layers = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7 and not any("lm_head" in n for n in layers)
    assert type(model.lm_head) is torch.nn.Linear


def test_a_cast_and_4bit_compute_dtype_are_from_pretrained_s(wide: dict[str, Path]) -> None:
    mine = loaded(wide["llama"], quantization="nf4", dtype="bf16")
    theirs = peer(wide["llama"], "nf4", torch.bfloat16)
    assert_same(mine, theirs)
    assert mine.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    assert mine.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(logits(mine), logits(theirs))


def test_a_cast_happens_per_tensor_as_each_is_quantised(
    wide: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = sys.modules["wmtp.load"]
    casts: list[Any] = []

    def spy(*args: Any) -> Any:
        casts.append(args[2:])
        return read(*args)

    read = module.read_tensors
    monkeypatch.setattr(module, "read_tensors", spy)
    model = loaded(wide["gpt2"], quantization="int8", dtype="bf16")
    assert casts == [(None,)]  # mapped, not cast all at once: never the whole model in bf16
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert model.transformer.h[0].attn.c_attn.bias.dtype == torch.bfloat16
    loaded(wide["gpt2"], dtype="bf16")
    assert casts[-1] == (torch.bfloat16,)  # a plain load casts as it reads


def test_fp4_is_from_pretrained_s(wide: dict[str, Path]) -> None:
    mine, theirs = loaded(wide["gpt2"], quantization="fp4"), peer(wide["gpt2"], "fp4")
    assert_same(mine, theirs)
    assert mine.transformer.h[0].mlp.c_fc.weight.quant_type == "fp4"


def test_tied_head_and_embedding_stay_in_full_precision_and_stay_tied(
    wide: dict[str, Path],
) -> None:
    model = loaded(wide["gpt2"], quantization="int8")
    full = loaded(wide["gpt2"])
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, full.lm_head.weight)
    assert model.is_loaded_in_8bit and model.config.quantization_config.load_in_8bit


def test_the_model_carries_what_from_pretrained_sets(wide: dict[str, Path]) -> None:
    mine, theirs = loaded(wide["gpt2"], quantization="nf4", device="cpu"), peer(wide["gpt2"], "nf4")
    for name in ("is_quantized", "is_loaded_in_4bit", "quantization_method"):
        assert getattr(mine, name) == getattr(theirs, name), name
    assert mine.config.quantization_config.to_dict() == theirs.config.quantization_config.to_dict()
    with pytest.raises(ValueError, match="not supported for quantized model"):
        mine.half()  # transformers' own guard
    assert torch.equal(logits(mine), logits(theirs))  # device="cpu" moved nothing it should not


@pytest.mark.parametrize(("quantization", "atol"), [("int8", 0.03), ("nf4", 0.4), ("fp4", 0.6)])
def test_the_example_mtp_model_quantised_runs_close_to_full_precision(
    quantization: str, atol: float
) -> None:
    folder = builders.EXAMPLES / "tiny-mtp"
    full, model = loaded(folder), loaded(folder, quantization=quantization)
    layers = [n for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")]
    assert len(layers) == 8  # the trunk's attention and MLP layers; no head
    heads = [model.base_model.lm_head, *model.extra_heads]
    assert all(type(head) is torch.nn.Linear for head in heads)  # onto the vocabulary
    for head, same in zip(heads, [full.base_model.lm_head, *full.extra_heads], strict=True):
        assert torch.equal(head.weight, same.weight)
    expected, got = logits(full), logits(model)
    assert got.shape == expected.shape == (2, 8, 4, 256)
    # measured: int8 0.011, nf4 0.22, fp4 0.30 (logits up to 2.2)
    assert torch.allclose(got, expected, atol=atol, rtol=0)
    assert not torch.equal(got, expected)


def test_the_quantised_base_model_trains_what_stays_in_full_precision() -> None:
    model = loaded(builders.EXAMPLES / "tiny-mtp", quantization="nf4").train()
    out = model(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=IDS)
    out["loss"].backward()
    assert model.base_model.transformer.wte.weight.grad is not None
    assert model.extra_heads[0].weight.grad is not None
    attention = model.base_model.transformer.h[0].attn.c_attn
    assert not attention.weight.requires_grad and attention.bias.grad is not None


def test_keep_full_precision_names_modules_that_stay(wide: dict[str, Path], copy: Copy) -> None:
    folder = builders.edit_metadata(
        copy(wide["gpt2"]), keep_full_precision=["transformer.h.0.mlp", "c_proj"]
    )
    model, full = loaded(folder, quantization="nf4"), loaded(folder)
    kept = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    blocks = ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert kept == {*blocks, "transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj",
                    "transformer.h.1.mlp.c_proj"}  # fmt: skip
    for name in kept:
        weight = f"{name}.weight"
        assert torch.equal(model.get_parameter(weight), full.get_parameter(weight))
    assert isinstance(model.transformer.h[1].attn.c_attn, bnb.nn.Linear4bit)


@pytest.mark.parametrize(
    ("names", "words"),
    [
        (["transformer.h.0.mpl"], "no module of GPT2LMHeadModel: 'transformer.h.0.mpl' (closest:"),
        (["h.0.mlp["], "is no valid pattern"),
    ],
)
def test_keep_full_precision_that_matches_nothing_is_refused(
    models: dict[str, Path], copy: Copy, names: list[str], words: str
) -> None:
    folder = builders.edit_metadata(copy(models["gpt2_reference"]), keep_full_precision=names)
    with pytest.raises(MetadataError, match=r"keep_full_precision") as error:
        loaded(folder, quantization="int8")
    assert words in str(error.value)
    assert loaded(folder).lm_head.weight.dtype == torch.float32  # unused without quantization
    assert any(words in p for p in check(folder, quantization="int8").problems)


@pytest.mark.parametrize("value", ["lm_head", [""], [1]])
def test_keep_full_precision_is_validated_with_the_metadata(
    models: dict[str, Path], copy: Copy, value: Any
) -> None:
    folder = builders.edit_metadata(copy(models["gpt2_reference"]), keep_full_precision=value)
    with pytest.raises(MetadataError, match=r"\$\.loading_strategy\.keep_full_precision"):
        wmtp.read_metadata(folder)


@pytest.mark.parametrize("name", ["nf8", "INT8", 4, "int4"])
def test_an_unknown_quantization_lists_the_valid_ones(models: dict[str, Path], name: Any) -> None:
    with pytest.raises(OptionError, match="unknown quantization") as error:
        loaded(models["gpt2_reference"], quantization=name)
    assert "'int8', 'nf4', 'fp4'" in str(error.value)


def test_without_bitsandbytes_the_error_says_what_to_install(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes fails
    with pytest.raises(OptionError, match=r'pip install "wmtp\[quant\]"'):
        loaded(models["gpt2_reference"], quantization="nf4")
    report = check(models["gpt2_reference"], quantization="nf4")
    assert len(report.problems) == 1 and "needs bitsandbytes" in report.problems[0]
    assert loaded(models["gpt2_reference"]) is not None  # a plain load needs none of it


def test_check_says_which_layers_it_would_quantise(wide: dict[str, Path]) -> None:
    report = check(wide["gpt2"], quantization="nf4")
    assert report.problems == ()
    assert report.quantization is not None
    assert report.quantization.startswith(f"nf4 with bitsandbytes {bnb.__version__}: 8 linear")
    assert report.quantization.endswith("kept in full precision: lm_head")
    assert check(wide["gpt2"]).quantization is None  # not asked


def test_a_quantised_model_is_not_saved(wide: dict[str, Path], tmp_path: Path) -> None:
    model = loaded(wide["gpt2"], quantization="nf4")
    with pytest.raises(OptionError, match="loaded quantised") as error:
        wmtp.save(model, tmp_path / "out", wmtp_type="reference_model", algorithm_compatibility=[])
    assert "without quantization=" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_quantization_with_parallelize_is_refused(models: dict[str, Path]) -> None:
    with pytest.raises(OptionError, match="cannot be combined"):
        loaded(models["gpt2_reference"], quantization="nf4", parallelize=lambda model: None)


def test_load_roles_quantises_each_role_as_asked(wide: dict[str, Path], copy: Copy) -> None:
    base = copy(builders.EXAMPLES / "tiny-mtp")
    paths = [base, wide["gpt2"], wide["reward"]]
    asked = {"reference_model": "nf4"}
    models: dict[str, Any] = wmtp.load_roles("rho1-wmtp", paths, quantization=asked)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in models["base_model"].modules())
    assert isinstance(models["reference_model"].transformer.h[0].attn.c_attn, bnb.nn.Linear4bit)
    assert not any(p.requires_grad for p in models["reference_model"].parameters())
    both: dict[str, Any] = wmtp.load_roles(
        "critic-wmtp", paths, quantization={"reward_model": "int8"}
    )
    assert isinstance(both["reward_model"].transformer.h[1].mlp.c_fc, bnb.nn.Linear8bitLt)
    everything: dict[str, Any] = wmtp.load_roles("critic-wmtp", paths, quantization="int8")
    assert isinstance(everything["base_model"].extra_heads[0], torch.nn.Linear)
    assert isinstance(everything["base_model"].base_model.transformer.h[0].attn.c_attn,
                      bnb.nn.Linear8bitLt)  # fmt: skip


def test_load_roles_checks_the_quantization_before_any_load(
    wide: dict[str, Path], copy: Copy, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = copy(builders.EXAMPLES / "tiny-mtp")
    reads: list[Any] = []
    monkeypatch.setattr(sys.modules["wmtp.load"], "read_tensors", lambda *a: reads.append(a))
    with pytest.raises(WmtpError, match="these models would not load") as error:
        wmtp.load_roles("rho1-wmtp", [base, wide["gpt2"]], quantization={"reference_model": "q4"})
    assert error.value.problems[0].startswith(f"reference_model ({wide['gpt2']}): unknown")
    assert reads == []  # no model was filled


def test_cli_quantize(capsys: pytest.CaptureFixture[str], wide: dict[str, Path]) -> None:
    assert main(["load", str(wide["gpt2"]), "--quantize", "nf4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quantization"] == "nf4" and "uint8" in result["dtype"]
    assert main(["check", str(wide["gpt2"]), "--quantize", "int8"]) == 0
    assert "quantization: int8 with bitsandbytes" in capsys.readouterr().out
    assert main(["load", str(wide["gpt2"]), "--quantize", "nf8"]) == 1
    assert "unknown quantization 'nf8'" in capsys.readouterr().err


def test_only_the_tools_and_load_import_quant_and_it_imports_below_itself() -> None:
    from tests.test_layers import graph

    edges = graph()
    assert {m for m, targets in edges.items() if "wmtp.quant" in targets} <= {
        "wmtp.load", "wmtp.check", "wmtp.roles", "wmtp.cli", "wmtp.save",
    }  # fmt: skip
    allowed = {"wmtp.errors", "wmtp.hints", "wmtp.metadata", "wmtp.build", "wmtp.weights"}
    assert edges["wmtp.quant"] <= allowed
