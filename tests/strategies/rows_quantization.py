"""Matrix rows of the quantisation methods (torchao): QLoRA on convolutions and quantisation-aware training.

Each row needs torchao and is skipped without it (``requires``); ``test_qlora.py`` and ``test_qat.py`` check the
methods against torchao's reference quantisers.
"""

from __future__ import annotations

from matrix_kit import LORA_SPEC, Row, _head, _lora_count, _lora_params, _union

from cvft.strategies.lowrank import merge_low_rank

ROWS = [
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
