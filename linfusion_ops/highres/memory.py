"""The memory model of high-resolution generation: live bytes counted op by op.

`LiveBytes` is a TorchDispatchMode that sees every tensor an op returns: a storage counts from
the op that created it until the tensor dies (its last Python reference goes), so its `peak`
is what a caching allocator would have to hold, without fragmentation, kernel workspaces or
the allocator's rounding. On the meta device nothing is allocated, so the model of a real
SD 1.5 / SD-XL step at 16K costs no memory: linfusion_ops' fake kernels and PyTorch's meta
kernels carry the shapes. `model_peak` runs any module that way (its parameters replaced by
meta tensors of the same shapes for the duration of the call) and adds what is resident:
weights, buffers and inputs. `apply_low_memory(max_memory=...)` chooses its techniques from it.
"""

import re
import weakref
from typing import Callable, Dict, Iterable, Optional, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

# The LiveBytes modes entered and not yet left, innermost last (see free_storage).
_ACTIVE = []

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: Union[int, str], name: str = "max_memory") -> int:
    """Bytes from an int or a string such as "24GB" (10^9, as accelerate's max_memory), "20GiB"
    (2^30), "512MB"."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name}: expected an int (bytes) or a string such as '24GB', got {value!r}")
    if isinstance(value, int):
        number, unit = value, ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", value.upper())
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(f"{name}: cannot read {value!r}; expected e.g. '24GB', '20GiB' or bytes")
        number, unit = float(match.group(1)), match.group(2)
    if number <= 0:
        raise ValueError(f"{name}: must be positive, got {value!r}")
    return int(number * _UNITS[unit])


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages that ops create on `device` (a device type such as
    "cuda", "cpu" or "meta", or None for every device) and are still referenced.

    `live` is the current count, `peak` its maximum since entering (or since `reset_peak`).
    Tensors that existed before entering are not counted: add them yourself (`model_peak`
    does). Views share their base's storage and count once.
    """

    def __init__(self, device: Optional[str] = None):
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._storages: Dict[int, tuple] = {}

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def reset_peak(self) -> None:
        self.peak = self.live

    def _track(self, tensor: torch.Tensor) -> None:
        if self.device is not None and tensor.device.type != self.device:
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._storages:
            return
        nbytes = storage.nbytes()
        self._storages[key] = (weakref.ref(storage, lambda _, key=key: self._release(key)), nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _release(self, key: int) -> None:
        entry = self._storages.pop(key, None)
        if entry is not None:
            self.live -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results share an input's storage: nothing new (and an input made
        # before entering, such as a weight, must not start counting through its views).
        inputs = {
            id(v.untyped_storage())
            for v in tree_flatten((args, kwargs))[0]
            if isinstance(v, torch.Tensor) and v.layout == torch.strided
        }
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and id(value.untyped_storage()) not in inputs:
                self._track(value)
        return out


def free_storage(tensor: torch.Tensor) -> None:
    """Give `tensor`'s memory back now (its storage resized to 0 bytes), for a tensor the caller
    made, that nothing will read again, but that a caller's frame still references; the active
    LiveBytes counters count the release."""
    storage = tensor.untyped_storage()
    for counter in _ACTIVE:
        counter._release(id(storage))
    storage.resize_(0)


def host_twin(tensor: torch.Tensor) -> torch.Tensor:
    """A meta tensor standing for a host copy of the meta tensor `tensor`: made outside every
    dispatch mode, so no LiveBytes counts it (meta tensors cannot be copied to the host, and a
    host copy costs no device memory). low_memory's skip offload uses it in dry runs."""
    with _disable_current_modes():
        return torch.empty_like(tensor)


def tensor_bytes(tree) -> int:
    """Bytes of the distinct storages of the tensors in a pytree (dicts, lists, tuples)."""
    seen, total = set(), 0
    for value in tree_flatten(tree)[0]:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if id(storage) not in seen:
                seen.add(id(storage))
                total += storage.nbytes()
    return total


def module_bytes(modules: Iterable[torch.nn.Module]) -> int:
    """Bytes of the parameters and buffers of `modules` (shared tensors once)."""
    return tensor_bytes([list(m.parameters()) + list(m.buffers()) for m in modules if m is not None])


def to_meta(tree):
    """The pytree with every tensor replaced by an empty meta tensor of its shape and dtype."""
    return tree_map(
        lambda v: torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v, tree
    )


def model_peak(fn: Callable, modules: Iterable[torch.nn.Module], inputs) -> int:
    """Peak device bytes of `fn(meta inputs)`: the weights and buffers of `modules`, the inputs,
    and the live bytes the call creates, counted on the meta device. The modules run with their
    parameters and buffers swapped for meta tensors (torch.func.functional_call semantics,
    nothing copied); `fn` receives the meta copy of `inputs` (a pytree)."""
    modules = [m for m in modules if m is not None]
    resident = module_bytes(modules) + tensor_bytes(inputs)
    swaps = []
    for module in modules:
        for sub in module.modules():
            for kind in ("_parameters", "_buffers"):
                table = getattr(sub, kind)
                for name, value in table.items():
                    if value is not None and not value.is_meta:
                        swaps.append((table, name, value))
    try:
        for table, name, value in swaps:
            meta = torch.empty_like(value, device="meta")
            table[name] = torch.nn.Parameter(meta, value.requires_grad) if isinstance(value, torch.nn.Parameter) else meta
        meta_inputs = to_meta(inputs)
        with torch.inference_mode(), LiveBytes("meta") as counter:
            fn(meta_inputs)
    finally:
        for table, name, value in swaps:
            table[name] = value
    return resident + counter.peak
