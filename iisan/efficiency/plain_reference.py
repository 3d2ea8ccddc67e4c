"""A deliberately plain implementation of the reference settings (docs/performance.md), no iisan code: HF
``BertModel`` + ``ViTModel`` built from their default configs (BERT-base, ViT-B/16 at 224 px; or tiny
ones), inputs already on the device, fixed shapes. The diagnosis times it beside iisan's own steps on
the same card, so a gap can be told apart from the card and library versions."""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from ..model.patches import PatchProjection
from .flops import count_flops
from .timing import gpu_profile, peak_gib, reset, timed

TITLE_TOKENS = 30


def plain_models(size: str, device: torch.device, attn: str = "sdpa", dtype=torch.float32):
    if size == "base":  # the default configs are BERT-base and ViT-B/16 at 224 px
        text_cfg, image_cfg = BertConfig(attn_implementation=attn), ViTConfig(attn_implementation=attn)
    else:
        small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     attn_implementation=attn)
        text_cfg, image_cfg = BertConfig(**small), ViTConfig(**small, image_size=224, patch_size=32)
    with device:  # initialised where they run: random init of 200 M parameters on a CPU takes seconds
        text = BertModel(text_cfg, add_pooling_layer=False).to(dtype)
        image = ViTModel(image_cfg, add_pooling_layer=False).to(dtype)
    return text, image


def plain_inputs(n: int, device: torch.device, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 224, 224, generator=g).to(device)
    tokens = torch.randint(1000, vocab, (n, TITLE_TOKENS), generator=g).to(device)
    lengths = torch.randint(8, TITLE_TOKENS + 1, (n, 1), generator=g).to(device)
    mask = (torch.arange(TITLE_TOKENS, device=device) < lengths).long()  # titles of 8..30 tokens
    return pixels, tokens, mask


def plain_fft_step(size: str, n: int, device: torch.device, amp, warmup: int, reps: int) -> dict:
    """Both towers trained end to end: final CLS -> GELU heads -> com_dense, in-batch softmax, fused Adam."""
    text, image = plain_models(size, device)
    width_t, width_i = text.config.hidden_size, image.config.hidden_size
    heads = nn.ModuleList([nn.Linear(width_i, 64), nn.Linear(width_t, 64), nn.Linear(128, 64)]).to(device)
    modules = nn.ModuleList([text, image, heads]).train()
    optimizer = torch.optim.Adam(modules.parameters(), lr=1e-5, fused=True)
    pixels, tokens, mask = plain_inputs(n, device, text.config.vocab_size)
    target = torch.arange(n, device=device)

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            cls_i = image(pixel_values=pixels).last_hidden_state[:, 0]
            cls_t = text(input_ids=tokens, attention_mask=mask).last_hidden_state[:, 0]
            item = heads[2](torch.cat([nn.functional.gelu(heads[0](cls_i)), nn.functional.gelu(heads[1](cls_t))], -1))
            loss = nn.functional.cross_entropy((item @ item.T).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset(device)
    flops = count_flops(step)  # also a warm-up step
    seconds = timed(step, device, warmup, reps)
    return {"items": n, "seconds_per_step": seconds, "peak_allocated_gib": peak_gib(device),
            "flops_per_step": flops, "tflops_per_second": flops / seconds / 1e12,
            "profile": gpu_profile(step, device)}


def plain_frozen_forward(size: str, n: int, device: torch.device, amp, warmup: int, reps: int,
                         attn: str = "sdpa", weights=torch.float32, hidden_states: bool = False,
                         cudnn_benchmark: bool = False) -> dict:
    """Both frozen towers, eval mode, no autograd graph: the live feed's forward."""
    text, image = plain_models(size, device, attn, weights)
    text.eval(), image.eval()
    pixels, tokens, mask = plain_inputs(n, device, text.config.vocab_size)
    pixels = pixels.to(weights)
    use_amp = amp is not None and weights == torch.float32

    @torch.no_grad()
    def forward():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=use_amp):
            image(pixel_values=pixels, output_hidden_states=hidden_states)
            text(input_ids=tokens, attention_mask=mask, output_hidden_states=hidden_states)

    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        reset(device)
        flops = count_flops(forward)
        seconds = timed(forward, device, warmup, reps)
    finally:
        torch.backends.cudnn.benchmark = previous
    return {"items": n, "attn": attn, "weights": str(weights).replace("torch.", ""), "autocast": use_amp,
            "hidden_states": hidden_states, "cudnn_benchmark": cudnn_benchmark, "seconds_per_step": seconds,
            "flops_per_step": flops, "tflops_per_second": flops / seconds / 1e12,
            "peak_allocated_gib": peak_gib(device)}


def plain_patch_embedding(size: str, n: int, device: torch.device, amp, warmup: int, reps: int) -> dict:
    """The ViT patch embedding alone (a stride-16 conv with 3 input channels): forward, and forward plus
    the weight gradient (FFT), on contiguous (NCHW) pixels and on channels-last ones (what a permute of
    HWC pixels gives); the same map as iisan's ``PatchProjection`` (one matmul over patches, the
    default) and as unfold + matmul. A poor cuDNN choice for this conv shows here."""
    _, image = plain_models(size, device)
    conv = image.embeddings.patch_embeddings.projection
    projection = PatchProjection(conv)
    nchw = plain_inputs(n, device, 2000)[0]
    layouts = {"nchw": nchw, "channels_last": nchw.contiguous(memory_format=torch.channels_last)}
    p = conv.kernel_size[0]
    out = {"items": n}

    def forward(pixels, module=conv):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return module(pixels)

    runs = [(f"conv_{name}", pixels, conv) for name, pixels in layouts.items()] + [("matmul_nchw", nchw, projection)]
    for name, pixels, module in runs:
        with torch.no_grad():
            out[f"{name}_seconds"] = timed(lambda x=pixels, m=module: forward(x, m), device, warmup, reps)

        def train_step(x=pixels, m=module):
            forward(x, m).float().sum().backward()
            conv.weight.grad = conv.bias.grad = None

        out[f"{name}_fwd_bwd_seconds"] = timed(train_step, device, warmup, reps)

    weight = conv.weight.reshape(conv.out_channels, -1)

    @torch.no_grad()
    def as_matmul():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            patches = nn.functional.unfold(nchw, p, stride=p).transpose(1, 2)  # (n, patches, 3*p*p)
            return patches @ weight.T + conv.bias

    out["unfold_matmul_seconds"] = timed(as_matmul, device, warmup, reps)
    return out
