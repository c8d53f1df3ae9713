"""The device-time model: emulated per-op device times the roles wait out, and the analytic ping-pong step time."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

# Below this much remaining time a hold spins (sched_yield) instead of sleeping: sleep has ~50 us timer slack.
_SPIN_NS = 150_000


def hold_until(deadline_ns: int) -> None:
    """Wait until CLOCK_MONOTONIC reaches deadline_ns: sleep the bulk, spin the tail (leaves the CPU to others)."""
    while True:
        remaining = deadline_ns - time.monotonic_ns()
        if remaining <= 0:
            return
        if remaining > _SPIN_NS:
            time.sleep((remaining - _SPIN_NS) / 1e9)
        else:
            os.sched_yield()


class DeviceTime:
    """Modelled device time (ns) of the four modelled ops of one config; every method returns 0 when the model is off."""

    def __init__(self, cfg):
        dt = getattr(cfg, "device_time", None)
        self.enabled = dt is not None
        self.attention_us_per_token = float(dt.attention_us_per_token) if dt else 0.0
        self.expert_us_per_token = float(dt.expert_us_per_token) if dt else 0.0
        self.link_gbps = float(dt.link_gbps) if dt else 0.0
        self.op_overhead_us = float(dt.op_overhead_us) if dt else 0.0

    def attention_ns(self, tokens: int) -> int:
        """Attention + gate of one micro-batch of `tokens` valid tokens."""
        if not self.enabled:
            return 0
        return int((self.op_overhead_us + self.attention_us_per_token * tokens) * 1000)

    def expert_ns(self, pairs: int) -> int:
        """The experts of one FFN round: `pairs` (token, expert) rows, the shared expert included."""
        if not self.enabled:
            return 0
        return int((self.op_overhead_us + self.expert_us_per_token * pairs) * 1000)

    def link_ns(self, nbytes: int) -> int:
        """One A2F or F2A transfer of nbytes (link_gbps = 0: only the op overhead)."""
        if not self.enabled:
            return 0
        wire = nbytes * 8 / self.link_gbps if self.link_gbps > 0 else 0.0  # bits / (1e9 bit/s) = ns
        return int(self.op_overhead_us * 1000 + wire)


def a2f_bytes(cfg) -> int:
    """Token bytes one A2F of one micro-batch moves (valid tokens x (K+1) copies)."""
    return cfg.valid_tokens * cfg.selected * cfg.token_bytes


def ffn_round_pairs(cfg) -> float:
    """(token, expert) rows one FFN rank handles per round, assuming an even spread over the F ranks."""
    sessions_per_round = cfg.sessions if cfg.mode == "sync" else 1
    return cfg.valid_tokens * cfg.selected * sessions_per_round / cfg.ffn_ranks


@dataclass(frozen=True)
class Prediction:
    """The ping-pong model's terms (seconds) and its step/run times for one config."""

    micro_batch_num: int
    layers: int
    steps: int
    t_a: float       # attention of one micro-batch
    t_e: float       # experts of one FFN round
    t_c_a2f: float   # A2F transfer
    t_c_f2a: float   # F2A transfer

    @property
    def t_c(self) -> float:
        return (self.t_c_a2f + self.t_c_f2a) / 2

    @property
    def t_f(self) -> float:
        return max(self.t_a, self.t_e)

    @property
    def round_trip(self) -> float:
        """One micro-batch's layer pass with nothing to overlap: T_a + T_e + 2 T_c."""
        return self.t_a + self.t_e + self.t_c_a2f + self.t_c_f2a

    @property
    def m_hiding(self) -> float:
        """MegaScale-Infer's hiding condition: communication is hidden once m >= 2 (1 + T_c / T_f)."""
        return 2 * (1 + self.t_c / self.t_f) if self.t_f > 0 else float("inf")

    @property
    def hidden(self) -> bool:
        return self.micro_batch_num >= self.m_hiding

    @property
    def step_s_pingpong(self) -> float:
        """The paper's ping-pong step time T = (T_a + T_e + 2 T_c) + T_f (m L - 1) (valid when hidden)."""
        return self.round_trip + self.t_f * (self.micro_batch_num * self.layers - 1)

    @property
    def pass_cycle(self) -> float:
        """Time between consecutive layer passes in steady state: T_f when hidden, else the round trip over m."""
        return max(self.t_f, self.round_trip / self.micro_batch_num)

    @property
    def run_s(self) -> float:
        """The whole run: one fill (round trip) then a pass every cycle, over steps x m x L passes."""
        return self.round_trip + self.pass_cycle * (self.steps * self.micro_batch_num * self.layers - 1)

    @property
    def step_s(self) -> float:
        """Run time per decode step (the fill amortised); equals step_s_pingpong for one hidden step."""
        return self.run_s / self.steps

    def as_dict(self) -> dict:
        us = 1e6
        return {"micro_batch_num": self.micro_batch_num, "layers": self.layers, "steps": self.steps,
                "t_a_us": self.t_a * us, "t_e_us": self.t_e * us, "t_c_us": self.t_c * us,
                "t_c_a2f_us": self.t_c_a2f * us, "t_c_f2a_us": self.t_c_f2a * us, "t_f_us": self.t_f * us,
                "m_hiding": self.m_hiding, "hidden": self.hidden,
                "step_pingpong_us": self.step_s_pingpong * us, "step_us": self.step_s * us,
                "run_us": self.run_s * us}


def predict(cfg) -> Prediction:
    """The analytic step time of a config from its device_time section (all terms 0 without one)."""
    dt = DeviceTime(cfg)
    pairs = ffn_round_pairs(cfg)
    return Prediction(micro_batch_num=cfg.micro_batch_num, layers=cfg.layers, steps=cfg.steps,
                      t_a=dt.attention_ns(cfg.valid_tokens) / 1e9,
                      t_e=dt.expert_ns(int(round(pairs))) / 1e9,
                      t_c_a2f=dt.link_ns(a2f_bytes(cfg)) / 1e9,
                      t_c_f2a=dt.link_ns(int(round(pairs * cfg.token_bytes))) / 1e9)


# Which measured op durations stand for which model term (for "which term is off").
TERM_OPS = {"t_a": ("attn", "attention"), "t_e": ("ffn", "experts"), "t_c_a2f": ("attn", "attention_to_ffn"),
            "t_c_f2a": ("ffn", "ffn_to_attention")}


def diagnose(pred: Prediction, events, measured_step_s: float, tolerance: float = 0.15) -> list[str]:
    """Explain a measured/predicted gap: each model term against the mean measured op, and the unmodelled rest."""
    from .metrics import op_durations
    notes = []
    durations = op_durations(events)
    for term, (kind, op) in TERM_OPS.items():
        modelled = getattr(pred, term)
        got = durations.get((kind, op))
        if got is None:
            continue
        if modelled == 0 and got > 50e-6 or modelled > 0 and abs(got - modelled) > tolerance * modelled:
            notes.append(f"{term} ({op}): measured {got * 1e6:.0f} us vs modelled {modelled * 1e6:.0f} us "
                         f"(Python work exceeds the emulated device time)" if got > modelled else
                         f"{term} ({op}): measured {got * 1e6:.0f} us vs modelled {modelled * 1e6:.0f} us")
    passes = pred.steps * pred.micro_batch_num * pred.layers
    rest = (measured_step_s - pred.step_s) * pred.steps / max(1, passes)
    if abs(measured_step_s - pred.step_s) > tolerance * pred.step_s:
        if not pred.hidden and rest > 0:
            notes.append(f"not hidden (m={pred.micro_batch_num} < {pred.m_hiding:.2f}): each pass pays "
                         f"{rest * 1e6:.0f} us of unmodelled round-trip work (scheduler/combine wake-ups, "
                         f"batching, residual)")
        elif rest > 0:
            notes.append(f"T_f term off by {rest * 1e6:.0f} us per pass: unmodelled work on the bottleneck role "
                         f"(A2F/F2A occupy the sender here, plus Python overheads)")
        else:
            notes.append(f"measured {-rest * 1e6:.0f} us per pass faster than the model")
    return notes
