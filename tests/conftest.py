"""Tiny random-init models built from config, shared by the test modules."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)
warnings.filterwarnings("ignore", message=".*Unexpected keyword arguments.*")


class TinyMLP(nn.Module):
    """A plain torch.nn model: embedding, two linears, a head."""

    def __init__(self, vocab: int = 32, d: int = 16, n_out: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, n_out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (B, T, d)
        h = torch.relu(self.fc1(h))  # (B, T, 2d)
        h = self.fc2(h)  # (B, T, d)
        return self.head(h.mean(dim=1))  # (B, n_out)


def tiny_llama(seed: int = 0, **kw: object) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **kw,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(cfg).eval()


def tiny_mistral(seed: int = 0) -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return MistralForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_t5(seed: int = 0) -> nn.Module:
    """An encoder-decoder: T5 (relative positions, tied head), 2 + 2 layers."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(cfg).eval()


def tiny_bart(seed: int = 0) -> nn.Module:
    """An encoder-decoder: BART (learned positions, biases), 2 + 2 layers."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    cfg = BartConfig(
        vocab_size=128,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        init_std=0.1,  # larger than BART's 0.02: prompts and adapters change the tokens
    )
    return BartForConditionalGeneration(cfg).eval()


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyMLP().eval()


def tiny_llama_nf4(seed: int = 0) -> nn.Module:
    """The tiny Llama with every linear but the head in NF4 (QLoRA's base)."""
    from peftkit.quant import quantize_

    return quantize_(tiny_llama(seed))


MODELS = {
    "mlp": tiny_mlp,
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "nf4": tiny_llama_nf4,
    "t5": tiny_t5,
    "bart": tiny_bart,
}


def ids(batch: int = 2, seq: int = 8, vocab: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits  # type: ignore[no-any-return]


@pytest.fixture
def tmp_adapter(tmp_path: object) -> object:
    return tmp_path


def sole(module: nn.Module) -> nn.Module:
    """The one adapter of an adapted layer (``model.fc1`` is an AdaptedLayer holding adapters by
    name); any other module is returned as it is."""
    from peftkit.core import AdaptedLayer

    if isinstance(module, AdaptedLayer):
        (adapter,) = module.adapters.values()
        return adapter
    return module
