"""The device audit tells copies from mixed-device compute (checked with the meta device)."""

from __future__ import annotations

import torch

from tests.device_audit import DeviceAudit


def test_audit_counts_uploads_and_flags_mixed_ops():
    with DeviceAudit() as audit:
        x = torch.arange(6.0).to("meta")  # an upload: allowed, counted
        y = x * torch.tensor(2.0)  # a CPU scalar operand: allowed
        _ = y + 1
    assert audit.copies_into("meta") == 1
    assert audit.mixed() == []
    assert audit.ops_on("meta") >= 1


def test_a_step_on_the_cpu_touches_only_the_cpu(demo_model_dir):
    from tests.unit.step_on_device import run_one_step

    audit = run_one_step(demo_model_dir, torch.device("cpu"))
    assert audit.ops and all(devices <= {"cpu"} for _, devices, _ in audit.ops)
