"""Small attention-side setups for the single-process tests: a window, a holder over it, views of its regions."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_npu

from afd.layout import align512


@dataclass
class AttentionSide:
    M: int
    BS: int
    K: int
    H: int
    window: torch.Tensor
    holder: object
    context: torch.Tensor

    @property
    def flags(self) -> torch.Tensor:  # [M, BS, K+1] int32 at the window's base
        n = self.M * self.BS * (self.K + 1)
        return self.window[:4 * n].view(torch.int32).view(self.M, self.BS, self.K + 1)

    @property
    def data(self) -> torch.Tensor:  # [M, BS, K+1, H] bf16 after align512(flags)
        n = self.M * self.BS * (self.K + 1)
        start = align512(4 * n)
        return self.window[start:start + 2 * n * self.H].view(torch.bfloat16).view(self.M, self.BS, self.K + 1,
                                                                                  self.H)


def attention_side(M=2, BS=4, K=2, H=64) -> AttentionSide:
    n = M * BS * (K + 1)
    size = align512(4 * n) + 2 * n * H
    window = torch.zeros(size, dtype=torch.int8).npu()
    holder = torch_npu._afd.create_schedule_context_holder(
        schedule_mode=1, session_num=1, micro_batch_num=M, micro_batch_size=BS, selected_expert_num=K + 1,
        expert_num=8, attn_to_ffn_token_size=512, ffn_to_attn_token_size=align512(2 * H),
        attention_window=window.data_ptr(), attention_window_size=size)
    return AttentionSide(M, BS, K, H, window, holder, holder.get_schedule_context_tensor())


def expected_combine(side: AttentionSide, mb: int, scales: torch.Tensor) -> torch.Tensor:
    d = side.data[mb].cpu().float()
    return ((d[:, :side.K] * scales.cpu()[:, :, None]).sum(dim=1) + d[:, side.K]).to(torch.bfloat16)
