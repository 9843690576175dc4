"""Hugging Face ``transformers`` integration: a Trainer callback that attaches peftkit's
training hooks to the Trainer's optimizer (so hooks never run twice, and never on a step the
Trainer skips), and keeps their state in the Trainer's checkpoints.

What the Trainer writes. ``trainer.save_model(dir)`` and each ``checkpoint-N`` call the model's
``save_pretrained``, which on an adapted model writes the adapter in PEFT's layout
(:mod:`peftkit.pretrained`), never the frozen base. To resume, the Trainer reads a
``model.safetensors`` in the checkpoint with ``load_state_dict(strict=False)``: the callback
writes one there holding only the tensors that change in training (adapter parameters and
buffers, ``modules_to_save`` copies; Delta-LoRA's moving base weights), under the model's own
``state_dict`` names, so a resumed run is bit-exact and the checkpoint stays adapter-sized. The
Trainer then logs the frozen base's keys as "missing": they are the model already in memory.
Without the callback, checkpoints hold only the adapter, and ``resume_from_checkpoint`` fails
with the Trainer's "Can't find a checkpoint index" error."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..core import get_state, unwrap
from ..hooks import attach, load_hook_state, save_hook_state

#: the file the Trainer reads back on resume (``transformers.utils.SAFE_WEIGHTS_NAME``)
RESUME_NAME = "model.safetensors"


def save_resume_tensors(model: Any, directory: Path) -> None:
    """Write what changes in training, by ``state_dict`` key, as ``directory/model.safetensors``
    (rank 0 only, atomic): what ``Trainer._load_from_checkpoint`` loads on resume."""
    from ..checkpoint import training_tensors
    from ..state import write_files

    tensors = {k: t.detach().to("cpu").clone() for k, t in training_tensors(model).items()}
    write_files(directory, {}, {RESUME_NAME: tensors})


class PeftkitCallback(TrainerCallback):
    """``Trainer(..., callbacks=[PeftkitCallback()])``: runs the adapter's training hooks
    (AdaLoRA budget, DyLoRA rank draw, Delta-LoRA, …) once per real optimizer step.

    Hook state is written next to each checkpoint (``checkpoint-N/peftkit_hooks.*``) and read
    back when training resumes from one, so a resumed run continues exactly; so is
    ``checkpoint-N/model.safetensors`` with the training tensors alone (see the module).
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError("PeftkitCallback needs the Trainer's model and optimizer")
        attach(optimizer, model)
        if state.global_step > 0:
            # Resuming: the Trainer restored the step count from checkpoint-N before this call.
            # Note: the callback is not told which folder the Trainer resumed from; it looks in
            # this run's output_dir, and says so when the hooks' state is not there.
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            hooks = getattr(get_state(model, required=False), "hooks", [])
            if not load_hook_state(model, folder) and hooks:
                warnings.warn(
                    f"resuming at step {state.global_step} but {folder} holds no peftkit hook "
                    "state: AdaLoRA/DyLoRA/DoRA-Mao/Delta-LoRA schedules restart from scratch. "
                    "Resume with the output_dir of the run that wrote the checkpoint.",
                    stacklevel=2,
                )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is not None and get_state(model, required=False) is not None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_hook_state(model, folder)
            save_resume_tensors(unwrap(model), folder)


__all__ = ["PeftkitCallback"]
