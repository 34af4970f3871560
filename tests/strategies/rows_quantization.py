"""Matrix rows of the quantisation methods (torchao): QLoRA on convolutions and quantisation-aware training.

Each row needs torchao and is skipped without it (``requires``); ``test_qlora.py`` and ``test_qat.py`` check the
methods against torchao's reference quantisers.
"""

from __future__ import annotations

from functools import partial

from matrix_kit import LORA_SPEC, Row, _all, _lora_count, _lora_params, _lora_spec, injected_row

from cvft.strategies.lowrank import merge_low_rank

# QAT with LoRA: LoRA's BatchNorm policy ("train") and the LoRA updates as the trained parameters. Fake-quantised or
# NF4-rounded weights change the function at the start: test_qat and test_qlora compare with torchao's references.
lora_row = partial(
    injected_row,
    params=_lora_params,
    injected=_lora_count,
    bn_fixed="none",
    lr=3e-2,
    requires=("torchao",),
    unchanged_at_init=False,
)
PER_TOKEN = {"name": "qat", "activations": "per_token"}
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
    lora_row("qat-per_token+lora", lambda model_name: [PER_TOKEN, _lora_spec(model_name)]),
    # merged into the fake-quantised base weight: exact for weight-only QAT
    lora_row("qat+lora", lambda model_name: ["qat", _lora_spec(model_name)], merge=merge_low_rank),
    lora_row(
        "qlora-conv",
        [{**LORA_SPEC, "name": "qlora", "targets": "resnet_blocks"}],
        merge=merge_low_rank,
        models=("test_resnet",),
    ),
]
