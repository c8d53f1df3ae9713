"""`import cann_ops_transformer` on the fake NPU: the Ascend 950 V2 window operators, their buffers and wrappers.

The package serving code for 950 calls (ops-transformer's `torch_extension/cann_ops_transformer`): the ops registered
with torch.library in the `cann_ops_transformer` namespace from afd.ops.catalog (the same operators and kernels as
torch_npu's, generation 950), the Python wrappers with the real signatures, the two window buffers with their
CommContext tensor, the two buffer-size helpers, and the real wrappers' checks with their messages. A name that is not
a wrapper falls through to `torch.ops.cann_ops_transformer` as in the real package (`ffn_worker_batching` is the op).

The V2 window path is 950-only on hardware: a buffer on another SoC (`afd npu --soc`) fails, as does the batching op.
A job that imports this package runs on an Ascend950 unless AFD_NPU_SOC_NAME says otherwise.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import types

import numpy as np
import torch
import torch.distributed as dist

from ..errors import AfdError
from ..ops import catalog
from ..ops.attention_to_ffn import get_attention_to_ffn_ccl_buffer_size as _a2f_size
from ..ops.ffn_to_attention import get_ffn_to_attention_ccl_buffer_size as _f2a_size
from . import hccl, module, operators, tensors

NAME = "cann_ops_transformer"
VERSION = "8.5.0"  # [inf] the CANN release the V2 window operators ship with
_CONTEXT_WORDS = (16 + 8 * 1024) // 4  # CommContext: rank, ranks per server, a u64, then 1024 window addresses
_CONTEXT_BYTES, _MAX_SESSIONS, _MAX_SELECTED_EXPERTS, _MAX_EXPERTS = 1024, 1024, 64, 8192
_BACKENDS = {"Ascend910B": "kfc", "Ascend910_93": "kfc", "Ascend950": "channel"}  # CommContextManager's choice
_lock = threading.Lock()
_module: types.ModuleType | None = None


def _ops_error() -> str:
    """torch_npu's ops_error(ErrCode.VALUE): the suffix the real meta checks end with (unless compact output)."""
    if int(os.environ.get("TORCH_NPU_COMPACT_ERROR_OUTPUT", "0") or 0):
        return ""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else -1
    return (f"\n[ERROR] {time.strftime('%Y-%m-%d-%H:%M:%S', time.localtime())} (PID:{os.getpid()}, "
            f"Device:{module.current_device()}, RankID:{rank}) ERR01003 OPS invalid value")


def _check(ok, message) -> None:
    """torch._check: a RuntimeError with the message (a callable is called only on failure)."""
    if not ok:
        raise RuntimeError(message() if callable(message) else message)


def _dtype_name(t: torch.Tensor) -> str:
    return {torch.bfloat16: "BFloat16", torch.float16: "Half", torch.float32: "Float", torch.int32: "Int",
            torch.int64: "Long", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool"}.get(t.dtype, str(t.dtype))


# -- the real wrappers' and pybind functions' own checks, per op ----------------------------------------------------
def _meta_checks(a: dict, x_dim: int, sizes: dict) -> None:
    """The Meta impls' torch._check calls (mc2/*_v2/torch_extension/*.py): world_size, (A2F) moe_expert_num, x's
    dims, the shape lists' lengths; each message ends with torch_npu's ops_error suffix."""
    sfx = _ops_error()
    _check(a["world_size"] > 0, f"world_size should be greater than 0, {sfx}.")
    if "moe_expert_num" in a:
        _check(a["moe_expert_num"] > 0, f"moe_expert_num should be greater than 0, {sfx}.")
    _check(a["x"].dim() == x_dim, lambda: f"x should be {x_dim}D, but got {a['x'].dim()}D, {sfx}.")
    for name, n in sizes.items():
        _check(len(a[name]) == n, lambda: f"{name} should have {n} elements, but got {len(a[name])}, {sfx}.")


def _common_checks(a: dict, x_dim: int, ids_1d: tuple[str, ...], ids_text: str) -> None:
    """What both pybind ops TORCH_CHECK first: x's dims, then the id tensors 1-D."""
    x = a["x"]
    _check(x.dim() == x_dim, f"The x should be {x_dim}D, current dim is: {x.dim()}")
    _check(all(a[n].dim() == 1 for n in ids_1d), ids_text)


def _world_group_and_sizes(a: dict, sizes: dict) -> None:
    _check(a["world_size"] > 0, f"The world_size should be greater than 0, current is: {a['world_size']}")
    _check(bool(a["group"]), "group should not be empty.")
    for name, n in sizes.items():
        _check(len(a[name]) == n, f"{name} should be {n}D, current size is: {len(a[name])}")


def _x_dtype(a: dict) -> None:
    x = a["x"]
    _check(x.dtype in (torch.bfloat16, torch.float16), f"dtype of x should be bfloat16 or float16, but got "
                                                       f"{_dtype_name(x)}")


def _a2f_checks(a: dict) -> None:
    """csrc/attention_to_ffn.cpp NpuAttentionToFfn's TORCH_CHECKs, in order (the PrivateUse1 path)."""
    _common_checks(a, 3, ("session_id", "micro_batch_id", "layer_id"), "sessionId, microBatchId, layerId should be 1D.")
    _check(a["expert_ids"].dim() == 3, f"The expertIds should be 3D, current dim is: {a['expert_ids'].dim()}")
    _check(a["expert_rank_table"].dim() == 3,
           f"The expertRankTable should be 3D, current dim is: {a['expert_rank_table'].dim()}")
    _world_group_and_sizes(a, {"ffn_token_info_table_shape": 3, "ffn_token_data_shape": 5,
                               "attn_token_info_table_shape": 3})
    _check(a["moe_expert_num"] > 0, f"The moe_expert_num should be greater than 0, current is: {a['moe_expert_num']}")
    _x_dtype(a)
    for name, label in (("session_id", "sessionId"), ("micro_batch_id", "microBatchId"), ("layer_id", "layerId"),
                        ("expert_ids", "expertIds"), ("expert_rank_table", "expertRankTable")):
        _check(a[name].dtype == torch.int32, f"dtype of {label} should be int32.")


_F2A_IDS = (("session_ids", "sessionIds"), ("micro_batch_ids", "microBatchIds"), ("token_ids", "tokenIds"),
            ("expert_offsets", "expertOffsets"))


def _f2a_checks(a: dict) -> None:
    """csrc/ffn_to_attention.cpp's TORCH_CHECKs, in order."""
    _common_checks(a, 2, (*(n for n, _ in _F2A_IDS), "actual_token_num"),
                   "sessionIds, microBatchIds, tokenIds, expertOffsets, actualTokenNum should be 1D.")
    _world_group_and_sizes(a, {"token_info_table_shape": 3, "token_data_shape": 4})
    _x_dtype(a)
    for name, label in _F2A_IDS:
        _check(a[name].dtype == torch.int32, f"dtype of {label} should be int32.")
    _check(a["actual_token_num"].dtype == torch.int64, "dtype of actualTokenNum should be int64.")


def _batching_validate(a: dict) -> None:
    """ffn/ffn_worker_batching/torch_extension/ffn_worker_batching.py's _validate, in its order (meta and eager)."""
    ctx = a["schedule_context"]
    _check(ctx.dtype == torch.int8, lambda: f"schedule_context must have dtype int8, got {ctx.dtype}")
    _check(ctx.dim() == 1, lambda: f"schedule_context must be one-dimensional, got {ctx.dim()} dimensions")
    _check(ctx.is_contiguous(), "schedule_context must be contiguous")
    _check(ctx.numel() >= _CONTEXT_BYTES,
           lambda: f"schedule_context needs at least {_CONTEXT_BYTES} bytes, got {ctx.numel()}")
    shape = list(a["max_out_shape"])
    _check(len(shape) == 4, "max_out_shape must be [A, BS, K, H]")
    na, bs, k, h = (int(v) for v in shape)
    _check(1 <= na <= _MAX_SESSIONS, lambda: f"A must be in [1, {_MAX_SESSIONS}], got {na}")
    _check(bs > 0, lambda: f"BS must be positive, got {bs}")
    _check(1 <= k <= _MAX_SELECTED_EXPERTS, lambda: f"K must be in [1, {_MAX_SELECTED_EXPERTS}], got {k}")
    _check(h > 0, lambda: f"H must be positive, got {h}")
    _check(na * bs < 1 << 63, lambda: f"max_out_shape A*BS overflows int64: {na}*{bs}")
    _check(na * bs * k < 1 << 63, lambda: f"max_out_shape A*BS*K overflows int64: {na}*{bs}*{k}")
    expert_num = a["expert_num"]
    _check(1 <= expert_num <= _MAX_EXPERTS, lambda: f"expert_num must be in [1, {_MAX_EXPERTS}], got {expert_num}")
    _check(0 <= a["token_dtype"] <= 5, lambda: f"token_dtype must be in [0, 5], got {a['token_dtype']}")
    _check(a["need_schedule"] in (0, 1), lambda: f"need_schedule must be 0 or 1, got {a['need_schedule']}")
    sync_flag = a.get("sync_flag", False)
    _check(isinstance(sync_flag, bool), lambda: f"sync_flag must be bool, got {type(sync_flag).__name__}")
    layer_num = a["layer_num"]
    _check(0 <= layer_num <= expert_num, lambda: f"layer_num must be in [0, expert_num], got {layer_num}")
    if a["need_schedule"] == 1 and sync_flag:
        _check(layer_num > 0, "async RECV requires layer_num > 0")
        _check(expert_num % layer_num == 0, "async RECV requires expert_num divisible by layer_num")
    _check(a["token_dtype"] != 5 or h % 2 == 0, lambda: f"FP4 requires even H, got {h}")


def _batching_checks(a: dict) -> None:
    """The eager path: _validate, then csrc/ffn_worker_batching.cpp's device and SoC checks."""
    _batching_validate(a)
    ctx = a["schedule_context"]
    _check(tensors.is_npu(ctx), lambda: f"schedule_context must be on NPU, got {ctx.device}")
    soc = module.soc_name()
    _check(soc.startswith("Ascend950"), lambda: f"ffn_worker_batching supports arch35/Ascend950 only, got {soc}")


_VALIDATE = {"npu_attention_to_ffn": _a2f_checks, "npu_ffn_to_attention": _f2a_checks,
             "ffn_worker_batching": _batching_checks}
_META_VALIDATE = {"npu_attention_to_ffn": lambda a: _meta_checks(a, 3, {"ffn_token_info_table_shape": 3,
                                                                       "ffn_token_data_shape": 5,
                                                                       "attn_token_info_table_shape": 3}),
                  "npu_ffn_to_attention": lambda a: _meta_checks(a, 2, {"token_info_table_shape": 3,
                                                                       "token_data_shape": 4}),
                  "ffn_worker_batching": _batching_validate}


# -- the buffers ----------------------------------------------------------------------------------------------------
def _get_hccl_comm_name(group, rank_id: int) -> str:
    if hasattr(group, "get_hccl_comm_name"):
        return group.get_hccl_comm_name(rank_id, init_comm=False)
    return group._get_backend(torch.device("npu")).get_hccl_comm_name(rank_id, init_comm=False)


class _WindowBuffer:
    """What both buffers share: the group, this rank, the window registered with every peer, the CommContext."""

    _kind = ""

    def _set_up(self, group, world_size: int, window_addr, window_size) -> None:
        self.group = group
        self.rank_id = dist.get_rank(group)
        self.group_name = _get_hccl_comm_name(group, self.rank_id)
        self.ep_world_size = world_size
        sfx = _ops_error()
        _check((window_addr is None) == (window_size is None),
               lambda: f"window_addr and window_size must be provided together, but got window_addr={window_addr}, "
                       f"window_size={window_size}, {sfx}.")
        if window_addr is not None:
            _check(window_addr > 0, lambda: f"window_addr should be a positive device address, but got "
                                            f"{window_addr}, {sfx}.")
            _check(window_size > 0, lambda: f"window_size should be greater than 0, but got {window_size}, {sfx}.")

    def _register(self) -> None:
        """CommContextManager(...).create_context(): the window (the caller's, or one of window_size bytes made
        here) zeroed once and reachable by every rank of the group (a collective), then the CommContext tensor."""
        soc = module.soc_name()
        backend = next((b for prefix, b in _BACKENDS.items() if soc.startswith(prefix)), None)
        if backend != "channel":
            raise RuntimeError(f"{self._kind}: the V2 window operators run on the channel backend (urma) of "
                               f"Ascend950 only; this SoC is {soc} (backend {backend or 'unknown'}): run with "
                               "`afd npu --soc Ascend950PR_9599` or leave AFD_NPU_SOC_NAME unset")
        self._own = None
        address = self.window_addr
        if address is None:  # HCCL's own window of the buffer's size
            self._own = tensors.npu_bytes(self.window_size)
            address = self._own.data_ptr()
        try:
            windows = hccl.exchange_windows(self.group, int(address), int(self.window_size), zero=True)
        except AfdError as exc:
            raise RuntimeError(f"{self._kind}: {exc}") from None
        words = np.zeros(_CONTEXT_WORDS, np.int32)
        words[0], words[1] = windows.rank, windows.world_size  # [inf] ranks per server: one server per group here
        words[4:4 + 2 * windows.world_size].view(np.uint64)[:] = windows.addresses
        self.context = tensors.to_npu_copy(torch.from_numpy(words), module.current_device())
        self._windows = windows

    def destroy(self) -> None:
        """CommContextManager.destroy(): this rank's window leaves the group (the caller's memory stays)."""
        if getattr(self, "_windows", None) is not None:
            hccl.release_windows(self.group_name)
            self._windows = None
            self._own = None

    def get_window_addr(self) -> int:
        if self.context is None:
            return 0
        host = tensors.numpy_of(self.context).view(np.uint8)
        return int(host[16 + 8 * self.rank_id:24 + 8 * self.rank_id].view(np.uint64)[0])


class AttentionToFfnBuffer(_WindowBuffer):
    """An attention rank's buffer for attention_to_ffn: its window in the group, and the FFN windows' geometry."""

    _kind = "AttentionToFfnBuffer"

    def __init__(self, group, world_size, ffn_token_info_table_shape, ffn_token_data_shape, quant_mode=0,
                 window_addr=None, window_size=None):
        self._set_up(group, world_size, window_addr, window_size)
        self.ffn_token_info_table_shape = list(ffn_token_info_table_shape)
        self.ffn_token_data_shape = list(ffn_token_data_shape)
        self.quant_mode = quant_mode
        self.ccl_buffer_size = get_attention_to_ffn_ccl_buffer_size(self.ffn_token_info_table_shape,
                                                                    self.ffn_token_data_shape, quant_mode)
        self.window_addr = window_addr
        self.window_size = window_size if window_size is not None else self.ccl_buffer_size
        self._register()


class FFNToAttentionBuffer(_WindowBuffer):
    """An FFN rank's buffer for ffn_to_attention (it registers under attention_to_ffn's tag, so peers find it)."""

    _kind = "FFNToAttentionBuffer"

    def __init__(self, group, world_size, token_info_table_shape, token_data_shape, window_addr=None,
                 window_size=None):
        if world_size != dist.get_world_size(group):
            raise ValueError("world_size must match the communication group size")
        self._set_up(group, world_size, window_addr, window_size)
        self.token_info_table_shape = list(token_info_table_shape)
        self.token_data_shape = list(token_data_shape)
        self.ccl_buffer_size = window_size if window_size is not None else get_ffn_to_attention_ccl_buffer_size(
            self.token_info_table_shape, self.token_data_shape, world_size)
        self._capacity_shapes = (tuple(self.token_info_table_shape), tuple(self.token_data_shape))
        self.window_addr = window_addr
        self.window_size = self.ccl_buffer_size
        self._register()

    def destroy(self) -> None:
        super().destroy()
        self.context = None


def get_buffer_for_attention_to_ffn(group, world_size, ffn_token_info_table_shape, ffn_token_data_shape, *,
                                    quant_mode=0, window_addr=None, window_size=None) -> AttentionToFfnBuffer:
    """The attention rank's buffer: its window (zeroed once) registered with every rank of `group` (collective)."""
    return AttentionToFfnBuffer(group, world_size, ffn_token_info_table_shape, ffn_token_data_shape, quant_mode,
                                window_addr, window_size)


def get_buffer_for_ffn_to_attention(group, world_size, token_info_table_shape, token_data_shape, *,
                                    window_addr=None, window_size=None) -> FFNToAttentionBuffer:
    """The FFN rank's buffer: its window (zeroed once) registered with every rank of `group` (collective)."""
    return FFNToAttentionBuffer(group, world_size, token_info_table_shape, token_data_shape, window_addr,
                                window_size)


def _size_helper(fn, *args):
    try:
        return fn(*args)
    except AfdError as exc:  # (pybind turns the TORCH_CHECK into a RuntimeError)
        raise RuntimeError(exc.rule) from None


def get_attention_to_ffn_ccl_buffer_size(ffn_token_info_table_shape, ffn_token_data_shape, quant_mode) -> int:
    return _size_helper(_a2f_size, list(ffn_token_info_table_shape), list(ffn_token_data_shape), quant_mode)


def get_ffn_to_attention_ccl_buffer_size(token_info_table_shape, token_data_shape, world_size) -> int:
    return _size_helper(_f2a_size, list(token_info_table_shape), list(token_data_shape), world_size)


# -- the wrappers ---------------------------------------------------------------------------------------------------
def attention_to_ffn(buffer, x, session_id, micro_batch_id, layer_id, expert_ids, expert_rank_table,
                     attn_token_info_table_shape, moe_expert_num, *, sync_flag=0, ffn_start_rank_id=0, scales=None,
                     active_mask=None) -> None:
    """Send one micro-batch's tokens to the FFN windows (AttentionToFfn V2); no checks of its own, as the real one."""
    torch.ops.cann_ops_transformer.npu_attention_to_ffn(
        buffer.context, x, session_id, micro_batch_id, layer_id, expert_ids, expert_rank_table, buffer.group_name,
        buffer.ep_world_size, buffer.ffn_token_info_table_shape, buffer.ffn_token_data_shape,
        attn_token_info_table_shape, moe_expert_num, buffer.quant_mode, sync_flag, ffn_start_rank_id,
        buffer.ccl_buffer_size, scales=scales, active_mask=active_mask)


def ffn_to_attention(buffer, x, session_ids, micro_batch_ids, token_ids, expert_offsets, actual_token_num, *,
                     attn_rank_table=None) -> None:
    """Write FFN output rows back into their attention windows (FFNToAttention V2)."""
    if buffer.context is None:
        raise RuntimeError("FFNToAttentionBuffer has been destroyed")
    if (tuple(buffer.token_info_table_shape), tuple(buffer.token_data_shape)) != buffer._capacity_shapes:
        raise ValueError("Window shapes cannot change after buffer creation; create a replacement buffer")
    _check(x.dim() == 2, lambda: "x must be a 2D tensor")
    _check(x.shape[1] <= buffer.token_data_shape[3], lambda: "x.shape[1] exceeds the window token slot width HS")
    torch.ops.cann_ops_transformer.npu_ffn_to_attention(
        buffer.context, x, session_ids, micro_batch_ids, token_ids, expert_offsets, actual_token_num,
        buffer.group_name, buffer.ep_world_size, buffer.token_info_table_shape, buffer.token_data_shape,
        buffer.ccl_buffer_size, attn_rank_table=attn_rank_table)


def ffn_worker_batching(schedule_context, expert_num, max_out_shape, *, token_dtype=0, need_schedule=0, layer_num=0,
                        sync_flag=False, mx_output_uint8=False):
    """cann_ops_transformer.ops.ffn_worker_batching: the Python wrapper (its _validate, then the op). The package's
    top level gives the op itself under this name."""
    _batching_validate(dict(schedule_context=schedule_context, expert_num=expert_num, max_out_shape=max_out_shape,
                            token_dtype=token_dtype, need_schedule=need_schedule, layer_num=layer_num,
                            sync_flag=sync_flag))
    return torch.ops.cann_ops_transformer.ffn_worker_batching(
        schedule_context, expert_num, list(max_out_shape), token_dtype=token_dtype, need_schedule=need_schedule,
        layer_num=layer_num, sync_flag=sync_flag, mx_output_uint8=mx_output_uint8)


_WRAPPERS = {"attention_to_ffn": attention_to_ffn, "ffn_to_attention": ffn_to_attention,
             "ffn_worker_batching": ffn_worker_batching,
             "get_buffer_for_attention_to_ffn": get_buffer_for_attention_to_ffn,
             "get_buffer_for_ffn_to_attention": get_buffer_for_ffn_to_attention,
             "AttentionToFfnBuffer": AttentionToFfnBuffer, "FFNToAttentionBuffer": FFNToAttentionBuffer,
             "get_attention_to_ffn_ccl_buffer_size": get_attention_to_ffn_ccl_buffer_size,
             "get_ffn_to_attention_ccl_buffer_size": get_ffn_to_attention_ccl_buffer_size}


# -- the package ----------------------------------------------------------------------------------------------------
class _Package(types.ModuleType):
    """The top level: every wrapper whose name is not an op, then torch.ops.cann_ops_transformer's ops."""

    def __getattr__(self, name: str):
        if not name.startswith("__") and hasattr(torch.ops.cann_ops_transformer, name):
            handle = getattr(torch.ops.cann_ops_transformer, name)
            setattr(self, name, handle)
            return handle
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dir(torch.ops.cann_ops_transformer)) | set(dir(self.ops)))


def build() -> types.ModuleType:
    """The cann_ops_transformer module (and its `ops` submodule), the ops registered; once per process."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        module.default_to_950()
        operators.register(catalog.COT, _VALIDATE, _META_VALIDATE)
        ops = types.ModuleType(f"{NAME}.ops", "The op wrappers, by name.")
        pkg = _Package(NAME, __doc__)
        pkg.__afd_fake__ = True
        pkg.__version__ = VERSION
        pkg.__path__ = []
        pkg.ops = ops
        namespace = torch.ops.cann_ops_transformer
        for name, fn in _WRAPPERS.items():
            setattr(ops, name, fn)
            if not hasattr(namespace, name):  # the real __init__ skips names that are ops
                setattr(pkg, name, fn)
        _module = pkg
        return pkg


def install_modules() -> None:
    """Make `import cann_ops_transformer` give the fake (never over a real one already imported)."""
    mod = build()
    sys.modules[NAME] = mod
    sys.modules[f"{NAME}.ops"] = mod.ops
