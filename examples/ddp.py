"""DDP: adapt first, then wrap. One process here (gloo, world size 1) so that it runs anywhere;
under torchrun every process runs this same code with its own rank."""

import os
import socket
import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit

if not dist.is_initialized():  # torchrun sets these; a single process picks a free port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=int(os.environ.get("RANK", 0)),
                            world_size=int(os.environ.get("WORLD_SIZE", 1)))
try:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4))
    peftkit.adapt(model, peftkit.DyLoraConfig(r=8, target_modules="all-linear"))  # 1. adapt
    ddp = DistributedDataParallel(model)                                           # 2. wrap
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    peftkit.attach(opt, ddp)  # 3. hooks (DyLoRA's rank draw) see through the DDP wrapper
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(dist.get_rank()))
    for _ in range(3):
        ddp(input_ids=ids, labels=ids).loss.backward()  # gradients all-reduced across processes
        opt.step()
        opt.zero_grad()
    with tempfile.TemporaryDirectory() as out:
        peftkit.save_adapter(ddp, out)  # rank 0 writes
        if dist.get_rank() == 0:
            print("saved:", sorted(os.listdir(out)))
finally:
    dist.destroy_process_group()
