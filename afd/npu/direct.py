"""torch_npu.<op> as the fake exposes it: torch.ops.npu.<op>, called past torch's dispatcher when it would only
pass the call through to the npu kernel.

The dispatcher costs about 25 us per call into a Python kernel, a tenth of a combine. A call takes the direct way
only when the dispatcher would pick the npu kernel with the same arguments: it fits the schema (positional and
keyword-only arguments, exact types), every tensor is a plain npu tensor that needs no grad, and no torch
function or dispatch mode, fake tensor or compiler is in play. Anything else (a wrong type, a CPU tensor, meta
and fake tensors, torch.compile) goes through torch.ops.npu.<op>, so its errors and behaviour are the
dispatcher's own. It is still torch's OpOverloadPacket (a subclass, cached where torch caches packets), so
`torch_npu.<op> is torch.ops.npu.<op>`, `.default` and everything else hold as on hardware.
"""
from __future__ import annotations

import torch
from torch._ops import OpOverloadPacket

_TENSOR, _OPT_TENSOR, _INT, _INT_LIST, _STR, _OTHER = range(6)


def _kind(t) -> int:
    text = str(t)
    return {"Tensor": _TENSOR, "Optional[Tensor]": _OPT_TENSOR, "int": _INT, "List[int]": _INT_LIST,
            "str": _STR}.get(text, _OTHER)


class DirectPacket(OpOverloadPacket):
    """torch.ops.npu.<name> (so torch_npu.<name> too): the same OpOverloadPacket, with a direct path to its kernel."""

    def __init__(self, packet: OpOverloadPacket, kernel):
        super().__init__(packet._qualified_op_name, packet.__name__, packet._op, packet._overload_names)
        self.__module__ = packet.__module__
        self._kernel = kernel
        args = packet.default._schema.arguments
        positional = [a for a in args if not a.kwarg_only]
        self._kinds = [_kind(a.type) for a in positional]
        self._by_name = {a.name: _kind(a.type) for a in args}
        required = {a.name for a in args if not a.has_default_value()}
        # per count of positional arguments given: their names, and the required ones that must then come by name
        self._taken = [frozenset(a.name for a in positional[:n]) for n in range(len(positional) + 1)]
        self._missing = [frozenset(required - self._taken[n]) for n in range(len(positional) + 1)]
        self._direct = all(k != _OTHER for k in self._by_name.values())

    def __call__(self, *args, **kwargs):
        if self._direct and self._plain(args, kwargs):
            return self._kernel(*args, **kwargs)
        return self._op(*args, **kwargs)

    def _plain(self, args, kwargs) -> bool:
        # (torch.compile needs no test here: dynamo records a call of an OpOverloadPacket in its graph without
        # tracing into it, and the graph's fake-tensor pass fails the exact-type test below)
        n = len(args)
        if n > len(self._kinds) or _len_dispatch_stack() or _len_function_stack() or \
                _tracing_state() is not None or _profiling() or _transforms_active():
            return False  # (a mode, torch.jit.trace, the profiler, vmap/grad/functionalize: the dispatcher's way)
        for kind, value in zip(self._kinds, args):
            if not _fits(kind, value):
                return False
        if not kwargs:
            return not self._missing[n]
        taken, by_name = self._taken[n], self._by_name
        for name, value in kwargs.items():
            kind = by_name.get(name)
            if kind is None or name in taken or not _fits(kind, value):
                return False
        return self._missing[n] <= kwargs.keys()


def install(namespace, kernels: dict) -> None:
    """Put a DirectPacket in place of each op's packet in torch.ops.<namespace> (where torch caches them)."""
    for name, kernel in kernels.items():
        packet = getattr(namespace, name)
        if not isinstance(packet, DirectPacket):
            setattr(namespace, name, DirectPacket(packet, kernel))


_INT64 = (-(1 << 63), (1 << 63) - 1)
_tracing_state = torch._C._get_tracing_state
_profiling = torch._C._autograd._profiler_enabled
_transforms_active = torch._C._are_functorch_transforms_active
_len_dispatch_stack = torch._C._len_torch_dispatch_stack
_len_function_stack = torch._C._len_torch_function_stack
_Tensor = torch.Tensor


def _fits(kind: int, value) -> bool:
    if kind == _TENSOR or (kind == _OPT_TENSOR and value is not None):
        # a plain npu tensor (afd.npu.tensors.is_npu: not CPU, not meta) that needs no grad
        return type(value) is _Tensor and not (value.is_cpu or value.is_meta or value.requires_grad)
    if kind == _OPT_TENSOR:
        return True
    if kind == _INT:
        return type(value) is int and _INT64[0] <= value <= _INT64[1]
    if kind == _INT_LIST:
        return type(value) in (list, tuple) and all(type(v) is int and _INT64[0] <= v <= _INT64[1] for v in value)
    return type(value) is str
