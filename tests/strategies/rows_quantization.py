"""Matrix rows of the quantisation methods (torchao): QLoRA on convolutions and quantisation-aware training.

Each row needs torchao and is skipped without it (``requires``); ``test_qlora.py`` and ``test_qat.py`` check the
methods against torchao's reference quantisers.
"""

from __future__ import annotations

from matrix_kit import LORA_SPEC, Row, _all, _head, _lora_count, _lora_params, _lora_spec, _union

from cvft.strategies.lowrank import merge_low_rank

ROWS = [
    Row(
        "qat",
        ["qat"],
        _all,  # qat decides nothing about training: alone, every parameter trains (as in `full`)
        lambda d: d.total,
        lr=1e-3,
        requires=("torchao",),
        unchanged_at_init=False,  # int8 rounding of the weights changes the function; test_qat checks it
    ),
    Row(
        "qat-per_token+lora",
        [{"name": "qat", "activations": "per_token"}, LORA_SPEC],
        _union(_head, _lora_params),
        lambda d: d.head + d.injected,
        injected=_lora_count,
        specs_for=lambda model_name: [{"name": "qat", "activations": "per_token"}, _lora_spec(model_name)],
        bn_fixed="none",
        lr=3e-2,
        requires=("torchao",),
        unchanged_at_init=False,
    ),
    Row(
        "qat+lora",
        ["qat", LORA_SPEC],
        _union(_head, _lora_params),
        lambda d: d.head + d.injected,
        injected=_lora_count,
        specs_for=lambda model_name: ["qat", _lora_spec(model_name)],
        merge=merge_low_rank,  # into the fake-quantised base weight: exact for weight-only QAT
        bn_fixed="none",
        lr=3e-2,
        requires=("torchao",),
        unchanged_at_init=False,
    ),
    Row(
        "qlora-conv",
        [{**LORA_SPEC, "name": "qlora", "targets": "resnet_blocks"}],
        _union(_head, _lora_params),
        lambda d: d.head + d.injected,
        injected=_lora_count,
        merge=merge_low_rank,
        bn_fixed="none",  # LoRA's BatchNorm policy: "train"
        lr=3e-2,
        models=("test_resnet",),
        requires=("torchao",),
        # NF4 rounding of the base weights changes the function; test_qlora compares with the dequantised base
        unchanged_at_init=False,
    ),
]
