"""aten on npu tensors: factories allocate from the caching allocator; every other op runs its CPU kernel over CPU
aliases of its npu arguments, in order on the current stream.

Kinds of op, from the schema:
  view        (returns an alias, writes nothing): the CPU kernel runs on the npu tensor itself, so the result
              keeps the npu storage, `_base` and version counter; no data moves, no stream.
  host read   (returns a number or bool, or copies to the CPU): waits for the stream, then runs.
  the rest    in-place, out= and functional ops: at once when the stream has nothing pending, else queued on it.
              Queued work needs its outputs before it runs: their shapes come from the op's meta kernel, the
              buffers from the allocator; an op without a meta kernel (data-dependent shapes) waits instead.
Results are always npu memory from the allocator, so every npu tensor's data_ptr() resolves for the operators.
"""
from __future__ import annotations

import threading

import torch
from torch._C import DispatchKey, DispatchKeySet

from . import tensors
from .streams import current_stream
from .tensors import as_cpu, as_npu

CPU_KEYS = DispatchKeySet(DispatchKey.CPU)
VIEW, HOST_READ, COMPUTE = "view", "host read", "compute"
_TENSOR_RETURNS = ("Tensor", "Tensor?", "List[Tensor]", "Tensor[]")
_kinds: dict = {}
_libs: list = []
_installed = threading.Lock()


def _is_npu(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "npu"


def _map(fn, x):
    """fn over the tensors of an op's argument (a tensor, or a list/tuple of them); other values as they are.
    (torch's pytree costs several times the whole CPU kernel of a small op.)"""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)) and x and any(isinstance(v, (torch.Tensor, list, tuple)) for v in x):
        return type(x)(_map(fn, v) for v in x)
    return x


def _map_all(fn, args, kwargs):
    return tuple(_map(fn, a) for a in args), {k: _map(fn, v) for k, v in kwargs.items()}


def _leaves(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)


def _kind(op) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(kind, names of the written kwarg-only arguments i.e. out=, names of every written argument) of an op,
    cached."""
    cached = _kinds.get(op)
    if cached is None:
        schema = op._schema
        written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        outs = tuple(a.name for a in written if a.kwarg_only)
        if any(str(r.type) not in _TENSOR_RETURNS for r in schema.returns):
            kind = HOST_READ
        elif not written and any(r.alias_info is not None for r in schema.returns):
            kind = VIEW
        else:
            kind = COMPUTE
        cached = _kinds[op] = (kind, outs, tuple(a.name for a in written))
    return cached


def _device_index(args, kwargs) -> int:
    for x in _leaves((args, tuple(kwargs.values()))):
        if x.device.type == "npu":
            return x.device.index or 0
    return tensors.current_index()


def _to_meta(x):
    if x.device.type in ("npu", "cpu"):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    return x


def _snapshot(x):
    """CPU tensors a queued op reads are copied at launch: the host may change them before the op runs."""
    return x.clone() if x.device.type == "cpu" else x


def _to_npu_result(result, index: int, keep: dict):
    """Map an op's CPU results back: aliases of npu arguments become those arguments, new tensors are copied into
    npu memory from the allocator."""
    def one(r):
        same = keep.get(id(r))
        return same if same is not None else tensors.to_npu_copy(r, index)
    return _map(one, result)


def _aliases(args, kwargs):
    """CPU aliases of the npu arguments, and id(alias) -> the npu tensor it stands for."""
    keep = {}

    def one(x):
        if _is_npu(x):
            c = as_cpu(x)
            keep[id(c)] = x
            return c
        return x
    cargs, ckw = _map_all(one, args, kwargs)
    return cargs, ckw, keep


def _resize_outs(op, args, kwargs, outs) -> None:
    """out= tensors get the shape the op will give them (the CPU kernel cannot resize an alias's storage)."""
    margs, mkw = _map_all(_to_meta, args, kwargs)
    op(*margs, **mkw)
    for name in outs:
        npu_outs, meta_outs = kwargs.get(name), mkw.get(name)
        for t, m in zip(_leaves(npu_outs), _leaves(meta_outs)):
            if _is_npu(t) and tuple(t.shape) != tuple(m.shape):
                t.resize_(m.shape)


def run_now(op, args, kwargs, index: int):
    """Run an op at once in this thread over CPU aliases; results as npu tensors."""
    cargs, ckw, keep = _aliases(args, kwargs)
    return _to_npu_result(op(*cargs, **ckw), index, keep)


def _run_into_outs(op, args, kwargs, index: int, outs):
    """An out= op whose output shape only running tells: run into CPU outputs, then size and fill the npu ones."""
    fresh = {name: _map(lambda t: torch.empty(0, dtype=t.dtype) if _is_npu(t) else t, kwargs[name])
             for name in outs}
    cargs, ckw, _ = _aliases(args, {k: v for k, v in kwargs.items() if k not in outs})
    op(*cargs, **ckw, **fresh)
    for name in outs:
        for t, r in zip(_leaves(kwargs[name]), _leaves(fresh[name])):
            if _is_npu(t):
                t.resize_(r.shape)
                as_cpu(t).copy_(r)
    written = [kwargs[name] for name in outs]
    return written[0] if len(written) == 1 else tuple(written)


def _queue(op, args, kwargs, index: int, stream, written: tuple[str, ...]):
    """Launch an op behind the stream's pending work, checked now by its meta kernel. An in-place or out= op returns
    its written arguments (out= ones were sized already); a functional one gets its outputs now, of the meta
    kernel's shapes."""
    margs, mkw = _map_all(_to_meta, args, kwargs)
    meta = op(*margs, **mkw)  # (also the shape and dtype check of an in-place or out= op, at the call)
    sargs, skw = _map_all(_snapshot, args, kwargs)  # host tensors as they are now (npu ones untouched)
    cargs, ckw, _ = _aliases(sargs, skw)
    if written:
        named = dict(zip([a.name for a in op._schema.arguments], args))
        named.update(kwargs)
        values = [named[n] for n in written]
        stream.launch(lambda: op(*cargs, **ckw), str(op))
        return values[0] if len(values) == 1 else tuple(values)
    results = []

    def alloc(m):
        out = tensors.empty_strided(m.shape, m.stride(), m.dtype, index)
        results.append(out)
        return out

    npu_out = _map(alloc, meta)

    def task():
        produced = op(*cargs, **ckw)
        for dst, src in zip(results, _leaves(produced)):
            as_cpu(dst).copy_(src)
    stream.launch(task, str(op))
    return npu_out


def fallback(op, *args, **kwargs):
    """The boxed kernel of every aten op on npu tensors that has no kernel of its own here."""
    kind, outs, written = _kind(op)
    if kind == VIEW:
        return op.redispatch(CPU_KEYS, *args, **kwargs)
    index = _device_index(args, kwargs)
    stream = current_stream(index)
    if kind == HOST_READ:
        stream.synchronize()
        return run_now(op, args, kwargs, index)
    if outs:
        try:
            _resize_outs(op, args, kwargs, outs)
        except (NotImplementedError, RuntimeError):  # no meta kernel: the shape is known only after running
            stream.synchronize()
            return _run_into_outs(op, args, kwargs, index, outs)
    if stream.idle():
        return run_now(op, args, kwargs, index)
    try:
        return _queue(op, args, kwargs, index, stream, written)
    except (NotImplementedError, RuntimeError):  # no meta kernel (e.g. data-dependent shapes): wait, then run
        stream.synchronize()
        return run_now(op, args, kwargs, index)


# -- kernels of their own -------------------------------------------------------------------------------------------
def _empty_memory_format(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    dtype = dtype or torch.get_default_dtype()
    if memory_format is not None and memory_format != torch.contiguous_format:
        stride = torch.empty(size, dtype=dtype, device="meta", memory_format=memory_format).stride()
        return tensors.empty_strided(size, stride, dtype, _index_of(device))
    return tensors.empty(size, dtype, _index_of(device))


def _empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):
    return tensors.empty_strided(size, stride, dtype or torch.get_default_dtype(), _index_of(device))


def _index_of(device) -> int:
    if device is None or device.index is None:
        return tensors.current_index()
    return device.index


def _copy_from(src, dst, non_blocking=False):
    """copy_ across devices: into npu memory in stream order (host bytes snapshotted when the copy has to wait);
    npu to host after the stream finished (a host read)."""
    if dst.device.type == "npu":
        stream = current_stream(dst.device.index or 0)
        d, s = as_cpu(dst), as_cpu(src)
        if stream.idle():
            d.copy_(s)
        else:
            s = s.clone() if src.device.type == "cpu" else s
            stream.launch(lambda: d.copy_(s), "copy_")
        return dst
    current_stream(src.device.index or 0).synchronize()
    dst.copy_(as_cpu(src))
    return dst


def _copy_from_and_resize(src, dst):
    dst.resize_(src.shape)
    return _copy_from(src, dst)


def _resize_(self, size, memory_format=None):
    """Metadata only when the storage is big enough; otherwise new npu storage with the old bytes in front."""
    count = 1
    for s in size:
        count *= int(s)
    need = (count + self.storage_offset()) * self.element_size()
    storage = self.untyped_storage()
    if need > storage.nbytes():
        current_stream(self.device.index or 0).synchronize()  # the old bytes as the stream left them
        fresh = tensors.npu_bytes(need, self.device.index or 0)
        if storage.nbytes():
            as_cpu(fresh)[:storage.nbytes()].copy_(as_cpu(_storage_bytes(self)))
        torch.ops.aten.set_.source_Storage_storage_offset.redispatch(
            CPU_KEYS, self, fresh.untyped_storage(), self.storage_offset(), tuple(self.shape), tuple(self.stride()))
    return torch.ops.aten.resize_.default.redispatch(CPU_KEYS, self, size, memory_format=memory_format)


def _storage_bytes(t) -> torch.Tensor:
    """An npu uint8 tensor over the whole storage of t."""
    whole = tensors.npu_bytes(0, t.device.index or 0)
    return torch.ops.aten.set_.source_Storage_storage_offset.redispatch(
        CPU_KEYS, whole, t.untyped_storage(), 0, (t.untyped_storage().nbytes(),), (1,))


def _set_storage(self, source, storage_offset=0, size=(), stride=()):
    return torch.ops.aten.set_.source_Storage_storage_offset.redispatch(CPU_KEYS, self, source, storage_offset,
                                                                        size, stride)


def _set_tensor(self, source):
    return torch.ops.aten.set_.source_Tensor.redispatch(CPU_KEYS, self, source)


def _set_source_storage(self, source):
    return torch.ops.aten.set_.source_Storage.redispatch(CPU_KEYS, self, source)


def _record_stream(self, stream):
    """Nothing to do: a queued op holds its tensors' storage until it ran, so memory is never reused early."""


def _local_scalar_dense(self):
    current_stream(self.device.index or 0).synchronize()
    return as_cpu(self).item()


def _to_copy(self, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, memory_format=None):
    """.to()/.cpu()/.npu() of an npu tensor: to the host after the stream finished, else a copy in stream order."""
    if device is not None and device.type != "npu":
        current_stream(self.device.index or 0).synchronize()
        return torch.ops.aten._to_copy.default(as_cpu(self), dtype=dtype, layout=layout, device=device,
                                               pin_memory=pin_memory, non_blocking=non_blocking,
                                               memory_format=memory_format)
    kwargs = dict(dtype=dtype, layout=layout, pin_memory=pin_memory, non_blocking=non_blocking,
                  memory_format=memory_format)
    index = device.index if device is not None and device.index is not None else (self.device.index or 0)
    out = fallback(torch.ops.aten._to_copy.default, self, **kwargs)
    if out.device.index != index:  # .to("npu:1") of an npu:0 tensor: same memory pool, another device tag
        out = as_npu(as_cpu(out), index)
    return out


def install() -> None:
    """Register the kernels and the fallback for PrivateUse1 (once per process)."""
    with _installed:
        if _libs:
            return
        impl = torch.library.Library("aten", "IMPL")
        for name, fn in (("empty.memory_format", _empty_memory_format), ("empty_strided", _empty_strided),
                         ("_copy_from", _copy_from), ("_copy_from_and_resize", _copy_from_and_resize),
                         ("resize_", _resize_), ("set_.source_Storage_storage_offset", _set_storage),
                         ("set_.source_Tensor", _set_tensor), ("set_.source_Storage", _set_source_storage),
                         ("record_stream", _record_stream), ("_local_scalar_dense", _local_scalar_dense),
                         ("_to_copy", _to_copy)):
            impl.impl(name, fn, "PrivateUse1")
        _register_structured(impl)
        boxed = torch.library.Library("_", "IMPL")
        boxed.fallback(fallback, "PrivateUse1")
        _libs.extend([impl, boxed])


def _register_structured(impl) -> None:
    """Structured ops (add.Tensor, mul.Tensor, ...) have a generic kernel for out-of-tree devices that allocates an
    empty output and calls the .out op: twice the work here (an allocation, a resize, a meta pass). Giving each its
    own entry into the fallback runs the functional CPU kernel directly (about 25 ms once, at install)."""
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("aten::") or \
                not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutogradNonFunctional") or \
                torch._C._dispatch_has_kernel_for_dispatch_key(name, "PrivateUse1"):
            continue
        base, _, overload = name[len("aten::"):].partition(".")
        op = getattr(getattr(torch.ops.aten, base), overload or "default")
        impl.impl(name[len("aten::"):], _entry(op), "PrivateUse1")


def _entry(op):
    def kernel(*args, **kwargs):
        return fallback(op, *args, **kwargs)
    return kernel
