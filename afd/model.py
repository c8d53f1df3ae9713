"""The numbers that flow: inputs, attention, gate, experts, and a single-process reference forward with the same casts."""
from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np

from .config import Config
from .tokens import BF16, FP16, X_DTYPE_BY_NAME

GATE_FEATURES = 64  # the gate reads the first 64 features: cheap, still data-dependent routing

_SEED_INPUT, _SEED_ATTN, _SEED_GATE, _SEED_EXPERT = 11, 13, 17, 19


def combine_reference(data: np.ndarray, scales: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """y = cast(sum_k f32(scale_k) * f32(data_k) + f32(data_K)), summed over k in order as each core does."""
    acc = np.zeros(data.shape[0:1] + data.shape[2:], dtype=np.float32)
    for k in range(scales.shape[1]):
        acc += scales[:, k:k + 1].astype(np.float32) * data[:, k].astype(np.float32)
    acc += data[:, scales.shape[1]].astype(np.float32)
    return acc.astype(dtype)


def attention_reference(h: np.ndarray, w: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The attention stand-in in numpy: v = f32(h) * w; v / (1 + |v|) in fp32; rounded to dtype."""
    v = h.astype(np.float32) * w
    return (v / (np.float32(1) + np.abs(v))).astype(dtype)


def pair_words(x: np.ndarray) -> np.ndarray | None:
    """x as the compiled kernels take it, 32-bit words of two 16-bit values (C-contiguous 2-D, even H, 4-byte
    aligned: an unaligned uint32 view would be a new kernel type, a compile mid-run), or None. The alignment is
    the view's own flag: x.ctypes.data builds a ctypes object, which measured 2.6 us warm and 68 us after a
    micro-batch layer's traffic has evicted it (the view's flag: 0.8 / 42 us, and the view is needed anyway)."""
    if x.ndim != 2 or x.dtype.itemsize != 2 or x.shape[1] % 2 or not x.flags.c_contiguous:
        return None
    words = x.view(np.uint32)
    return words if words.flags.aligned else None


def is_pair_rows(x: np.ndarray) -> bool:
    """Rows the compiled kernels take (pair_words)."""
    return pair_words(x) is not None


def empty_lines(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.empty(shape, dtype) starting on a 64-byte cache line (numpy only aligns to 16). A kernel writing rows into
    cold memory then stores whole lines instead of splitting every other vector store across two: the attention
    stand-in into its reused output, measured on 48 x 7168 bf16 with the output cold, 210 -> 182 us."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def scale_grouped(x: np.ndarray, group_list: np.ndarray, params: np.ndarray, out: np.ndarray) -> int:
    """The `scale` experts in one compiled pass (pair rows of the token dtype): the rows of group g
    (group_list[g] = [id, count], up to a count 0) times params[id], into out, or in place when out starts where x
    does (the one-buffer kernel: the two-buffer one on aliased rows runs scalar). Returns the rows done, or
    -1 - g for a bad group."""
    from .ops import _kernels
    half = x.dtype == FP16
    if out.ctypes.data == x.ctypes.data:
        kernel = _kernels.scale_groups_inplace_f16 if half else _kernels.scale_groups_inplace_bf16
        return kernel(out.view(np.uint32), group_list, params)
    kernel = _kernels.scale_groups_f16 if half else _kernels.scale_groups_bf16
    return kernel(x.view(np.uint32), group_list, params, out.view(np.uint32))


def digest(y: np.ndarray) -> int:
    """A 32-bit fingerprint of one micro-batch output (its bytes)."""
    return zlib.crc32(np.ascontiguousarray(y).view(np.uint8)) & 0xFFFFFFFF


class Model:
    """Deterministic weights and inputs for a config; every process that builds one sees the same numbers."""

    def __init__(self, config: Config):
        self.cfg = config
        self.dtype = X_DTYPE_BY_NAME[config.token_dtype]
        self._cache: dict = {}

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, *key])

    def _memo(self, key, make):
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value

    # -- inputs ---------------------------------------------------------------------------------
    def base_input(self, session: int, micro_batch: int) -> np.ndarray:
        def make():
            c = self.cfg
            x = self._rng(_SEED_INPUT, session, micro_batch).uniform(-1, 1, (c.micro_batch_size, c.hidden_size))
            x[c.valid_tokens:] = 0  # padded rows of a masked micro-batch
            return x.astype(self.dtype)
        return self._memo(("input", session, micro_batch), make)

    def input(self, step: int, session: int, micro_batch: int) -> np.ndarray:
        """Layer-0 hidden states of one micro-batch at one decode step (fresh each step, so values stay bounded)."""
        return np.roll(self.base_input(session, micro_batch), step, axis=1)

    # -- attention side ----------------------------------------------------------------------------
    def attention(self, layer: int, h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The attention stand-in a = softsign(f32(h) * w) = v / (1 + |v|), rounded to the token dtype: bounded
        like tanh, but made of IEEE operations only, so the compiled one-pass kernel and numpy agree bit for bit
        (tanh's last bit depends on the library). Into `out` when given (a role reuses one buffer: A2F copies
        a out of it)."""
        w, w_even, w_odd = self._memo(("attn", layer), lambda: self._attention_weights(layer))
        words = pair_words(h) if h.dtype == self.dtype and h.shape[-1] == w.size else None
        if words is not None:
            out_words = (pair_words(out) if out is not None and out.shape == h.shape and out.dtype == self.dtype
                         else None)
            if out_words is None:
                out = empty_lines(h.shape, self.dtype)
                out_words = out.view(np.uint32)
            self._memo("attn kernel", self._attention_kernel)(words, w_even, w_odd, out_words)
            return out
        return attention_reference(h, w, self.dtype)

    def _attention_weights(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(w, its even columns, its odd columns): the kernel takes w's columns apart, one per half of a 32-bit
        word of h."""
        w = self._rng(_SEED_ATTN, layer).uniform(0.5, 1.5, self.cfg.hidden_size).astype(np.float32)
        return w, w[0::2].copy(), w[1::2].copy()

    def _attention_kernel(self):
        from .ops._kernels import attention_pairs_bf16, attention_pairs_f16  # (numba: imported on first use)
        return attention_pairs_bf16 if self.dtype == BF16 else attention_pairs_f16

    def gate(self, layer: int, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-K routed expert ids (BS, K) int32 and their softmax scales (BS, K) float32."""
        c = self.cfg
        g = min(GATE_FEATURES, c.hidden_size)
        w = self._memo(("gate", layer), lambda: self._rng(_SEED_GATE, layer).standard_normal(
            (g, c.routed_experts)).astype(np.float32))
        logits = a[:, :g].astype(np.float32) @ w
        ids = np.argsort(-logits, axis=1, kind="stable")[:, :c.top_k].astype(np.int32)
        sel = np.take_along_axis(logits, ids, axis=1)
        e = np.exp(sel - sel.max(axis=1, keepdims=True))
        scales = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        scales[c.valid_tokens:] = 0
        return ids, scales

    def residual(self, h: np.ndarray, y: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The next layer's input h + y: fp32 add, rounded to the token dtype (one compiled pass on pair rows).
        Into `out` when given, which may be h itself (the attention role: its h is not needed after)."""
        h_words = pair_words(h) if h.dtype == self.dtype and y.dtype == self.dtype and h.shape == y.shape else None
        y_words = pair_words(y) if h_words is not None else None
        out_words = None
        if out is not None and out is not h and y_words is not None:
            out_words = pair_words(out) if out.shape == h.shape and out.dtype == self.dtype else None
            if out_words is not None and (np.shares_memory(out, h) or np.shares_memory(out, y)):
                raise ValueError("residual: out overlaps h or y other than as h itself")
        if y_words is None or (out is not None and out is not h and out_words is None):
            value = (h.astype(np.float32) + y.astype(np.float32)).astype(self.dtype)
            if out is None:
                return value
            out[...] = value
            return out
        kernels = self._memo("residual kernels", self._residual_kernels)[self.dtype == FP16]
        if out is h:
            kernels[1](h_words, y_words)
            return h
        if out is None:
            out = empty_lines(h.shape, self.dtype)
            out_words = out.view(np.uint32)
        kernels[0](h_words, y_words, out_words)
        return out

    @staticmethod
    def _residual_kernels():
        """((bf16, bf16 in place), (fp16, fp16 in place))"""
        from .ops import _kernels as k
        return ((k.residual_pairs_bf16, k.residual_pairs_inplace_bf16),
                (k.residual_pairs_f16, k.residual_pairs_inplace_f16))

    # -- experts ---------------------------------------------------------------------------------
    def expert_param(self, layer: int, expert: int):
        c = self.cfg
        if c.expert_kind == "scale":
            return self._memo(("expert", layer, expert), lambda: np.float32(
                self._rng(_SEED_EXPERT, layer, expert).uniform(0.5, 1.5)))
        return self._memo(("expert", layer, expert), lambda: self._rng(_SEED_EXPERT, layer, expert).standard_normal(
            (c.hidden_size, c.hidden_size)) / np.sqrt(c.hidden_size))

    def expert(self, layer: int, expert: int, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """One expert on rows x (n, H), into `out` when given. `linear` accumulates in float64 so row grouping
        cannot change the result."""
        p = self.expert_param(layer, expert)
        if self.cfg.expert_kind == "scale":
            if out is None:
                out = np.empty(x.shape, self.dtype)
            if is_pair_rows(x) and is_pair_rows(out) and x.dtype == out.dtype == self.dtype and out.shape == x.shape:
                scale_grouped(x, np.array([[0, x.shape[0]]], np.int64), np.array([p], np.float32), out)
                return out
            out[...] = (x.astype(np.float32) * p).astype(self.dtype)
            return out
        y = (x.astype(np.float64) @ p).astype(self.dtype)
        if out is None:
            return y
        out[...] = y
        return out

    def scale_params(self, local: list[int]) -> np.ndarray:
        """The `scale` experts' factors of an FFN rank holding experts `local` (global ids), as one float32 array
        indexed by local expert id layer * len(local) + index (what the grouped kernel takes)."""
        def make():
            return np.array([self.expert_param(layer, e) for layer in range(self.cfg.layers) for e in local],
                            np.float32)
        return self._memo(("scale_params", tuple(local)), make)

    # -- reference ---------------------------------------------------------------------------------
    def layer(self, layer: int, h: np.ndarray) -> np.ndarray:
        """One layer of one micro-batch in a single process: attention, gate, experts, combine."""
        c = self.cfg
        a = self.attention(layer, h)
        ids, scales = self.gate(layer, a)
        n = c.valid_tokens
        data = np.zeros((c.micro_batch_size, c.selected, c.hidden_size), dtype=self.dtype)
        for e in np.unique(ids[:n]):
            rows, ks = np.nonzero(ids[:n] == e)
            data[rows, ks] = self.expert(layer, int(e), a[rows])
        data[:n, c.top_k] = self.expert(layer, c.routed_experts, a[:n])
        return combine_reference(data, scales, self.dtype)

    def forward(self, step: int, session: int, micro_batch: int) -> np.ndarray:
        """The step output of one micro-batch: the last layer's combine output (valid rows only)."""
        h = self.input(step, session, micro_batch)
        y = None
        for layer in range(self.cfg.layers):
            if layer:
                h = self.residual(h, y)
            y = self.layer(layer, h)
        return y[:self.cfg.valid_tokens]


@lru_cache(maxsize=4)
def _reference_cached(config_json: str) -> tuple[np.ndarray, dict]:
    cfg = Config.model_validate_json(config_json)
    model = Model(cfg)
    digests = np.zeros((cfg.steps, cfg.sessions, cfg.micro_batch_num), dtype=np.uint32)
    finals = {}
    for t in range(cfg.steps):
        for s in range(cfg.sessions):
            for m in range(cfg.micro_batch_num):
                y = model.forward(t, s, m)
                digests[t, s, m] = digest(y)
                if t == cfg.steps - 1:
                    finals[(s, m)] = y
    return digests, finals


def reference_digests(config: Config, steps) -> np.ndarray:
    """Digests [len(steps), A, M] of the given steps only (steps are independent: fresh inputs each step)."""
    model = Model(config)
    out = np.zeros((len(steps), config.sessions, config.micro_batch_num), dtype=np.uint32)
    for i, t in enumerate(steps):
        for s in range(config.sessions):
            for m in range(config.micro_batch_num):
                out[i, s, m] = digest(model.forward(int(t), s, m))
    return out


def reference(config: Config) -> tuple[np.ndarray, dict]:
    """Digests [steps, A, M] of every step output, and the final outputs {(s, m): (valid, H)}, computed in-process."""
    return _reference_cached(config.model_dump_json())
