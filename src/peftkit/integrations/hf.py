"""Hugging Face ``transformers`` integration: a Trainer callback that attaches peftkit's
training hooks to the Trainer's optimizer (so hooks never run twice, and never on a step the
Trainer skips), and keeps their state in the Trainer's checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..core import get_state
from ..hooks import attach, load_hook_state, save_hook_state


class PeftkitCallback(TrainerCallback):
    """``Trainer(..., callbacks=[PeftkitCallback()])``: runs the adapter's training hooks
    (AdaLoRA budget, DyLoRA rank draw, Delta-LoRA, …) once per real optimizer step.

    Hook state is written next to each checkpoint (``checkpoint-N/peftkit_hooks.*``) and read
    back when training resumes from one, so a resumed run continues exactly.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError("PeftkitCallback needs the Trainer's model and optimizer")
        attach(optimizer, model)
        if state.global_step > 0:
            # Resuming: the Trainer restored the step count from checkpoint-N before this call.
            load_hook_state(model, Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is not None and get_state(model, required=False) is not None:
            save_hook_state(model, Path(args.output_dir) / f"checkpoint-{state.global_step}")


__all__ = ["PeftkitCallback"]
