"""Host -> device copies without waits: step inputs in one packed copy, prefixes on a side stream.

A step's index tensors (token ids, positions, where each query's K/V is written) are built on the host
from Python lists and copied once, from pinned memory with `non_blocking`, so the engine thread queues
the forward without waiting for the device (nano-vllm's prepare_prefill / prepare_decode). On CPU the
host tensors are used as they are.
"""

from __future__ import annotations

import torch


def copy_to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """int64 host tensors -> the same on `device`, in one copy: packed into one pinned buffer, copied
    non_blocking, split into views. The caching host allocator keeps the buffer alive until the copy ran."""
    if device.type == "cpu":
        return tensors
    packed = torch.cat([t.reshape(-1) for t in tensors])
    if device.type == "cuda":
        packed = packed.pin_memory()
    on_device = packed.to(device, non_blocking=True)
    out, offset = [], 0
    for t in tensors:
        out.append(on_device[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def upload(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A prefix tensor to the device for the engine to read. Called from a worker thread (the prefix cache
    loads in one), never the engine thread. On CUDA: cast on the host, pin, copy non_blocking on a side
    stream so a running forward is not queued behind it, and wait for that stream here (in the worker).
    """
    host = tensor.to(dtype)
    if device.type != "cuda":
        return host.to(device)
    stream = _side_streams.setdefault(device, torch.cuda.Stream(device))
    pinned = host.pin_memory()
    with torch.cuda.stream(stream):
        on_device = pinned.to(device, non_blocking=True)
    # the engine reads it on its own (current) stream: tell the allocator, so the block is not reused for
    # side-stream work while a step that reads it is still queued
    on_device.record_stream(torch.cuda.current_stream(device))
    stream.synchronize()
    return on_device


def stage(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A prefix tensor kept on the host for the paged pool (the runner copies it into blocks when the prefix
    enters the pool): cast here, pinned when `device` is CUDA so that copy runs without a host wait."""
    host = tensor.to("cpu", dtype)
    return host.pin_memory() if device.type == "cuda" else host
