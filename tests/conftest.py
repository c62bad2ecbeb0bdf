"""Tiny random-weight models built from configs: fast, offline, and real transformers architectures."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def randomize_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every adapter a non-zero B (and A), so tests see a real ΔW."""
    import lorafit

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorafit.lora_layers(model):
            for param in layer.lora.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def lm_batch(seed: int = 0) -> dict:
    """Two padded rows; the first tokens of each are a masked prompt, as in instruction tuning."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
