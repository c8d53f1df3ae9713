"""The AFD operators as torch ops on the fake NPU: one kernel per operator, registered for every entry of the catalog.

afd.ops.catalog describes each operator once (its schemas per namespace, aclnn name, generation, waits, debtors and
output rule); this module turns an entry into a torch.library registration with its npu kernel and meta function.
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
from ..errors import ACLNN_ERR_PARAM_INVALID, ACLNN_ERR_PARAM_NULLPTR, AclnnError, AfdError
from ..ops import _polling, catalog
from ..ops._context import as_context
from . import direct, faults, module, tensors, trace, watchdog
from .memory import memory
from .streams import current_stream
from .tensors import numpy_of

_libs: dict[str, torch.library.Library] = {}
_lock = threading.Lock()
# What this process sent with attention_to_ffn, per micro-batch: the FFN rank of every (token, k) slot, so a
# combine that stalls can say which rank owes each missing flag.
_routes: dict[int, np.ndarray] = {}
# attn_rank_table of the last ffn_to_attention: session -> attention rank, for FFN-side stalls.
_attn_ranks: dict[int, int] = {}


class NpuOpError(AfdError, RuntimeError):
    """An operator's host-side (aclnn / tiling) check failed at the call; names the argument, the rule, the code."""

    def __init__(self, entry: catalog.Entry, error: AfdError):
        self.op, self.error = entry.name, error
        AfdError.__init__(self, error.field, error.rule, error.status)
        RuntimeError.__init__(self, f"call {entry.aclnn} failed ({entry.name}): {error}")

    def __str__(self) -> str:
        return self.args[0]


def _host_check(entry, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except AfdError as exc:
        raise NpuOpError(entry, exc) from None


def _need_npu(entry, **named) -> None:
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise NpuOpError(entry, AclnnError(name, f"must be a tensor, got {type(t).__name__}",
                                               ACLNN_ERR_PARAM_INVALID))
        if not tensors.is_npu(t):
            raise NpuOpError(entry, AclnnError(name, f"must be an npu tensor, got one on {t.device}",
                                               ACLNN_ERR_PARAM_INVALID))


def _context_tensor(entry, t) -> None:
    if type(t) is torch.Tensor and t.dtype is torch.int8 and t.dim() == 1 and tensors.is_npu(t) and \
            t.is_contiguous() and t.numel():
        return  # the common case, in one test
    if t is None:
        raise NpuOpError(entry, AclnnError("schedule_context", "must not be null", ACLNN_ERR_PARAM_NULLPTR))
    _need_npu(entry, schedule_context=t)
    if t.dtype != torch.int8:
        raise NpuOpError(entry, AclnnError("schedule_context", f"dtype must be int8, got {t.dtype}",
                                           ACLNN_ERR_PARAM_INVALID))
    if t.dim() != 1 or t.numel() == 0:
        raise NpuOpError(entry, AclnnError("schedule_context", f"must be a non-empty 1-D tensor (1024), got shape "
                                                               f"{tuple(t.shape)}", ACLNN_ERR_PARAM_INVALID))
    if not t.is_contiguous():
        raise NpuOpError(entry, AclnnError("schedule_context", "must be contiguous", ACLNN_ERR_PARAM_INVALID))


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


def _stream_of(t: torch.Tensor):
    return current_stream(t.get_device())


def _launch(entry, device_tensor: torch.Tensor, kernel, args: dict | None = None, explain=None,
            owed_by=lambda: (), waits: bool = True, holds=(), debtor: catalog.Operator | None = None) -> None:
    """Run kernel() in order on the current stream, with the fault hooks, the trace span and the watchdog.
    An op that never waits (waits=False) runs at once in the caller when the stream has nothing pending, as
    ordinary tensor work does; its failure is still kept for the next sync, like any stream error.
    holds: the op's tensors (inputs and outputs), kept until the queued kernel ran: the kernel reads and writes
    them through numpy views, which keep no allocator block, and record_stream is a no-op on the fake NPU
    because a queued op holds its tensors (a freed caller's tensor would otherwise be reused before it ran).
    debtor: the operator whose catalog says who owes its flags (explain and owed_by from it, made only if used)."""
    op = entry.name
    stream = _stream_of(device_tensor)
    inline = not waits and stream.idle()
    if inline and faults.quiet() and not trace.enabled():
        task = kernel  # nothing to fire, delay or record, and nothing to wait for: the kernel is the whole call
    else:
        explain, owed_by = _waits_on(debtor, explain, owed_by)
        task = _hooked(op, stream, kernel, args, explain, owed_by)
    if inline:
        try:
            task()
        except BaseException as exc:
            stream._queue.keep_error(op, exc)
        return
    if holds:
        task = _holding(task, holds)
    stream.launch(task, op)


def _holding(task, holds):
    """task, keeping holds referenced for as long as the stream's queue keeps the task."""
    def held():
        return task()
    held.holds = holds
    return held


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


# -- who owes a missing flag ----------------------------------------------------------------------------------------
def _slot_owner(mb: int, index: tuple[int, int]) -> dict:
    """A slot flag of the attention window: the FFN rank its token was sent to writes it back."""
    token, k = index
    routes = _routes.get(mb)
    rank = int(routes[token, k]) if routes is not None and token < routes.shape[0] else None
    owner = f"rank {rank}" if rank is not None else "the FFN rank it was sent to"
    return {"micro_batch": mb, "token": token, "expert_slot": k, "ffn_rank": rank,
            "text": f"mb {mb} token {token} slot {k} (owed by {owner})"}


def _combine_owed() -> list[tuple[int, int]]:
    ranks = set()
    for routes in tuple(_routes.values()):  # a snapshot: A2F on another stream's thread may add a micro-batch
        ranks.update(int(r) for r in np.unique(routes))
    return _peer_pids(ranks)


def _header_owner(mb: int, index: tuple) -> dict:
    """A record header of the FFN window: the attention rank of its session sends it."""
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


_OWED = {"ffn": (_slot_owner, _combine_owed), "attention": (_header_owner, _ffn_owed)}


def _waits_on(op: catalog.Operator | None, explain, owed_by) -> tuple:
    """The watchdog's explain and owed_by for an operator's wait, from the catalog's debtor (else those given)."""
    if op is None or op.owes is None:
        return explain, owed_by
    owner, owed = _OWED[op.owes]
    return (lambda w: _missing(w, owner)), owed


_warm: set = set()
_warming: threading.Thread | None = None


def warm_kernels_in_background() -> None:
    """Load (once per machine: compile) the operators' compiled kernels in a thread, beside the script's own work
    from its first AFD call on, so later calls find them loaded."""
    global _warming
    if _warming is None:
        def warm():
            from ..ops._kernels import (
                warm_up_attention_to_ffn,
                warm_up_batching,
                warm_up_copy_rows,
                warm_up_ffn_to_attention,
            )
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
        warm_up, = _ops("warm_up")
        warm_up(token_dtype)
        _warm.add(token_dtype)


def _warn_stopped(op: str) -> None:
    warnings.warn(f"{op} ended by run_flag = 0 before its flags were ready: outputs are zeros, flags and "
                  "micro_batch_id untouched", RuntimeWarning, stacklevel=2)


def _generation(entry: catalog.Entry) -> str:
    return entry.generation or module.generation()


_SPECS: dict = {}  # (operator, generation, every argument's shape or value) -> its outputs' (shapes, torch dtypes)


def _outputs(op: catalog.Operator, entry: catalog.Entry, a: dict, device, empty, generation: str | None = None):
    """The operator's outputs by its catalog rule, made with empty(shapes, torch dtypes, device). The rule's answer
    is kept per arguments' shapes and values: a decode loop asks the same every call (the rule and the dtype
    lookups cost ~5 us of a combine's ~40 us on the host)."""
    generation = generation or _generation(entry)
    try:
        key = (op.name, generation, *[v.shape if isinstance(v, torch.Tensor) else tuple(v) if type(v) is list else v
                                      for v in a.values()])
        made = _SPECS.get(key)
    except TypeError:  # (a symbolic shape under a compiler): asked every time
        key = made = None
    if made is None:
        specs = op.outputs(_shapes_of(a), generation)
        made = ([s.shape for s in specs], [getattr(torch, s.torch_dtype) for s in specs])
        if key is not None:
            if len(_SPECS) >= 256:
                _SPECS.clear()
            _SPECS[key] = made
    return empty(made[0], made[1], device)


def _shapes_of(a: dict) -> dict:
    return {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}


_OPS: dict = {}
_OP_MODULES = {  # where each operator function the kernels call lives
    "attention_worker_combine": ("attention_worker_combine", "check_attention_worker_combine_host", "warm_up"),
    "attention_worker_scheduler": ("attention_worker_scheduler_",),
    "ffn_worker_scheduler": ("ffn_worker_scheduler_", "check_ffn_worker_scheduler_host"),
    "ffn_worker_batching": ("FfnBatch", "check_ffn_worker_batching_host", "ffn_worker_batching"),
    "attention_to_ffn": ("attention_to_ffn", "check_attention_to_ffn_host"),
    "ffn_to_attention": ("_IDS", "check_ffn_to_attention_host", "ffn_to_attention"),
}


def _ops(*names: str) -> list:
    """The operators' functions, imported at the first AFD call and kept here (the operator modules load ml_dtypes
    and numba, slow imports a torch process need not pay at its start; an import statement in a hot path costs
    ~2 us warm and ~45 us once the caches are cold, a dict lookup far less)."""
    if not _OPS:
        import importlib
        for name, attrs in _OP_MODULES.items():
            mod = importlib.import_module(f"afd.ops.{name}")
            _OPS.update({a: getattr(mod, a) for a in attrs})
    return [_OPS[n] for n in names]


# -- the kernels, one per operator ----------------------------------------------------------------------------------
_combines_checked: set = set()  # the combine's calls whose host checks passed, by what the checks read
def _attention_worker_combine(op, entry, a):
    attention_worker_combine, check_attention_worker_combine_host = _ops("attention_worker_combine",
        "check_attention_worker_combine_host")
    schedule_context, expert_scales, layer_id = a["schedule_context"], a["expert_scales"], a["layer_id"]
    hidden_size, token_dtype, need_schedule = a["hidden_size"], a["token_dtype"], a["need_schedule"]
    generation = _generation(entry)
    _ensure_warm(token_dtype)  # in the caller, before the op may start waiting: loading is not a stall
    _context_tensor(entry, schedule_context)
    _need_npu(entry, expert_scales=expert_scales, layer_id=layer_id)
    scales, layer = numpy_of(expert_scales), numpy_of(layer_id)  # views: what the kernel reads when it runs
    checked = (scales.dtype, scales.shape, layer.dtype, layer.shape, hidden_size, token_dtype, need_schedule,
               generation)  # (all that the host checks read: no byte of any tensor)
    if checked not in _combines_checked:
        _host_check(entry, check_attention_worker_combine_host, schedule_context, scales, layer, hidden_size,
                    token_dtype, need_schedule, generation=generation)
        if len(_combines_checked) >= 256:
            _combines_checked.clear()
        _combines_checked.add(checked)
    (y, next_layer_id), (out_y, out_next) = _outputs(
        op, entry, a, schedule_context.device.index, tensors.empty_together, generation)
    waits = op.waits(a)

    def kernel():
        ctx = _context(schedule_context)
        try:
            _, nxt = attention_worker_combine(ctx, scales, layer, hidden_size, token_dtype, need_schedule,
                                              idle=_policy() if waits else None, out=out_y, host_checked=True,
                                              generation=generation)
        except _polling.Stopped:  # run_flag = 0 while waiting: OK, nothing reset (the real kernel has no exit)
            out_y[...] = 0
            out_next[...] = layer[:out_next.size] + 1
            _warn_stopped(entry.name)
            return {"stopped": True}
        out_next[...] = nxt
        return {"micro_batch": int(ctx.attention.micro_batch_id)} if trace.enabled() else None

    _launch(entry, schedule_context, kernel, {"need_schedule": need_schedule}, waits=waits, debtor=op,
            holds=(a, y, next_layer_id))
    return y, next_layer_id


def _run_scheduler(op, entry, a, fn):
    check_ffn_worker_scheduler_host, = _ops("check_ffn_worker_scheduler_host")
    self = a["self"]
    _context_tensor(entry, self)
    if op.name == "attention_worker_scheduler_":
        _attention_scheduler_checks(entry, self)
    else:
        _host_check(entry, check_ffn_worker_scheduler_host, numpy_of(self), a["execute_mode"])
    out = self if entry.inplace else self.clone()  # out of place: the context is copied (TensorMove), then scheduled

    def kernel():
        ctx = _context(out)
        fn(ctx)
        return {"micro_batch": int(ctx.attention.micro_batch_id) if op.name.startswith("attention")
                else int(ctx.ffn.polling_index), "run_flag": ctx.run_flag}

    _launch(entry, self, kernel, waits=op.waits(a), debtor=op)
    return out


def _attention_scheduler_checks(entry, self) -> None:
    from ..aclnn import aclnnInplaceAttentionWorkerSchedulerGetWorkspaceSize
    from ..errors import ACLNN_SUCCESS
    status, _, _ = aclnnInplaceAttentionWorkerSchedulerGetWorkspaceSize(numpy_of(self))
    if status != ACLNN_SUCCESS:
        from ..aclrt import aclGetRecentErrMsg
        field, _, rule = aclGetRecentErrMsg().partition(": ")
        raise NpuOpError(entry, AclnnError(field, rule, status))


def _attention_worker_scheduler(op, entry, a):
    attention_worker_scheduler_, = _ops("attention_worker_scheduler_")
    return _run_scheduler(op, entry, a, lambda ctx: attention_worker_scheduler_(ctx, idle=_policy()))


def _ffn_worker_scheduler(op, entry, a):
    ffn_worker_scheduler_, = _ops("ffn_worker_scheduler_")
    return _run_scheduler(op, entry, a, lambda ctx: ffn_worker_scheduler_(
        ctx, a["sync_group_size"], a["execute_mode"], idle=_policy()))


def _ffn_worker_batching(op, entry, a):
    FfnBatch, check_ffn_worker_batching_host, ffn_worker_batching = _ops(
        "FfnBatch", "check_ffn_worker_batching_host", "ffn_worker_batching")
    schedule_context, expert_num = a["schedule_context"], a["expert_num"]
    token_dtype, need_schedule, layer_num = a["token_dtype"], a["need_schedule"], a["layer_num"]
    generation, sync_flag = _generation(entry), bool(a.get("sync_flag", False))
    _context_tensor(entry, schedule_context)
    max_out_shape = [int(v) for v in a["max_out_shape"]]
    _host_check(entry, check_ffn_worker_batching_host, numpy_of(schedule_context), expert_num, max_out_shape,
                token_dtype, need_schedule, layer_num, sync_flag=sync_flag, generation=generation)
    outs, arrays = _outputs(op, entry, a, schedule_context.device.index, tensors.empty_together, generation)

    def kernel():
        ctx = _context(schedule_context)
        try:
            given = FfnBatch(*arrays)  # written in place where shapes and dtypes match
            batch = ffn_worker_batching(ctx, expert_num, max_out_shape, token_dtype, need_schedule, layer_num,
                                        sync_flag=sync_flag, generation=generation, idle=_policy(), out=given)
        except _polling.Stopped:
            for array in arrays:
                array[...] = 0
            _warn_stopped(entry.name)
            return {"stopped": True}
        for array, value in zip(given, batch):
            if value is not array:
                array[...] = value.view(array.dtype) if value.dtype.itemsize == array.dtype.itemsize else value
        n = int(batch.actual_token_num[0])
        units = sorted({(int(s), int(m)) for s, m in zip(batch.session_ids[:n], batch.micro_batch_ids[:n])})
        return {"actual_token_num": n, "units": units}

    _launch(entry, schedule_context, kernel, {"need_schedule": need_schedule}, waits=op.waits(a), debtor=op,
            holds=(a, outs))
    return tuple(outs)


def _group(entry, name: str):
    try:
        return comm.resolve(name)
    except AfdError as exc:
        raise NpuOpError(entry, exc) from None


def _attention_to_ffn(op, entry, a):
    attention_to_ffn, check_attention_to_ffn_host = _ops("attention_to_ffn", "check_attention_to_ffn_host")
    named = {k: a.get(k) for k in ("x", "session_id", "micro_batch_id", "layer_id", "expert_ids",
                                   "expert_rank_table", "scales", "active_mask")}
    _need_npu(entry, **named)
    grp = _group(entry, a["group"])
    from . import hccl
    rank = hccl.rank_in(grp)
    arrays = {k: (None if v is None else numpy_of(v)) for k, v in named.items()}
    world_size, ffn_start_rank_id = a["world_size"], a["ffn_start_rank_id"]
    kwargs = dict(group=grp, world_size=world_size, ffn_token_info_table_shape=list(a["ffn_token_info_table_shape"]),
                  ffn_token_data_shape=list(a["ffn_token_data_shape"]),
                  attn_token_info_table_shape=list(a["attn_token_info_table_shape"]),
                  moe_expert_num=a["moe_expert_num"], quant_mode=a["quant_mode"], sync_flag=a["sync_flag"],
                  ffn_start_rank_id=ffn_start_rank_id, rank=rank, generation=_generation(entry),
                  ccl_buffer_size=a.get("ccl_buffer_size"))
    _host_check(entry, check_attention_to_ffn_host, *arrays.values(), **kwargs)

    def kernel():
        try:
            sent = attention_to_ffn(*(None if v is None else numpy_of(v) for v in named.values()), idle=_policy(),
                                    **{**kwargs, "group": hccl.writer_group(grp, rank)})
        finally:
            faults.round_done()
        _routes[sent["micro_batch"]] = sent["routes"]
        return {"session": sent["session"], "micro_batch": sent["micro_batch"], "layer": sent["layer"],
                "to": sorted({int(r) for r in np.unique(sent["routes"])} | set(sent["headers"]))}

    _launch(entry, named["x"], kernel, {"group": a["group"]}, waits=op.waits(a),
            owed_by=lambda: _peer_pids(range(int(ffn_start_rank_id), int(world_size))))


def _ffn_to_attention(op, entry, a):
    _IDS, check_ffn_to_attention_host, ffn_to_attention = _ops("_IDS", "check_ffn_to_attention_host",
        "ffn_to_attention")
    named = {k: a[k] for k in ("x", *_IDS, "actual_token_num")}
    attn_rank_table = a.get("attn_rank_table")
    _need_npu(entry, **named, attn_rank_table=attn_rank_table)
    grp = _group(entry, a["group"])
    from . import hccl
    rank = hccl.rank_in(grp)
    x, actual = numpy_of(named["x"]), numpy_of(named["actual_token_num"])
    ids = {name: numpy_of(named[name]) for name in _IDS}
    table = None if attn_rank_table is None else numpy_of(attn_rank_table)
    world_size, generation = a["world_size"], _generation(entry)
    info, data = list(a["token_info_table_shape"]), list(a["token_data_shape"])
    ccl_buffer_size = a.get("ccl_buffer_size")
    _host_check(entry, check_ffn_to_attention_host, x, ids, actual, grp, world_size, info, data, table,
                generation=generation, ccl_buffer_size=ccl_buffer_size)

    def kernel():
        if table is not None:
            _attn_ranks.update({s: int(r) for s, r in enumerate(table.tolist())})
        try:
            sent = ffn_to_attention(x, *(ids[n] for n in _IDS), actual, hccl.writer_group(grp, rank), world_size,
                                    info, data, attn_rank_table=table, generation=generation,
                                    ccl_buffer_size=ccl_buffer_size)
        finally:
            faults.round_done()
        return {"to": {int(r): mbs for r, mbs in sent.items()}}

    _launch(entry, named["x"], kernel, {"group": a["group"]}, waits=op.waits(a), holds=a)


IMPLS = {"attention_worker_combine": _attention_worker_combine,
         "attention_worker_scheduler_": _attention_worker_scheduler,
         "ffn_worker_scheduler_": _ffn_worker_scheduler,
         "ffn_worker_batching": _ffn_worker_batching,
         "attention_to_ffn": _attention_to_ffn,
         "ffn_to_attention": _ffn_to_attention}


# -- from a catalog entry to a registration -------------------------------------------------------------------------
_REQUIRED = object()


class _Signature:
    """An entry's parameters from its schema: names in order, defaults (torch drops keywords equal to their default
    before a Python kernel sees them, so the kernel restores them), fixed list lengths (never checked by torch)."""

    def __init__(self, entry: catalog.Entry):
        schema = torch._C.parse_schema(entry.schema)
        self.entry = entry
        self.names = [arg.name for arg in schema.arguments]
        self.defaults = {arg.name: arg.default_value for arg in schema.arguments if arg.has_default_value()}
        self.lengths = {arg.name: arg.N for arg in schema.arguments if arg.N}

    def bind(self, args, kwargs) -> dict:
        a = dict(zip(self.names, args))
        a.update(kwargs)
        for name, default in self.defaults.items():
            a.setdefault(name, default)
        for name, n in self.lengths.items():
            values = a.get(name)
            if values is not None and len(values) != n:
                raise NpuOpError(self.entry, AclnnError(name, f"must have {n} entries, got {list(values)}",
                                                        ACLNN_ERR_PARAM_INVALID))
        return a


def kernel_for(entry: catalog.Entry, validate=None):
    """The npu kernel of an entry: its arguments bound by name, the front-end's own checks (validate(a)), then the
    operator's kernel."""
    op, sig, impl = catalog.entries(entry.namespace)[entry.name][0], _Signature(entry), IMPLS
    run = impl[op.name]

    def kernel(*args, **kwargs):
        if _warming is None:
            warm_kernels_in_background()
        a = sig.bind(args, kwargs)
        if validate is not None:
            validate(a)
        return run(op, entry, a)

    kernel.__name__ = kernel.__qualname__ = entry.name
    return kernel


def meta_for(entry: catalog.Entry, validate=None):
    """The meta (fake) function of an entry, from the catalog's output rule: the same shapes and dtypes the kernel
    allocates, on the input's device."""
    op, sig = catalog.entries(entry.namespace)[entry.name][0], _Signature(entry)

    def meta(*args, **kwargs):
        a = sig.bind(args, kwargs)
        if validate is not None:
            validate(a)
        first = a[sig.names[0]]
        if entry.inplace:
            return first
        if op.outputs is None:
            return torch.empty_like(first) if entry.returns == "Tensor" else None
        return tuple(_outputs(op, entry, a, first.device, lambda shapes, dtypes, dev: [
            torch.empty(s, dtype=d, device=dev) for s, d in zip(shapes, dtypes)]))

    return meta


def register(namespace: str, validators: dict | None = None, meta_validators: dict | None = None) -> dict:
    """Define every catalog entry of a namespace with torch.library (its npu kernel and meta function); returns the
    kernels by name. The ops' packets then call them past the dispatcher when it would only pass the call through.
    validators / meta_validators: a front-end's own checks of an entry's bound arguments (the real package's
    wrapper or C++ checks) before the operator's, in eager calls / under fake tensors."""
    validators, meta_validators = validators or {}, meta_validators or {}
    with _lock:
        if namespace in _libs:
            return {}
        lib = torch.library.Library(namespace, "FRAGMENT")
        kernels = {}
        from torch.fx.node import has_side_effect  # (FX keeps the window writes)
        for name, (_, entry) in catalog.entries(namespace).items():
            lib.define(entry.schema)
            kernels[name] = kernel_for(entry, validators.get(name))
            lib.impl(name, kernels[name], "PrivateUse1")
            torch.library.register_fake(f"{namespace}::{name}", meta_for(entry, meta_validators.get(name)), lib=lib)
        ops = getattr(torch.ops, namespace)
        direct.install(ops, kernels)
        for name, (_, entry) in catalog.entries(namespace).items():
            if entry.window_write:
                has_side_effect(getattr(ops, name).default)
        _libs[namespace] = lib
    return kernels


def install() -> None:
    """Define torch_npu 2.14's ops in the npu namespace, with their npu kernels and meta (fake) functions. The
    compiled kernels load in the background from the first AFD call on, not here: a torch process's start does
    not pay for numba and ml_dtypes (nor share the GIL with their import)."""
    register(catalog.NPU)
