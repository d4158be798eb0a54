"""The machine fastbert runs on, as the measured choices (:mod:`fastbert.tuning`), the benchmarks
and ``python -m fastbert.info`` describe it."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu(cpuinfo: Path = CPUINFO) -> dict:
    """The CPU from ``cpuinfo``'s first processor block: ``vendor`` (``vendor_id``: GenuineIntel,
    AuthenticAMD), ``model`` (``model name``, as lscpu prints it), ``family_model`` (cpuid family
    and model, e.g. ``6-207``) and ``flags`` (the sorted ISA flags). Without ``cpuinfo`` (not
    Linux) or where it lacks a field (ARM), the vendor, family-model and flags are None and the
    model is what :mod:`platform` says."""
    fields: dict[str, str] = {}
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return {
        "vendor": fields.get("vendor_id") or None,
        "model": fields.get("model name") or platform.processor() or platform.machine() or "unknown",
        "family_model": (f"{fields['cpu family']}-{fields['model']}"
                         if "cpu family" in fields and "model" in fields else None),
        "flags": sorted(fields["flags"].split()) if "flags" in fields else None,
    }


def gpu(device: torch.device) -> dict:
    """A CUDA device's name and compute capability (``"9.0"``)."""
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}"}
