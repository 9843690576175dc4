"""Hugging Face ``transformers`` integration: a Trainer callback that attaches peftkit's
training hooks to the Trainer's optimizer, and nothing more (so hooks never run twice, and never
on a step the Trainer skips)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..hooks import attach


class PeftkitCallback(TrainerCallback):  # type: ignore[misc]
    """``Trainer(..., callbacks=[PeftkitCallback()])``: runs the adapter's training hooks
    (AdaLoRA budget, DyLoRA rank draw, Delta-LoRA, …) once per real optimizer step."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError("PeftkitCallback needs the Trainer's model and optimizer")
        attach(optimizer, model)


__all__ = ["PeftkitCallback"]
