"""A lean incremental forward for Llama-architecture models, used by rollout sampling.

Why: on small models a decoding step is mostly framework overhead, not arithmetic. Each call of
`LlamaForCausalLM.forward` builds a 4-D attention mask, goes through the `Cache` object, the
attention-interface dispatch and the output dataclasses; for the default 1M-parameter model that is a
large share of a step (bench/README.md). `LlamaDecoder` runs the same modules with the same weights
(the model's own embedding, RMSNorms, projections, rotary embedding and MLPs), with q/k/v and the
MLP's gate/up projections as one matmul each, its KV cache in preallocated tensors and the attention
mask built once per rollout.

What it computes is Llama's forward, nothing else: at every real (non-padding) position the logits
equal the HF forward's to float rounding (tests/test_decode.py compares them on left-padded batches,
with grouped-query attention too). Models of any other architecture, or with options this path does
not cover, go through the HF forward (`supports`). Training passes keep the HF forward: at PPO's
update sizes the same rewrite measured no faster (42 ms per policy forward+backward either way).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def supports(model) -> bool:
    """True for a plain `LlamaForCausalLM` (SDPA or eager attention, no sliding window, no TP split).

    Not for one with LoRA adapters (rlhf/lora.py): their layers add a low-rank update to the projections'
    output, which this path, reading the projections' weights, would leave out.
    """
    if type(model).__name__ != "LlamaForCausalLM":
        return False
    if any(type(m).__module__.startswith("peft.") for m in model.modules()):
        return False
    cfg = model.config
    return (getattr(cfg, "pretraining_tp", 1) in (None, 1)
            and getattr(cfg, "_attn_implementation", "sdpa") in ("sdpa", "eager")
            and not getattr(cfg, "sliding_window", None))


def attention_allowed(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: query t may attend to key s when s <= t and s is a real token.

    Every position may also attend to itself, so a padding query (whose keys are all padding) stays
    finite instead of turning into NaN and spreading through the cache; real queries never see padding.
    """
    import torch

    t = torch.arange(mask.shape[-1], device=mask.device)
    allowed = (t[None, :] <= t[:, None])[None] & mask.bool()[:, None, :]
    allowed |= torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)[None]
    return allowed[:, None]


def _cat_linear(*linears, dtype=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of one linear map equal to `linears` side by side (their outputs concatenated),
    in `dtype` when given."""
    import torch

    if len(linears) == 1:  # no copy unless a cast is asked for
        weight, bias = linears[0].weight, linears[0].bias
        return weight.to(dtype), (bias.to(dtype) if bias is not None else None)
    weight = torch.cat([lin.weight for lin in linears]).to(dtype)
    biases = [lin.bias for lin in linears]
    return weight, (torch.cat(biases).to(dtype) if all(bias is not None for bias in biases) else None)


def _fused(body, dtype=None) -> list[tuple[tuple, ...]]:
    """Per layer: the q|k|v, o, gate|up and down projections' (weight, bias), q|k|v and gate|up as single
    weights, built once per rollout. The fused ones are copies; o and down are the modules' own tensors
    unless `dtype` asks for a cast copy."""
    return [(_cat_linear(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, dtype=dtype),
             _cat_linear(layer.self_attn.o_proj, dtype=dtype),
             _cat_linear(layer.mlp.gate_proj, layer.mlp.up_proj, dtype=dtype),
             _cat_linear(layer.mlp.down_proj, dtype=dtype)) for layer in body.layers]


class LlamaDecoder:
    """Prefill a left-padded batch, then extend it one token per call, with preallocated KV tensors.

    mask (B, width + max_new_tokens): 1 for real tokens, for the queries and every token to come. For
    no_grad / inference_mode use: the fused weights are copies made at construction.

    weight_dtype: the dtype autocast runs the matmuls in (bf16 on CUDA), or None. The projection
    weights are cast to it once here instead of by autocast at every matmul of every token: the same
    rounding, so the same logits, minus 4 cast kernels per layer (and one for the LM head) per token.
    """

    def __init__(self, model, mask: torch.Tensor, weight_dtype: torch.dtype | None = None):
        cfg = model.config
        self.model = model
        self.body = model.model
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.allowed = attention_allowed(mask)
        self.fused = _fused(self.body, weight_dtype)
        self.head = _cat_linear(model.lm_head, dtype=weight_dtype)
        self.capacity = mask.shape[1]
        # Per layer (B, kv_heads, capacity, head_dim), allocated at the first write in the dtype that
        # autocast gives k and v.
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the last of the new tokens `ids` (B, n) at `positions` (B, n)."""
        import torch.nn.functional as F
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        b, n = ids.shape
        start, end = self.length, self.length + n
        mask = self.allowed[:, :, start:end, :end]
        x = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(x, positions)
        sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
        for i, layer in enumerate(self.body.layers):
            attn, mlp = layer.self_attn, layer.mlp
            (w_qkv, b_qkv), (w_o, b_o), (w_gu, b_gu), (w_down, b_down) = self.fused[i]
            q, k, v = F.linear(layer.input_layernorm(x), w_qkv, b_qkv).split(sizes, dim=-1)
            q = q.view(b, n, heads, head_dim).transpose(1, 2)
            k = k.view(b, n, kv_heads, head_dim).transpose(1, 2)
            v = v.view(b, n, kv_heads, head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if i == len(self.keys):
                self.keys.append(k.new_empty((b, kv_heads, self.capacity, head_dim)))
                self.values.append(v.new_empty((b, kv_heads, self.capacity, head_dim)))
            self.keys[i][:, :, start:end] = k
            self.values[i][:, :, start:end] = v
            k, v = self.keys[i][:, :, :end], self.values[i][:, :, :end]
            if heads != kv_heads:
                k = k.repeat_interleave(heads // kv_heads, dim=1)
                v = v.repeat_interleave(heads // kv_heads, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
            x = x + F.linear(o.transpose(1, 2).reshape(b, n, heads * head_dim), w_o, b_o)
            gate, up = F.linear(layer.post_attention_layernorm(x), w_gu, b_gu).chunk(2, dim=-1)
            x = x + F.linear(mlp.act_fn(gate) * up, w_down, b_down)
        self.length = end
        return F.linear(self.body.norm(x[:, -1]), *self.head)
