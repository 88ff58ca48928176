"""Quantised loading (imported when `load` gets `quantization=`), with bitsandbytes' own layers
and transformers' own rules: "int8" is LLM.int8() (`bnb.nn.Linear8bitLt`), "nf4" and "fp4" are
`bnb.nn.Linear4bit`. transformers' `replace_with_bnb_linear` puts them in place of the linear
layers of the model built empty (parameters on meta), except those that stay in full precision;
then each weight is cast (with `dtype`) and quantised by bitsandbytes as it is read from the
mapped checkpoint, on its device, one at a time: the model is never held in full precision."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from wmtp.build import Groups, assign
from wmtp.metadata import LoadingStrategy

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig

QUANTIZATIONS: Final = ("int8", "nf4", "fp4")


def config(quantization: object, dtype: torch.dtype | None = None) -> BitsAndBytesConfig:
    """transformers' `BitsAndBytesConfig` for `quantization` ("int8", "nf4", "fp4"; 4-bit layers
    compute in `dtype`, default bfloat16); `OptionError` for another name, or when bitsandbytes
    does not import."""
    import torch

    if quantization not in QUANTIZATIONS:
        from wmtp.hints import unknown_quantization

        raise unknown_quantization(quantization, QUANTIZATIONS)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        from wmtp.hints import no_quant_package

        raise no_quant_package(str(quantization), e) from None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    compute = dtype or torch.bfloat16
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=compute
    )


def full_precision(model: torch.nn.Module, strategy: LoadingStrategy) -> list[str]:
    """The names of the modules that stay in full precision, as patterns of transformers'
    `should_convert_module`: what transformers skips for each of its models inside `model`
    (`get_keys_to_not_convert`: output embeddings, tied weights, the last layer, and the
    class's `_keep_in_fp32_modules`), the last layer also when its last parameter is a bias;
    for a model of the folder's own module, also anything tied, its last layer and every
    linear layer onto the vocabulary (the future-token heads); and the names in
    `loading_strategy.keep_full_precision` (`MetadataError` for a name matching nothing)."""
    import torch
    from transformers import PreTrainedModel
    from transformers.quantizers.base import get_keys_to_not_convert

    kept: list[str] = []  # transformers' patterns, as it passes them
    exact: list[str] = []  # module names, matched whole
    outer: list[str] = []  # transformers models not inside another: what from_pretrained sees
    for prefix, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            if any(o == "" or prefix.startswith(f"{o}.") for o in outer):
                continue
            outer.append(prefix)
            own = [*get_keys_to_not_convert(module), *(module._keep_in_fp32_modules or ())]
            kept += [f"{prefix}.{name}" if prefix else name for name in own]
            exact.append(".".join(filter(None, (prefix, last_layer(module)))))
    if not isinstance(model, PreTrainedModel):
        state = model.state_dict(keep_vars=True)
        uses = Counter(id(tensor) for tensor in state.values())
        exact += [name.rpartition(".")[0] for name, t in state.items() if uses[id(t)] > 1]
        exact.append(last_layer(model))
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        exact += [
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module.out_features == vocab
        ]
    names = [name for name, _ in model.named_modules()]
    if unmatched := [k for k in strategy.keep_full_precision if not any(map(matcher(k), names))]:
        from wmtp.hints import unmatched_modules

        raise unmatched_modules(unmatched, names, type(model).__name__)
    anchored = {f"{re.escape(name)}$" for name in exact if name}  # never "pre_" + a name
    return sorted({*kept, *anchored, *strategy.keep_full_precision})


def last_layer(module: torch.nn.Module) -> str:
    """The name of the module that holds the last parameter of `module` ("" for none): the
    layer transformers means to keep in full precision (but it takes a last bias, such as a
    sequence classifier's `classifier.bias`, for a module name, and quantises that layer)."""
    names = [name for name, _ in module.named_parameters()]
    return names[-1].rpartition(".")[0] if names else ""


def matcher(pattern: str) -> Callable[[str], bool]:
    """Whether a module name is one `pattern` keeps, as transformers' `should_convert_module`
    reads it: from the start to a module boundary, as a regex, or as a suffix."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    try:
        re.compile(pattern)
    except re.error as e:
        from wmtp.hints import bad_module_pattern

        raise bad_module_pattern(pattern, e) from None
    return lambda name: not should_convert_module(name, [pattern])


def prepare(
    model: torch.nn.Module,
    quantization: object,
    strategy: LoadingStrategy,
    dtype: torch.dtype | None = None,
) -> BitsAndBytesConfig:
    """Put bitsandbytes' layers in place of the linear layers of `model` (built empty) that do
    not stay in full precision, as `from_pretrained` does; its `BitsAndBytesConfig`."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.utils import logging

    bnb_config = config(quantization, dtype)
    kept = full_precision(model, strategy)
    verbosity = logging.get_verbosity()  # a model with nothing to quantise is fine: no warning
    logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        replace_with_bnb_linear(model, modules_to_not_convert=kept, quantization_config=bnb_config)
    finally:
        logging.set_verbosity(verbosity)
    return bnb_config


def quantize(
    model: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    groups: Groups,
    quantization: object,
    strategy: LoadingStrategy,
    dtype: torch.dtype | None,
    device: torch.device | None,
    parallelize: object = None,
) -> torch.nn.Module:
    """`model` (built empty by `wmtp.load.plan`) with bitsandbytes' layers, each weight
    quantised from its tensor in `tensors` (mapped, by model key) as it is read, on `device`
    (default the CPU), as transformers' `Bnb4bitQuantize` and `Bnb8bitQuantize` do; every
    other tensor assigned as `wmtp.build.assign` does (cast to `dtype`, when given).

    Raises:
        OptionError: an unknown `quantization`, bitsandbytes missing, or `parallelize` given.
        MetadataError: a `keep_full_precision` name that matches no module.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    if parallelize is not None:
        from wmtp.hints import quantized_parallel

        raise quantized_parallel(str(quantization))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    bnb_config = prepare(model, quantization, strategy, dtype)
    import bitsandbytes as bnb  # `prepare` said it imports

    where, done = device or torch.device("cpu"), set[str]()

    def read(name: str) -> torch.Tensor:
        tensor = tensors[name]
        floating = dtype is not None and tensor.is_floating_point()
        return tensor.to(dtype) if floating else tensor

    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear8bitLt | bnb.nn.Linear4bit):
            continue
        value, old = read(f"{name}.weight"), module.weight
        if issubclass(getattr(module, "source_cls", torch.nn.Linear), Conv1D):
            value = value.T  # Conv1D stores the weight transposed, as transformers reads it
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight = bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__).to(where)
            # bitsandbytes' packed CPU kernel (AVX512-BF16, inference) takes only whole blocks
            # of inputs and 32 outputs at a time; other layers keep its general kernel
            if module.in_features % old.blocksize or module.out_features % 32:
                module.support_avx512bf16_for_cpu = False
        else:
            kwargs = {k: v for k, v in old.__dict__.items() if k != "SCB"}
            param = bnb.nn.Int8Params(value.to("cpu"), requires_grad=False, **kwargs)
            module.weight = param.to(where)
        done.add(f"{name}.weight")
    rest = [group for group in groups if group[0] not in done]
    assign(model, {name: read(name) for group in rest for name in group if name in tensors}, rest)
    for name, param in model.named_parameters():  # bitsandbytes' layers come frozen: not biases
        param.requires_grad_(name in trainable and param.is_floating_point())
    mark(model, bnb_config)
    return model


def mark(model: torch.nn.Module, bnb_config: Any) -> None:
    """Mark `model`, and each transformers model inside it, as `from_pretrained` marks a model
    it quantised with bitsandbytes (`is_loaded_in_4bit`, `config.quantization_config`...), so
    transformers' own checks (no `.to(dtype)`, no `.half()`) and PEFT see it."""
    from transformers import PreTrainedModel

    bits = "is_loaded_in_8bit" if bnb_config.load_in_8bit else "is_loaded_in_4bit"
    for module in [model, *(m for m in model.modules() if isinstance(m, PreTrainedModel))]:
        setattr(module, "is_quantized", True)  # noqa: B010 (mypy takes Module attributes for tensors)
        setattr(module, bits, True)
        module.quantization_method = bnb_config.quant_method
        if (found := getattr(module, "config", None)) is not None:
            found.quantization_config = bnb_config


def quantized(model: torch.nn.Module) -> list[str]:
    """The names of the parameters of `model` that bitsandbytes quantised."""
    return [
        name
        for name, param in model.named_parameters()
        if type(param).__module__.startswith("bitsandbytes")
    ]
