"""The AFD operators under torch.ops.npu, with torch_npu 2.14's exact schemas and meta functions.

Each kernel is afd-sim's operator (afd.ops) over the npu tensors' memory: the aclnn and tiling checks run at the
call (a bad argument raises there, naming it, with the aclnn status code), the operator itself runs in order on
the current stream (it may spin for flags another rank owes; the host goes on), bounded by the stall watchdog.
"""
from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import torch

from .. import comm
from ..errors import (
    ACLNN_ERR_PARAM_INVALID,
    ACLNN_ERR_PARAM_NULLPTR,
    AclnnError,
    AfdError,
)
from ..ops import _polling
from ..ops import attention_worker_scheduler as _attention_scheduler_op
from ..ops import ffn_worker_scheduler as _ffn_scheduler_op
from ..ops._context import as_context
from ..ops.attention_to_ffn import attention_to_ffn, check_attention_to_ffn_host
from ..ops.attention_worker_combine import (
    attention_worker_combine,
    check_attention_worker_combine_host,
    warm_up,
)
from ..ops.ffn_to_attention import _IDS, check_ffn_to_attention_host, ffn_to_attention
from ..ops.ffn_worker_batching import (
    FfnBatch,
    check_ffn_worker_batching_host,
    ffn_worker_batching,
)
from ..ops.ffn_worker_scheduler import check_ffn_worker_scheduler_host
from . import direct, faults, tensors, trace, watchdog
from .memory import memory
from .module import current_stream
from .tensors import numpy_of

SCHEMAS = {
    "ffn_worker_scheduler_": "ffn_worker_scheduler_(Tensor(a!) self, *, int sync_group_size=1, int execute_mode=0) "
                             "-> Tensor(a!)",
    "ffn_worker_scheduler": "ffn_worker_scheduler(Tensor self, *, int sync_group_size=1, int execute_mode=0) -> Tensor",
    "attention_worker_scheduler_": "attention_worker_scheduler_(Tensor(a!) self) -> Tensor(a!)",
    "attention_worker_scheduler": "attention_worker_scheduler(Tensor self) -> Tensor",
    "npu_ffn_worker_batching": "npu_ffn_worker_batching(Tensor schedule_context, int expert_num, int[4] max_out_shape, "
                               "*, int token_dtype=0, int need_schedule=0, int layer_num=0) -> (Tensor, Tensor, "
                               "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "npu_attention_worker_combine": "npu_attention_worker_combine(Tensor schedule_context, Tensor expert_scales, "
                                    "Tensor layer_id, int hidden_size, *, int token_dtype=0, int need_schedule=0) "
                                    "-> (Tensor, Tensor)",
    "npu_attention_to_ffn": "npu_attention_to_ffn(Tensor x, Tensor session_id, Tensor micro_batch_id, "
                            "Tensor layer_id, Tensor expert_ids, Tensor expert_rank_table, str group, int world_size, "
                            "int[] ffn_token_info_table_shape, int[] ffn_token_data_shape, "
                            "int[] attn_token_info_table_shape, int moe_expert_num, *, Tensor? scales=None, "
                            "Tensor? active_mask=None, int quant_mode=0, int sync_flag=0, int ffn_start_rank_id=0) "
                            "-> ()",
    "npu_ffn_to_attention": "npu_ffn_to_attention(Tensor x, Tensor session_ids, Tensor micro_batch_ids, "
                            "Tensor token_ids, Tensor expert_offsets, Tensor actual_token_num, str group, "
                            "int world_size, int[] token_info_table_shape, int[] token_data_shape, *, "
                            "Tensor? attn_rank_table=None) -> ()",
}
ACLNN = {"ffn_worker_scheduler_": "aclnnInplaceFfnWorkerScheduler",
         "ffn_worker_scheduler": "aclnnInplaceFfnWorkerScheduler",
         "attention_worker_scheduler_": "aclnnInplaceAttentionWorkerScheduler",
         "attention_worker_scheduler": "aclnnInplaceAttentionWorkerScheduler",
         "npu_ffn_worker_batching": "aclnnFfnWorkerBatching", "npu_attention_worker_combine": "aclnnAttentionWorkerCombine",
         "npu_attention_to_ffn": "aclnnAttentionToFFN", "npu_ffn_to_attention": "aclnnFFNToAttention"}
BATCHING_DTYPES = {0: torch.float16, 1: torch.bfloat16, 2: torch.int8}

_libs: list = []
_lock = threading.Lock()
# What this process sent with npu_attention_to_ffn, per micro-batch: the FFN rank of every (token, k) slot, so a
# combine that stalls can say which rank owes each missing flag.
_routes: dict[int, np.ndarray] = {}
# attn_rank_table of the last npu_ffn_to_attention: session -> attention rank, for FFN-side stalls.
_attn_ranks: dict[int, int] = {}


class NpuOpError(AfdError, RuntimeError):
    """An operator's host-side (aclnn / tiling) check failed at the call; names the argument, the rule, the code."""

    def __init__(self, op: str, error: AfdError):
        self.op, self.error = op, error
        AfdError.__init__(self, error.field, error.rule, error.status)
        RuntimeError.__init__(self, f"call {ACLNN[op]} failed ({op}): {error}")

    def __str__(self) -> str:
        return self.args[0]


def _host_check(op: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except AfdError as exc:
        raise NpuOpError(op, exc) from None


def _need_npu(op: str, **named) -> None:
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise NpuOpError(op, AclnnError(name, f"must be a tensor, got {type(t).__name__}", ACLNN_ERR_PARAM_INVALID))
        if not tensors.is_npu(t):
            raise NpuOpError(op, AclnnError(name, f"must be an npu tensor, got one on {t.device}",
                                            ACLNN_ERR_PARAM_INVALID))


def _context_tensor(op: str, t) -> None:
    if type(t) is torch.Tensor and t.dtype is torch.int8 and t.dim() == 1 and tensors.is_npu(t) and \
            t.is_contiguous() and t.numel():
        return  # the common case, in one test
    if t is None:
        raise NpuOpError(op, AclnnError("schedule_context", "must not be null", ACLNN_ERR_PARAM_NULLPTR))
    _need_npu(op, schedule_context=t)
    if t.dtype != torch.int8:
        raise NpuOpError(op, AclnnError("schedule_context", f"dtype must be int8, got {t.dtype}",
                                        ACLNN_ERR_PARAM_INVALID))
    if t.dim() != 1 or t.numel() == 0:
        raise NpuOpError(op, AclnnError("schedule_context", f"must be a non-empty 1-D tensor (1024), got shape "
                                                            f"{tuple(t.shape)}", ACLNN_ERR_PARAM_INVALID))
    if not t.is_contiguous():
        raise NpuOpError(op, AclnnError("schedule_context", "must be contiguous", ACLNN_ERR_PARAM_INVALID))


_contexts: dict[int, object] = {}


def _context(t: torch.Tensor):
    """The ScheduleContext the kernel reads: the tensor's bytes, addresses resolved in npu memory. One view per
    address, kept: it only views the bytes there, so a later tensor at the same address is read right too."""
    address = t.data_ptr()
    ctx = _contexts.get(address)
    if ctx is None or ctx.raw.nbytes > t.numel():
        ctx = as_context(numpy_of(t).view(np.uint8))
        ctx.device = memory
        if len(_contexts) > 256:
            _contexts.clear()
        _contexts[address] = ctx
    return ctx


def _int_list(op: str, name: str, value, length: int | None = None) -> list[int]:
    values = [int(v) for v in value]
    if length is not None and len(values) != length:  # the dispatcher does not check int[N] lengths
        raise NpuOpError(op, AclnnError(name, f"must have {length} entries, got {values}", ACLNN_ERR_PARAM_INVALID))
    return values


def _stream_of(t: torch.Tensor):
    return current_stream(t.get_device())


def _launch(op: str, device_tensor: torch.Tensor, kernel, args: dict | None = None, explain=None,
            owed_by=lambda: (), waits: bool = True) -> None:
    """Run kernel() in order on the current stream, with the fault hooks, the trace span and the watchdog.
    An op that never waits (waits=False) runs at once in the caller when the stream has nothing pending, as
    ordinary tensor work does; its failure is still kept for the next sync, like any stream error."""
    stream = _stream_of(device_tensor)
    inline = not waits and stream.idle()
    if inline and faults.quiet() and not trace.enabled():
        task = kernel  # nothing to fire, delay or record, and nothing to wait for: the kernel is the whole call
    else:
        task = _hooked(op, stream, kernel, args, explain, owed_by)
    if inline:
        try:
            task()
        except BaseException as exc:
            stream._queue.keep_error(op, exc)
        return
    stream.launch(task, op)


def _hooked(op: str, stream, kernel, args, explain, owed_by):
    """kernel() with the fault hooks, the straggler delay, the watchdog's context and the trace span."""
    call = faults.next_call(op)

    def task():
        faults.before_op(op, call)
        watchdog.set_context(explain, owed_by)
        t0 = time.monotonic_ns()
        extra = {}
        try:
            delay = faults.delay_s()
            if delay:
                time.sleep(delay)
            out = kernel()
            if isinstance(out, dict):
                extra = out
        finally:
            watchdog.set_context()
            trace.span(op, stream, t0, time.monotonic_ns(), call, args, extra)
    return task


def _policy():
    return watchdog.policy()


def _missing(waiting, owner) -> list[dict]:
    """Each flag of a stalled wait that is not 1, with the rank owner(index) says owes it."""
    out = []
    flags = waiting.flags
    if flags is None:
        return out
    for index in zip(*np.nonzero(np.asarray(flags) != 1)):
        out.append(owner(waiting.micro_batch_id, tuple(int(i) for i in index)))
    return out


def _peer_pids(ranks) -> list[tuple[int, int]]:
    from . import hccl
    return [(r, hccl.peer_pid(r)) for r in sorted(set(ranks)) if hccl.peer_pid(r)]


# -- the attention side ---------------------------------------------------------------------------------------------
def _slot_owner(mb: int, index: tuple[int, int]) -> dict:
    token, k = index
    routes = _routes.get(mb)
    rank = int(routes[token, k]) if routes is not None and token < routes.shape[0] else None
    owner = f"rank {rank}" if rank is not None else "the FFN rank it was sent to"
    return {"micro_batch": mb, "token": token, "expert_slot": k, "ffn_rank": rank,
            "text": f"mb {mb} token {token} slot {k} (owed by {owner})"}


def _combine_owed() -> list[tuple[int, int]]:
    ranks = set()
    for routes in _routes.values():
        ranks.update(int(r) for r in np.unique(routes))
    return _peer_pids(ranks)


_warm: set = set()
_warming: threading.Thread | None = None


def warm_kernels_in_background() -> None:
    """Load (once per machine: compile) the combine's compiled kernels now, beside the script's own start-up, so
    no first call waits for them and none loads under the watchdog."""
    global _warming
    if _warming is None:
        def warm():
            from ..ops._kernels import (warm_up_attention_to_ffn, warm_up_batching, warm_up_copy_rows,
                                        warm_up_ffn_to_attention)
            warm_up_copy_rows()  # (the window writers' row copy and sort by rank)
            warm_up_attention_to_ffn()
            warm_up_batching()
            warm_up_ffn_to_attention()
            for code in (1, 0):
                _ensure_warm(code)
        _warming = threading.Thread(target=warm, name="afd npu warm-up", daemon=True)
        _warming.start()


def _ensure_warm(token_dtype: int) -> None:
    if token_dtype not in _warm and token_dtype in (0, 1):
        warm_up(token_dtype)
        _warm.add(token_dtype)


def npu_attention_worker_combine(schedule_context, expert_scales, layer_id, hidden_size, token_dtype=0,
                                 need_schedule=0):
    op = "npu_attention_worker_combine"
    _ensure_warm(token_dtype)  # in the caller, before the op may start waiting: loading is not a stall
    _context_tensor(op, schedule_context)
    _need_npu(op, expert_scales=expert_scales, layer_id=layer_id)
    scales, layer = numpy_of(expert_scales), numpy_of(layer_id)  # views: what the kernel reads when it runs
    _host_check(op, check_attention_worker_combine_host, schedule_context, scales, layer, hidden_size, token_dtype,
                need_schedule)
    (y, next_layer_id), (out_y, out_next) = tensors.empty_together(
        [(expert_scales.shape[0], int(hidden_size)), (layer_id.shape[0],)],
        [torch.bfloat16 if token_dtype == 1 else torch.float16, torch.int32], schedule_context.device.index)

    def kernel():
        ctx = _context(schedule_context)
        try:
            _, nxt = attention_worker_combine(ctx, scales, layer, hidden_size, token_dtype, need_schedule,
                                              idle=_policy(), out=out_y, host_checked=True)
        except _polling.Stopped:  # run_flag = 0 while waiting: OK, nothing reset (the real kernel has no exit)
            out_y[...] = 0
            out_next[...] = layer[:out_next.size] + 1
            _warn_stopped(op)
            return {"stopped": True}
        out_next[...] = nxt
        return {"micro_batch": int(ctx.attention.micro_batch_id)} if trace.enabled() else None

    _launch(op, schedule_context, kernel, {"need_schedule": need_schedule},
            explain=lambda w: _missing(w, _slot_owner), owed_by=_combine_owed, waits=bool(need_schedule))
    return y, next_layer_id


def _warn_stopped(op: str) -> None:
    warnings.warn(f"{op} ended by run_flag = 0 before its flags were ready: outputs are zeros, flags and "
                  "micro_batch_id untouched", RuntimeWarning, stacklevel=2)


def _run_scheduler(op: str, self, out, fn) -> None:
    def kernel():
        ctx = _context(out)
        fn(ctx)
        return {"micro_batch": int(ctx.attention.micro_batch_id) if op.startswith("attention")
                else int(ctx.ffn.polling_index), "run_flag": ctx.run_flag}

    owner = _slot_owner if op.startswith("attention") else _header_owner
    owed = _combine_owed if op.startswith("attention") else _ffn_owed
    _launch(op, self, kernel, explain=lambda w: _missing(w, owner), owed_by=owed)


def _attention_scheduler_checks(op: str, self) -> None:
    from ..aclnn import aclnnInplaceAttentionWorkerSchedulerGetWorkspaceSize
    from ..errors import ACLNN_SUCCESS
    _context_tensor(op, self)
    status, _, _ = aclnnInplaceAttentionWorkerSchedulerGetWorkspaceSize(numpy_of(self))
    if status != ACLNN_SUCCESS:
        from ..aclrt import aclGetRecentErrMsg
        field, _, rule = aclGetRecentErrMsg().partition(": ")
        raise NpuOpError(op, AclnnError(field, rule, status))


def attention_worker_scheduler_(self):
    op = "attention_worker_scheduler_"
    _attention_scheduler_checks(op, self)
    _run_scheduler(op, self, self, lambda ctx: _attention_scheduler_op.attention_worker_scheduler_(ctx, idle=_policy()))
    return self


def attention_worker_scheduler(self):
    op = "attention_worker_scheduler"
    _attention_scheduler_checks(op, self)
    out = self.clone()  # out of place: the context is copied first (TensorMove), the copy is scheduled
    _run_scheduler(op, self, out, lambda ctx: _attention_scheduler_op.attention_worker_scheduler_(ctx, idle=_policy()))
    return out


# -- the FFN side ---------------------------------------------------------------------------------------------------
def _header_owner(mb: int, index: tuple) -> dict:
    session = index[0]
    if len(index) > 1:  # the scheduler's (A, M) view
        mb = index[1]
    rank = _attn_ranks.get(session)
    owner = f"attention rank {rank}" if rank is not None else f"the attention rank of session {session}"
    return {"micro_batch": mb, "session": session, "attention_rank": rank,
            "text": f"session {session} mb {mb} header flag (owed by {owner})"}


def _ffn_owed() -> list[tuple[int, int]]:
    from . import hccl
    return _peer_pids(hccl.peer_ranks())


def _ffn_scheduler_checks(op: str, self, execute_mode) -> None:
    _context_tensor(op, self)
    _host_check(op, check_ffn_worker_scheduler_host, numpy_of(self), execute_mode)


def ffn_worker_scheduler_(self, sync_group_size=1, execute_mode=0):
    op = "ffn_worker_scheduler_"
    _ffn_scheduler_checks(op, self, execute_mode)
    _run_scheduler(op, self, self, lambda ctx: _ffn_scheduler_op.ffn_worker_scheduler_(ctx, sync_group_size, execute_mode,
                                                                      idle=_policy()))
    return self


def ffn_worker_scheduler(self, sync_group_size=1, execute_mode=0):
    op = "ffn_worker_scheduler"
    _ffn_scheduler_checks(op, self, execute_mode)
    out = self.clone()
    _run_scheduler(op, self, out, lambda ctx: _ffn_scheduler_op.ffn_worker_scheduler_(ctx, sync_group_size, execute_mode,
                                                                     idle=_policy()))
    return out


def _batching_outputs(schedule_context, expert_num, max_out_shape, token_dtype):
    y_rows = max_out_shape[0] * max_out_shape[1] * max_out_shape[2]
    dev = schedule_context.device.index
    dtype = BATCHING_DTYPES.get(token_dtype, torch.float16)
    return (tensors.empty((y_rows, max_out_shape[3]), dtype, dev), tensors.empty((expert_num, 2), torch.int64, dev),
            *(tensors.empty((y_rows,), torch.int32, dev) for _ in range(4)),
            tensors.empty((y_rows,), torch.float32, dev), tensors.empty((1,), torch.int64, dev))


def npu_ffn_worker_batching(schedule_context, expert_num, max_out_shape, token_dtype=0, need_schedule=0,
                            layer_num=0):
    op = "npu_ffn_worker_batching"
    _context_tensor(op, schedule_context)
    max_out_shape = _int_list(op, "max_out_shape", max_out_shape, 4)
    _host_check(op, check_ffn_worker_batching_host, numpy_of(schedule_context), expert_num, max_out_shape,
                token_dtype, need_schedule, layer_num)
    outs = _batching_outputs(schedule_context, int(expert_num), max_out_shape, token_dtype)

    def kernel():
        ctx = _context(schedule_context)
        try:
            given = FfnBatch(*(numpy_of(t) for t in outs))  # written in place where shapes and dtypes match
            batch = ffn_worker_batching(ctx, expert_num, max_out_shape, token_dtype, need_schedule, layer_num,
                                        idle=_policy(), out=given)
        except _polling.Stopped:
            for t in outs:
                numpy_of(t)[...] = 0
            _warn_stopped(op)
            return {"stopped": True}
        for array, value in zip(given, batch):
            if value is not array:
                array[...] = value
        n = int(batch.actual_token_num[0])
        units = sorted({(int(s), int(m)) for s, m in zip(batch.session_ids[:n], batch.micro_batch_ids[:n])})
        return {"actual_token_num": n, "units": units}

    _launch(op, schedule_context, kernel, {"need_schedule": need_schedule},
            explain=lambda w: _missing(w, _header_owner), owed_by=_ffn_owed, waits=bool(need_schedule))
    return outs


# -- the window writes ----------------------------------------------------------------------------------------------
def _group(op: str, name: str):
    try:
        return comm.resolve(name)
    except AfdError as exc:
        raise NpuOpError(op, exc) from None


def npu_attention_to_ffn(x, session_id, micro_batch_id, layer_id, expert_ids, expert_rank_table, group, world_size,
                         ffn_token_info_table_shape, ffn_token_data_shape, attn_token_info_table_shape,
                         moe_expert_num, scales=None, active_mask=None, quant_mode=0, sync_flag=0,
                         ffn_start_rank_id=0):
    op = "npu_attention_to_ffn"
    named = dict(x=x, session_id=session_id, micro_batch_id=micro_batch_id, layer_id=layer_id, expert_ids=expert_ids,
                 expert_rank_table=expert_rank_table, scales=scales, active_mask=active_mask)
    _need_npu(op, **named)
    grp = _group(op, group)
    from . import hccl
    rank = hccl.rank_in(grp)
    arrays = {k: (None if v is None else numpy_of(v)) for k, v in named.items()}
    kwargs = dict(group=grp, world_size=world_size, ffn_token_info_table_shape=list(ffn_token_info_table_shape),
                  ffn_token_data_shape=list(ffn_token_data_shape),
                  attn_token_info_table_shape=list(attn_token_info_table_shape), moe_expert_num=moe_expert_num,
                  quant_mode=quant_mode, sync_flag=sync_flag, ffn_start_rank_id=ffn_start_rank_id, rank=rank)
    _host_check(op, check_attention_to_ffn_host, *arrays.values(), **kwargs)

    def kernel():
        try:
            sent = attention_to_ffn(*(None if v is None else numpy_of(v) for v in named.values()), idle=_policy(),
                                    **{**kwargs, "group": hccl.writer_group(grp, rank)})
        finally:
            faults.round_done()
        _routes[sent["micro_batch"]] = sent["routes"]
        return {"session": sent["session"], "micro_batch": sent["micro_batch"], "layer": sent["layer"],
                "to": sorted({int(r) for r in np.unique(sent["routes"])} | set(sent["headers"]))}

    _launch(op, x, kernel, {"group": group},
            owed_by=lambda: _peer_pids(range(int(ffn_start_rank_id), int(world_size))))


def npu_ffn_to_attention(x, session_ids, micro_batch_ids, token_ids, expert_offsets, actual_token_num, group,
                         world_size, token_info_table_shape, token_data_shape, attn_rank_table=None):
    op = "npu_ffn_to_attention"
    named = dict(x=x, session_ids=session_ids, micro_batch_ids=micro_batch_ids, token_ids=token_ids,
                 expert_offsets=expert_offsets, actual_token_num=actual_token_num)
    _need_npu(op, **named, attn_rank_table=attn_rank_table)
    grp = _group(op, group)
    from . import hccl
    rank = hccl.rank_in(grp)
    ids = {name: numpy_of(named[name]) for name in _IDS}
    table = None if attn_rank_table is None else numpy_of(attn_rank_table)
    _host_check(op, check_ffn_to_attention_host, numpy_of(x), ids, numpy_of(actual_token_num), grp, world_size,
                list(token_info_table_shape), list(token_data_shape), table)

    def kernel():
        if table is not None:
            _attn_ranks.update({s: int(r) for s, r in enumerate(table.tolist())})
        try:
            sent = ffn_to_attention(numpy_of(x), *(numpy_of(named[n]) for n in _IDS), numpy_of(actual_token_num),
                                    hccl.writer_group(grp, rank), world_size, list(token_info_table_shape),
                                    list(token_data_shape), attn_rank_table=table)
        finally:
            faults.round_done()
        return {"to": {int(r): mbs for r, mbs in sent.items()}}

    _launch(op, x, kernel, {"group": group}, waits=False)  # F2A never waits (it overwrites blindly)


# -- meta functions (torch_npu's _meta_registrations, same shapes and dtypes) ---------------------------------------
def _meta_same(self, *args, **kwargs):
    return self


def _meta_like(self, *args, **kwargs):
    return torch.empty_like(self)


def _meta_batching(schedule_context, expert_num, max_out_shape, token_dtype=0, need_schedule=0, layer_num=0):
    y_size = max_out_shape[0] * max_out_shape[1] * max_out_shape[2]
    dev = schedule_context.device
    return (torch.empty(y_size, max_out_shape[3], dtype=BATCHING_DTYPES.get(token_dtype, torch.float16), device=dev),
            torch.empty(expert_num, 2, dtype=torch.int64, device=dev),
            *(torch.empty(y_size, dtype=torch.int32, device=dev) for _ in range(4)),
            torch.empty(y_size, dtype=torch.float32, device=dev), torch.empty(1, dtype=torch.int64, device=dev))


def _meta_combine(schedule_context, expert_scales, layer_id, hidden_size, token_dtype=0, need_schedule=0):
    dtype = torch.bfloat16 if token_dtype == 1 else torch.half
    return (torch.empty([expert_scales.size(0), hidden_size], dtype=dtype, device=schedule_context.device),
            torch.empty([layer_id.size(0)], dtype=torch.int32, device=schedule_context.device))


def _meta_none(*args, **kwargs):
    return None


KERNELS = {
    "ffn_worker_scheduler_": (ffn_worker_scheduler_, _meta_same),
    "ffn_worker_scheduler": (ffn_worker_scheduler, _meta_like),
    "attention_worker_scheduler_": (attention_worker_scheduler_, _meta_same),
    "attention_worker_scheduler": (attention_worker_scheduler, _meta_like),
    "npu_ffn_worker_batching": (npu_ffn_worker_batching, _meta_batching),
    "npu_attention_worker_combine": (npu_attention_worker_combine, _meta_combine),
    "npu_attention_to_ffn": (npu_attention_to_ffn, _meta_none),
    "npu_ffn_to_attention": (npu_ffn_to_attention, _meta_none),
}


def install() -> None:
    """Define the eight ops in the npu namespace, with their npu kernels and meta (fake) functions."""
    with _lock:
        if _libs:
            return
        lib = torch.library.Library("npu", "FRAGMENT")
        for name, schema in SCHEMAS.items():
            lib.define(schema)
            kernel, meta = KERNELS[name]
            lib.impl(name, kernel, "PrivateUse1")
            torch.library.register_fake(f"npu::{name}", meta, lib=lib)
        direct.install(torch.ops.npu, {name: kernel for name, (kernel, _) in KERNELS.items()})
        from torch.fx.node import has_side_effect  # (on the packets torch.ops.npu now holds: FX keeps the writes)
        has_side_effect(torch.ops.npu.npu_attention_to_ffn.default)
        has_side_effect(torch.ops.npu.npu_ffn_to_attention.default)
        _libs.append(lib)
    warm_kernels_in_background()
