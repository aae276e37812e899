"""Which devices the ops of a piece of code touch: for "a step's tensors all live on the device".

`DeviceAudit` is a TorchDispatchMode: every aten op inside it is recorded with the devices of
its tensor operands and results. Copies between devices are the only ops allowed to mix them
(that is how host-built metadata reaches the GPU); any other op that sees both a GPU tensor and
a CPU tensor of more than one element is a tensor that was built on the wrong device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

COPY_OPS = ("aten._to_copy", "aten.copy_", "aten._copy_from", "aten._copy_from_and_resize")


@dataclass
class DeviceAudit(TorchDispatchMode):
    # (op, devices of its tensors, whether its CPU tensors are all 0-dim)
    ops: list[tuple[str, frozenset[str], bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        devices = frozenset(t.device.type for t in tensors)
        scalar_cpu_only = all(t.dim() == 0 for t in tensors if t.device.type == "cpu")
        self.ops.append((str(func.overloadpacket._qualified_op_name).replace("::", "."), devices,
                         scalar_cpu_only))
        return out

    def copies_into(self, device_type: str) -> int:
        """Cross-device copies whose result is on `device_type` (host → device uploads)."""
        return sum(1 for op, devices, _ in self.ops
                   if op in COPY_OPS and device_type in devices and len(devices) > 1)

    def mixed(self) -> list[str]:
        """Non-copy ops that mixed a device tensor with a non-scalar CPU tensor."""
        return [op for op, devices, scalar_cpu_only in self.ops
                if len(devices) > 1 and op not in COPY_OPS and not scalar_cpu_only]

    def ops_on(self, device_type: str) -> int:
        return sum(1 for _, devices, _ in self.ops if devices == {device_type})
