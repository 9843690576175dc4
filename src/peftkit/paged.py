"""PagedAdamW: AdamW whose moments live in host memory and are paged in for each step.

QLoRA (https://arxiv.org/abs/2305.14314, section 3) pages optimizer state to CPU RAM so that
memory spikes do not run the GPU out of memory. Paging is a placement policy only; the update is
AdamW's (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101), in torch's exact operation order:

    p   <- p * (1 - lr * lambda)
    m   <- lerp(m, g, 1 - beta1)                    v <- beta2 * v + (1 - beta2) * g * g
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

so results are bitwise identical to ``torch.optim.AdamW(..., foreach=False)``: the update is
elementwise, so doing it chunk by chunk changes no bit (tested on CPU; the CUDA test runs where a
GPU is present).

Here the moments are plain host tensors (pinned when the parameter is on CUDA). During ``step()``
each parameter's moments are copied to its device in chunks of ``page_numel`` elements, the next
chunk prefetched on a side CUDA stream while the current one updates, and written back. For CPU
parameters the chunks are views: nothing moves. Unlike bitsandbytes' paged optimizers (CUDA
unified memory) this needs no driver support, at the cost of two host<->device copies per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["PagedAdamW"]


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with host-resident ``exp_avg`` / ``exp_avg_sq``; hyperparameters as torch's AdamW.

    ``page_numel`` is the number of elements of each moment moved to the device at once.
    ``amsgrad`` is not supported.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        page_numel: int = 1 << 22,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas {betas}: each must be in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if page_numel < 1:
            raise ValueError(f"page_numel must be >= 1, got {page_numel}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.page_numel = page_numel
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @staticmethod
    def _host_zeros(p: Tensor) -> Tensor:
        return torch.zeros_like(p, device="cpu").pin_memory() if p.is_cuda else torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        devices: set[torch.device] = set()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    # As torch's AdamW: the step count is a CPU scalar tensor, fp32 unless fp64.
                    f64 = torch.get_default_dtype() == torch.float64
                    state["step"] = torch.tensor(0.0, dtype=torch.float64 if f64 else torch.float32)
                    state["exp_avg"] = self._host_zeros(p)
                    state["exp_avg_sq"] = self._host_zeros(p)
                state["step"] += 1
                self._paged_update(p, state, group)
                if p.is_cuda:
                    devices.add(p.device)
        for dev in devices:  # the write-backs to host must land before anyone reads the state
            torch.cuda.synchronize(dev)
        return loss

    def _paged_update(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        grad, m_host, v_host = p.grad, state["exp_avg"], state["exp_avg_sq"]
        if grad is None:
            return
        chunks: list[tuple[Tensor, Tensor, Tensor, Tensor]] = [(p, grad, m_host, v_host)]
        if p.is_contiguous() and grad.is_contiguous() and m_host.is_contiguous():
            k = self.page_numel
            fp, fg, fm, fv = (t.view(-1) for t in (p, grad, m_host, v_host))
            chunks = [
                (fp[i : i + k], fg[i : i + k], fm[i : i + k], fv[i : i + k])
                for i in range(0, p.numel(), k)
            ]
        stream = self._stream(p.device) if p.is_cuda else None

        def fetch(i: int) -> tuple[Tensor, Tensor]:
            _, _, m, v = chunks[i]
            if stream is None:
                return m.to(p.device), v.to(p.device)  # CPU: the host views themselves
            with torch.cuda.stream(stream):
                return m.to(p.device, non_blocking=True), v.to(p.device, non_blocking=True)

        nxt = fetch(0)
        for i, (p_c, g_c, m_host_c, v_host_c) in enumerate(chunks):
            m, v = nxt
            if stream is not None:
                current = torch.cuda.current_stream(p.device)
                current.wait_stream(stream)
                m.record_stream(current)
                v.record_stream(current)
            if i + 1 < len(chunks):
                nxt = fetch(i + 1)  # overlaps this chunk's update
            _adamw_update(p_c, g_c, m, v, float(state["step"].item()), group)
            if m is not m_host_c:  # asynchronous only into CUDA's pinned memory; step() syncs
                m_host_c.copy_(m, non_blocking=stream is not None)
                v_host_c.copy_(v, non_blocking=stream is not None)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        return self._streams[device]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, then moves the moments (torch puts them on the param's device) to host."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].device.type != "cpu":
                    host = self._host_zeros(p)
                    host.copy_(state[key])
                    state[key] = host


def _adamw_update(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: float, group: dict[str, Any]
) -> None:
    """torch's ``_single_tensor_adam`` with decoupled weight decay, same ops in the same order."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if wd != 0:
        p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)
