"""LongLoRA: efficient context extension of RoPE language models (Chen et al., ICLR 2024,
https://arxiv.org/abs/2309.12307).

Three parts, all on at once:

1. **LoRA** on the attention projections (r = 8, α = 16 by default): ``y = x W₀ᵀ + (α/r)(x Aᵀ) Bᵀ``,
   the layers of :mod:`peftkit.methods.lora` (``use_dora=True`` gives DoRA layers instead).
2. **Trainable embeddings and norms** (the paper's "LoRA+", not Hayou et al.'s LoRA+): whole
   modules trained as PEFT ``modules_to_save`` copies (see :class:`LongLoraConfig` ``trainable``).
3. **S2-Attn while training, full attention otherwise**: with ``G = N · group_size_ratio`` (rounded
   down to an even number), half of the heads attend within the groups ``[kG, (k+1)G)`` and half
   within groups shifted by ``G/2``, without wrap-around (:func:`peftkit.attention.s2_attention`);
   eval mode, ``generate`` and ``disable_adapters`` use the model's own attention. Plus **position
   interpolation** when ``context_factor`` is set: RoPE angles ``θ_j · m / s`` with ``s`` the linear
   factor, multiplied by ``context_factor``.

S2 and interpolation act on Hugging Face ``transformers`` models with RoPE, through public
extension points (:mod:`peftkit.integrations.longlora_hf`); on other models (an MLP, GPT-2's
learned positions) the method is LoRA plus the trainable modules, and ``context_factor`` is refused.

Files are PEFT LoRA files (``peft_type: "LORA"``, ``peftkit_method: "longlora"``): PEFT loads the
LoRA weights and, from ``modules_to_save`` (written as full module paths), the trained embeddings
and norms; it ignores ``group_size_ratio``, ``trainable`` and ``context_factor`` with a warning,
so a model with ``context_factor`` needs the same RoPE scaling on its config before PEFT loads it
(``peftkit.load_adapter`` applies it). A merged model keeps the scaling in its config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ..config import AdapterConfig, as_tuple, check_finite_number
from ..core import AdaptedLayer, Adapter, ModulesToSave, Switchable, model_state
from . import dora, lora
from .lora import LoraConfig
from .registry import LayerSpec, Method


@dataclass(frozen=True, kw_only=True)
class LongLoraConfig(LoraConfig):
    """LongLoRA: every :class:`~peftkit.LoraConfig` field (LongLoRA's defaults: r 8, α 16, the four
    attention projections), plus:

    ``group_size_ratio``: S2 group size over the sequence length (the paper's 1/4); ``None`` trains
    with full attention. ``context_factor``: linear position interpolation factor s ≥ 1 (e.g. 4 to
    run at 4 × the trained context), multiplied into any linear factor the model already has;
    ``None`` leaves positions alone. ``trainable``: modules trained in full.

    ``trainable`` is matched by PEFT's own ``modules_to_save`` rule, a plain suffix test
    ``name.endswith(key)``, so the default ``("embed_tokens", "norm")`` selects
    ``model.embed_tokens`` and every module whose name ends in ``norm``: ``input_layernorm``,
    ``post_attention_layernorm``, ``model.norm``, and Qwen3's per-head ``q_norm``/``k_norm`` too,
    as the official code trains every parameter with "norm" in its name. Keys that match nothing
    are skipped (GPT-2 names its norms ``ln_*``: pass them); a module that is also a LoRA target
    gets LoRA only. The resolved modules are written to the file's ``modules_to_save`` as full
    paths, which PEFT and peftkit both read as exactly those modules. ``modules_to_save`` keeps
    its usual meaning (e.g. ``["lm_head"]``).

    Tied embeddings: the trained copy of the embedding serves the input lookup only; a head tied
    to it keeps the frozen original (as PEFT's ``modules_to_save``). ``merge_and_unload``
    therefore sets ``tie_word_embeddings=False`` so the saved model keeps the two apart.
    """

    r: int = 8
    lora_alpha: float = 16
    target_modules: str | tuple[str, ...] | None = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_dropout: float = 0.0
    group_size_ratio: float | None = 0.25
    trainable: tuple[str, ...] = ("embed_tokens", "norm")
    context_factor: float | None = None

    peft_type: ClassVar[str | None] = "LORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        ratio = self.group_size_ratio
        if ratio is not None:
            check_finite_number("group_size_ratio", ratio, positive=True)
            if ratio > 1:
                raise ValueError(
                    f"group_size_ratio must be in (0, 1] (a fraction of the sequence), got "
                    f"{ratio!r}; LongLoRA uses 0.25, or None for full attention"
                )
        factor = self.context_factor
        if factor is not None:
            check_finite_number("context_factor", factor, positive=True)
            if factor < 1:
                raise ValueError(
                    f"context_factor must be >= 1 (how many times longer the context gets), got "
                    f"{factor!r}; e.g. context_factor=4 for 4 × the trained length"
                )
        object.__setattr__(self, "trainable", as_tuple(self.trainable, "trainable", str) or ())

    @property
    def method(self) -> str:
        return "longlora"


class LongLoraState(Switchable):
    """The shared module (``model.peftkit_shared``): S2 settings read by the registered attention
    function, and what ``unload`` puts back. No tensors: nothing of it is saved."""

    def __init__(self, config: LongLoraConfig) -> None:
        super().__init__()
        self.group_size_ratio = config.group_size_ratio
        self.context_factor = config.context_factor
        self.trained: list[str] = []  # module paths trained in full for ``trainable``
        self.tied_embedding = False
        self.attention: list[Any] = []  # longlora_hf.AttentionRecord
        self.rope: list[Any] = []  # longlora_hf.RopeRecord

    def on_unload(self, model: nn.Module, *, merged: bool) -> None:
        """Called by ``unload``/``merge_and_unload``: original attention back; original positions
        back unless merged (a merged model keeps the interpolation in its config)."""
        if self.attention or self.rope:
            from ..integrations import longlora_hf

            longlora_hf.restore_attention(model, self.attention)
            longlora_hf.restore_positions(model, self.rope, merged=merged)
        self.attention, self.rope = [], []
        if merged and self.tied_embedding:
            cfg = getattr(model, "config", None)
            if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False

    def extra_repr(self) -> str:
        return (
            f"group_size_ratio={self.group_size_ratio}, context_factor={self.context_factor}, "
            f"trained={len(self.trained)} modules"
        )


def _tail(name: str, keys: Sequence[str]) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys)  # the core's modules_to_save


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def trainable_modules(
    model: nn.Module, config: LongLoraConfig, targets: Sequence[tuple[str, nn.Module]]
) -> list[str]:
    """Paths selected by ``config.trainable`` (PEFT's suffix rule), outermost only, skipping LoRA
    targets and anything inside or around them."""
    found: list[str] = []
    names = [t for t, _ in targets]
    for name, m in model.named_modules():
        if not name or not any(name.endswith(k) for k in config.trainable):
            continue
        if isinstance(m, (Adapter, AdaptedLayer, ModulesToSave)) or any(
            _related(name, t) for t in names
        ):
            continue
        if not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def _is_hf(model: nn.Module) -> bool:
    return any(callable(getattr(m, "set_attn_implementation", None)) for m in model.modules())


def check(
    model: nn.Module, config: LongLoraConfig, targets: Sequence[tuple[str, nn.Module]]
) -> None:
    if config.context_factor is not None:
        if not _is_hf(model):
            raise ValueError(
                f"context_factor={config.context_factor} needs a transformers RoPE model, got "
                f"{type(model).__name__}; set context_factor=None"
            )
        from ..integrations import longlora_hf

        longlora_hf.check_positions(model, config.context_factor)
    saved = config.modules_to_save or ()
    core = [n for n, _ in model.named_modules() if n and _tail(n, saved)]
    for name in trainable_modules(model, config, targets):
        clash = [c for c in core if c.startswith(name + ".")]
        if clash:
            raise ValueError(
                f"trainable selects {name!r}, which contains modules_to_save module {clash[0]!r}; "
                "narrow trainable or modules_to_save so that one module is not trained twice"
            )


def prepare(
    model: nn.Module, config: LongLoraConfig, targets: Sequence[tuple[str, nn.Module]]
) -> LongLoraState:
    state = LongLoraState(config)
    if _is_hf(model) and (config.group_size_ratio is not None or config.context_factor):
        from ..integrations import longlora_hf

        if config.group_size_ratio is not None:
            state.attention = longlora_hf.switch_attention(model, state)
        if config.context_factor is not None:
            try:
                state.rope = longlora_hf.extend_positions(model, config.context_factor)
            except BaseException:
                longlora_hf.restore_attention(model, state.attention)
                raise
    # Note: modules that modules_to_save also selects are left to the core, which wraps them
    # after this; wrapping them here too would nest two copies.
    saved = config.modules_to_save or ()
    core = [n for n, _ in model.named_modules() if n and _tail(n, saved)]
    state.trained = trainable_modules(model, config, targets)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    head_w = getattr(head, "weight", None)
    for name in state.trained:
        module = model.get_submodule(name)
        if isinstance(head_w, Tensor) and getattr(module, "weight", None) is head_w:
            state.tied_embedding = True
        if not any(name == c or name.startswith(c + ".") for c in core):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, ModulesToSave(module))
    return state


def make_layer(base: nn.Module, config: AdapterConfig, spec: LayerSpec) -> Adapter:
    assert isinstance(config, LongLoraConfig)
    build = dora.make_layer if config.use_dora else lora.make_layer
    return build(base, config, spec)


def on_save(model: nn.Module, d: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """List the trained embeddings and norms in ``modules_to_save`` (full paths), so that PEFT
    restores them."""
    state = model_state(model).shared
    trained = state.trained if isinstance(state, LongLoraState) else []
    names = list(dict.fromkeys([*(d.get("modules_to_save") or []), *trained]))
    d["modules_to_save"] = names or None


METHOD = Method(
    name="longlora",
    config_cls=LongLoraConfig,
    make_layer=make_layer,
    reads=lambda d: d.get("peftkit_method") == "longlora",
    prepare=prepare,
    check=check,
    on_save=on_save,
)
