"""The CoSMoE decoder in plain PyTorch: the math every backend must reproduce.

Export-friendly on purpose: no data-dependent Python control flow inside the per-unit modules
(attention, expert, router), static shapes for a given token count, no custom ops. The MoE
dispatch loop lives in ``MoE.forward`` so that lowered backends can replace it by the runtime's
own loop over per-expert units.

Shape legend used in the comments:
    B batch, T tokens in this call, S cached positions, D hidden, H query heads, G kv heads,
    Dh head size, E experts, K active experts per token, F expert FFN width, N = B*T tokens.

Parameter names equal the canonical tensor names of ``runtime_py.config.tensor_shapes``, so a
``state_dict`` is a bundle's tensor table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime_py.config import CosmoeConfig
from runtime_py.routers import route


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the scale, exactly as Llama/Mixtral/Qwen do:
        # bit-level parity with transformers depends on that order.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def decoder_norm(config: CosmoeConfig) -> nn.Module:
    """The decoder's attention, FFN and final norm (config.norm): RMSNorm, or LayerNorm with a bias
    (Phi-MoE; its eps is the config's rms_norm_eps, as transformers passes it)."""
    if config.norm == "layer":
        return nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
    return RMSNorm(config.hidden_size, config.rms_norm_eps)


def rope_inv_freq(config: CosmoeConfig) -> torch.Tensor:
    """Inverse RoPE frequencies [Dh/2] (Dh = config.rope_width: a head, or MLA's RoPE part of one),
    with Llama-3.1 or YaRN scaling when configured. With partial rotary (rotary_dim R < Dh) the
    frequencies are those of an R-dim RoPE, then zeros: pairs (i, i + Dh/2) for i >= R/2 do not
    rotate (cos 1, sin 0), which is exactly passing them through."""
    inv_freq = _scaled_inv_freq(config, config.rope_dims)
    return torch.cat([inv_freq, inv_freq.new_zeros(config.rope_width // 2 - inv_freq.shape[0])])


def _scaled_inv_freq(config: CosmoeConfig, dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope = config.rope_scaling
    kind = (rope or {}).get("rope_type", "default")
    if kind == "yarn":
        return _yarn_inv_freq(config, dim)
    if kind == "default":
        return inv_freq
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, a smooth ramp between.
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(config: CosmoeConfig, dim: int) -> torch.Tensor:
    """YaRN (Peng et al., 2023; gpt-oss): frequencies interpolated by `factor` below the correction
    range, kept above it, a linear ramp between; as transformers' _compute_yarn_parameters."""
    rope, base = config.rope_scaling, config.rope_theta
    factor, old_ctx = rope["factor"], rope["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength turns `rotations` times in old_ctx
        return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope["beta_fast"]), correction_dim(rope["beta_slow"])
    if rope["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation


def rope_attention_factor(config: CosmoeConfig) -> float:
    """What cos and sin are multiplied by: YaRN's attention factor (stored in rope_scaling at
    import, as transformers derives it), else 1."""
    rope = config.rope_scaling or {}
    return float(rope["attention_factor"]) if rope.get("rope_type") == "yarn" else 1.0


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, Dh] for positions [T], times ``scale`` (rope_attention_factor)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, Dh]
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def window_mask(t: int, s: int, window: int | None, offset: int = 0) -> torch.Tensor:
    """Which of S keys each of T queries may see, bool [T, S]: query i is at position offset + i and
    key j at position j; causal, and within the last ``window`` positions when one is given."""
    q = torch.arange(t)[:, None] + offset  # [T, 1]
    k = torch.arange(s)[None, :]  # [1, S]
    seen = k <= q
    return seen if window is None else seen & (q - k < window)


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None,
                   sinks: torch.Tensor) -> torch.Tensor:
    """Attention whose softmax has one more logit per head, dropped after it (gpt-oss's sinks, as
    transformers' eager_attention_forward): q [B, H, T, Dh], k and v [B, H, S, Dh] (kv heads
    repeated), additive mask [T, S], sinks [H] -> [B, H, T, Dh]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale + mask  # [B, H, T, S]
    sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1).to(logits.dtype)  # [B, H, T, 1]
    combined = torch.cat([logits, sink], dim=-1)  # [B, H, T, S+1]
    combined = combined - combined.amax(dim=-1, keepdim=True)
    probs = torch.softmax(combined, dim=-1)[..., :-1]  # [B, H, T, S]
    return probs.to(v.dtype) @ v


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, Dh]; cos, sin [T, Dh]."""
    return x * cos + _rotate_half(x) * sin


@dataclass
class LayerCache:
    """One layer's two cache tensors (config.cache_spec): keys k [B, G, S_max, Wk] and values v
    [B, G, S_max, Wv] (MLA: the latents and RoPE keys, G = 1), or a conv layer's state."""

    k: torch.Tensor
    v: torch.Tensor


class KVCache:
    """Static KV cache; it never grows past ``max_len`` (the model's context or less)."""

    def __init__(self, config: CosmoeConfig, batch: int, max_len: int, dtype: torch.dtype) -> None:
        def entry(layer: int) -> LayerCache:
            spec = config.cache_spec(layer)
            k, v = ((h, max_len if spec.positional else r, w) for h, r, w in (spec.k, spec.v))
            return LayerCache(torch.zeros(batch, *k, dtype=dtype), torch.zeros(batch, *v, dtype=dtype))
        self.layers = [entry(layer) for layer in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.pos = 0  # number of positions filled


class Attention(nn.Module):
    def __init__(self, config: CosmoeConfig, layer: int = 0) -> None:
        super().__init__()
        self.window = config.window(layer)  # None: full attention
        d, hd = config.hidden_size, config.head_size
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q = nn.Linear(d, self.n_heads * hd, bias=config.attention_bias)
        self.k = nn.Linear(d, self.n_kv * hd, bias=config.attention_bias)
        self.v = nn.Linear(d, self.n_kv * hd, bias=config.attention_bias)
        self.o = nn.Linear(self.n_heads * hd, d, bias=config.attention_out_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm in ("head", "head_after_rope"):
            self.q_norm, self.k_norm = RMSNorm(hd, config.rms_norm_eps), RMSNorm(hd, config.rms_norm_eps)
        elif config.qk_norm == "full":
            self.q_norm = RMSNorm(self.n_heads * hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.n_kv * hd, config.rms_norm_eps)
        self.clip_qkv = config.clip_qkv
        self.scale = config.attention_multiplier  # None: SDPA's 1 / sqrt(Dh)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads)) if config.attention_sinks else None
        # Qwen3.5: the attention output times sigmoid(gate(x)), per head dim, before o.
        self.gate = (nn.Linear(d, self.n_heads * hd, bias=config.attention_bias)
                     if config.attention_output_gate else None)

    def output(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """Attention output att [B, H, T, Dh] for inputs x [B, T, D] -> [B, T, D]: through the
        output gate where the family has one, then o."""
        b, t, _ = x.shape
        out = att.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # [B, T, H*Dh]
        return self.o(out if self.gate is None else out * torch.sigmoid(self.gate(x)))

    def project(self, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q [B, H, T, Dh], k and v [B, G, T, Dh], with RoPE and the family's q/k norm
        and clamp: the part of attention before the cache, shared with the lowered layer programs."""
        b, t, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)  # [B, T, H*Dh], [B, T, G*Dh] x2
        if self.qk_norm == "full":  # OLMoE normalises the whole projection before splitting heads
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (z.clamp(-self.clip_qkv, self.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        if self.qk_norm == "head":  # Qwen3-MoE and GLM normalise each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, Dh], [B, G, T, Dh]
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # [B, G, T, Dh]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.qk_norm == "head_after_rope":  # HunYuan normalises each head after RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None, pos: int = 0) -> torch.Tensor:
        """x [B, T, D] at positions pos..pos+T-1; with a cache, attends to positions 0..pos+T-1."""
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)  # [B, H, T, Dh], [B, G, T, Dh] x2
        if cache is not None:
            cache.k[:, :, pos:pos + t] = k
            cache.v[:, :, pos:pos + t] = v
            k, v = cache.k[:, :, :pos + t], cache.v[:, :, :pos + t]  # [B, G, S, Dh]
        s = k.shape[2]
        # Query i sits at absolute position s-t+i and sees keys 0..s-t+i (the last `window` of them).
        mask = window_mask(t, s, self.window, offset=s - t)  # [T, S]
        if self.sinks is not None:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, S, Dh]
            additive = torch.zeros(t, s, dtype=q.dtype).masked_fill(~mask, float("-inf"))
            out = sink_attention(q, k, v, additive, self.scale, self.sinks)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads,
                                                 scale=self.scale)
        return self.output(x, out)  # [B, T, D]


class LatentUpProjection(nn.Module):
    """MLA's kv_b [H*(N+V), r]: a matrix whose per-head blocks multiply the query and the attended
    latent, never applied as a linear; not an nn.Linear, so no integer kernel replaces it (the
    runtimes hold it dequantized)."""

    def __init__(self, rank: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, rank))


# DeepSeek's q_a and kv_a norms take RMSNorm's default eps, not the config's (modeling_deepseek_v2.py).
LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, Sec. 2.1, Eqs. 9-19), in its absorbed form.

    Each token caches c [r] (the RMSNorm'd latent, kv_lora_rank dims) and one RoPE key k_r [R]
    shared by all heads. Head h's key is [W_uk[h] c | k_r] and its value W_uv[h] c, with kv_b =
    [W_uk; W_uv] per head; so q_h . k_h = (q_nope_h W_uk[h]) . c + q_rope_h . k_r, and the value sum
    is W_uv[h] (sum_s p_s c_s): attention runs over the latent and nothing per head is expanded
    over the S cached positions (transformers expands; the two agree to rounding).
    Shapes: B, T, S, H; N = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim, r = kv_lora_rank.
    """

    def __init__(self, config: CosmoeConfig, layer: int = 0) -> None:
        super().__init__()
        d, h, r, ql = config.hidden_size, config.num_attention_heads, config.kv_lora_rank, config.q_lora_rank
        self.n_heads, self.r, self.rope = h, r, config.qk_rope_head_dim
        self.nope, self.v_dim = config.qk_nope_head_dim, config.v_head_dim
        qk = self.nope + self.rope
        self.q_lora = ql is not None
        if ql is None:
            self.q = nn.Linear(d, h * qk, bias=False)
        else:
            self.q_a = nn.Linear(d, ql, bias=config.attention_bias)
            self.q_a_norm = RMSNorm(ql, LATENT_NORM_EPS)
            self.q_b = nn.Linear(ql, h * qk, bias=False)
        self.kv_a = nn.Linear(d, r + self.rope, bias=config.attention_bias)
        self.kv_a_norm = RMSNorm(r, LATENT_NORM_EPS)
        self.kv_b = LatentUpProjection(r, h * (self.nope + self.v_dim))
        self.o = nn.Linear(h * self.v_dim, d, bias=config.attention_out_bias)
        self.scale = config.attention_multiplier if config.attention_multiplier is not None else qk ** -0.5

    def project(self, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> the absorbed query [B, H, T, r + R], the latent c [B, 1, T, r] and the RoPE
        key k_r [B, 1, T, R] (the two cached per token); cos, sin [T, R]."""
        b, t, _ = x.shape
        q = self.q_b(self.q_a_norm(self.q_a(x))) if self.q_lora else self.q(x)  # [B, T, H*(N+R)]
        q = q.view(b, t, self.n_heads, self.nope + self.rope).transpose(1, 2)  # [B, H, T, N+R]
        kv = self.kv_a(x)  # [B, T, r+R]
        c = self.kv_a_norm(kv[..., :self.r]).unsqueeze(1)  # [B, 1, T, r]
        k_rope = apply_rope(kv[..., self.r:].unsqueeze(1), cos, sin)  # [B, 1, T, R]
        w_uk = self.kv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.r)[:, :self.nope]  # [H, N, r]
        q_latent = torch.matmul(q[..., :self.nope], w_uk)  # [B, H, T, r]
        return torch.cat([q_latent, apply_rope(q[..., self.nope:], cos, sin)], dim=-1), c, k_rope

    def attend(self, q: torch.Tensor, c: torch.Tensor, k_rope: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Absorbed query [B, H, T, r + R] over the S cached latents c [B, 1, S, r] and RoPE keys
        [B, 1, S, R], additive mask [T, S] -> [B, T, D]."""
        b, _, t, _ = q.shape
        keys = torch.cat([c, k_rope], dim=-1)  # [B, 1, S, r+R], one "head" shared by all
        scores = torch.matmul(q, keys.transpose(-1, -2)) * self.scale + mask  # [B, H, T, S]
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        latent = torch.matmul(probs, c)  # [B, H, T, r]
        w_uv = self.kv_b.weight.view(self.n_heads, self.nope + self.v_dim, self.r)[:, self.nope:]  # [H, V, r]
        out = torch.matmul(latent, w_uv.transpose(1, 2))  # [B, H, T, V]
        return self.o(out.transpose(1, 2).reshape(b, t, self.n_heads * self.v_dim))  # [B, T, D]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None, pos: int = 0) -> torch.Tensor:
        """As Attention.forward; the cache's k and v hold c and k_r."""
        t = x.shape[1]
        q, c, k_rope = self.project(x, cos, sin)
        if cache is not None:
            cache.k[:, :, pos:pos + t] = c
            cache.v[:, :, pos:pos + t] = k_rope
            c, k_rope = cache.k[:, :, :pos + t], cache.v[:, :, :pos + t]  # [B, 1, S, r], [B, 1, S, R]
        s = c.shape[2]
        mask = torch.zeros(t, s, dtype=q.dtype).masked_fill(~window_mask(t, s, None, offset=s - t), float("-inf"))
        return self.attend(q, c, k_rope, mask)


def causal_conv(state: torch.Tensor, u: torch.Tensor, kernel: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A short convolution continuing its state: state [B, 1, K-1, C] (the last K-1 inputs), u
    [B, T, C] -> (output [B, T, C], the new state [B, 1, K-1, C])."""
    window = torch.cat([state[:, 0], u], dim=1)  # [B, K-1+T, C]
    return short_conv(window, kernel, bias), window[:, window.shape[1] - state.shape[2]:].unsqueeze(1)


def short_conv(u: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise convolution of u [B, K-1+T, D] (K-1 earlier inputs, then T new ones) with
    kernel [D, 1, K] -> [B, T, D]: out[t] = sum_j kernel[:, 0, j] * u[t + j]. As K shifted products
    rather than a conv op, so every backend lowers it (transformers: F.conv1d, equal to rounding)."""
    k = kernel.shape[-1]
    t = u.shape[1] - (k - 1)
    out = sum(u[:, j:j + t] * kernel[:, 0, j] for j in range(k))  # [B, T, D]
    return out if bias is None else out + bias


class ShortConv(nn.Module):
    """LFM2's gated short convolution (modeling_lfm2_moe.py Lfm2MoeShortConv): B, C, x =
    in_proj(h); y = out_proj(C * conv(B * x)), the conv causal over the last K = conv_kernel inputs
    B * x. Its state is the last K - 1 of them [B, 1, K-1, D]; the cache's v is unused."""

    def __init__(self, config: CosmoeConfig, layer: int = 0) -> None:
        super().__init__()
        d, k = config.hidden_size, config.conv_kernel
        self.in_proj = nn.Linear(d, 3 * d, bias=config.conv_bias)
        self.weight = nn.Parameter(torch.empty(d, 1, k))
        self.bias = nn.Parameter(torch.empty(d)) if config.conv_bias else None
        self.out_proj = nn.Linear(d, d, bias=config.conv_bias)

    def mix(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] after state [B, 1, K-1, D] -> (y [B, T, D], the new state [B, 1, K-1, D])."""
        b, c, u = self.in_proj(x).chunk(3, dim=-1)  # [B, T, D] x3
        conv, state = causal_conv(state, b * u, self.weight, self.bias)  # [B, T, D], [B, 1, K-1, D]
        return self.out_proj(c * conv), state

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None, pos: int = 0) -> torch.Tensor:
        """As Attention.forward; the cache's k holds the state (zeros before position 0)."""
        k = self.weight.shape[-1]
        fresh = x.new_zeros(x.shape[0], 1, k - 1, x.shape[2])
        y, state = self.mix(x, fresh if cache is None or pos == 0 else cache.k)
        if cache is not None:
            cache.k.copy_(state)
        return y


# Tokens one closed-form step of the gated delta rule takes (the layer programs' max_tokens): the
# (I + A)^-1 below is a product of NEUMANN_STEPS factors, exact for up to 2^NEUMANN_STEPS tokens.
DELTA_CHUNK = 64
NEUMANN_STEPS = 6


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)  # as transformers' (FLA's) l2norm


def gated_delta_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                      state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule (Yang et al., 2024, Gated DeltaNet) over T <= DELTA_CHUNK tokens in
    closed form: q, k [B, H, T, dk] (l2-normed, q scaled), v [B, H, T, dv], g (log decay) and beta
    [B, H, T], state S0 [B, H, dk, dv] -> out [B, H, T, dv], S_T.

    Per token: S_t = e^{g_t} S_{t-1} + k_t d_t^T with d_t = beta_t (v_t - e^{g_t} S_{t-1}^T k_t), and
    o_t = S_t^T q_t (transformers' torch_recurrent_gated_delta_rule). With G_t = g_1 + ... + g_t,
    d = (I + A)^{-1} U where A[t, i] = beta_t e^{G_t - G_i} (k_t . k_i) for i < t and U_t = beta_t (v_t
    - e^{G_t} S0^T k_t); A is strictly lower triangular, so (I + A)^{-1} = prod_j (I + (-A)^(2^j)):
    matrix products only, which every backend lowers (no loop over a dynamic T, no triangular solve)."""
    t = q.shape[2]
    pos = torch.arange(t)
    gamma = g.cumsum(dim=-1)  # [B, H, T]
    upto = pos[:, None] >= pos[None, :]  # [T, T]: i <= t
    decay = torch.exp((gamma[..., :, None] - gamma[..., None, :]).masked_fill(~upto, float("-inf")))  # [B, H, T, T]
    a = (beta[..., None] * decay * (k @ k.transpose(-1, -2))).masked_fill(pos[:, None] == pos[None, :], 0.0)
    d = beta[..., None] * (v - torch.exp(gamma)[..., None] * (k @ state))  # [B, H, T, dv]
    power = -a
    for _ in range(NEUMANN_STEPS):
        d = d + power @ d
        power = power @ power
    out = torch.exp(gamma)[..., None] * (q @ state) + ((q @ k.transpose(-1, -2)) * decay) @ d  # [B, H, T, dv]
    last = gamma[..., -1:]  # [B, H, 1]
    new_state = torch.exp(last)[..., None] * state + (k * torch.exp(last - gamma)[..., None]).transpose(-1, -2) @ d
    return out, new_state


class GatedDeltaNet(nn.Module):
    """Qwen3.5's linear-attention layer (modeling_qwen3_5_moe.py Qwen3_5MoeGatedDeltaNet): q, k, v
    from one projection through a causal depthwise convolution and SiLU; the gated delta rule with
    per-head decay g = -exp(A_log) softplus(a + dt_bias) and write strength beta = sigmoid(b); key
    heads shared by Hv / Hk value heads each; the output RMSNorm'd per head, times SiLU(z), then
    out_proj. State: the convolution's last K-1 inputs [B, 1, K-1, C] (the cache's k) and the
    recurrent S [B, Hv, dk, dv] (its v). Shapes: Hk, Hv heads, dk, dv widths, C = 2 Hk dk + Hv dv."""

    def __init__(self, config: CosmoeConfig, layer: int = 0) -> None:
        super().__init__()
        d, c = config.hidden_size, config.linear_conv_dim
        self.hk, self.hv = config.linear_num_key_heads, config.linear_num_value_heads
        self.dk, self.dv = config.linear_key_head_dim, config.linear_value_head_dim
        self.in_proj_qkv = nn.Linear(d, c, bias=False)
        self.in_proj_z = nn.Linear(d, self.hv * self.dv, bias=False)
        self.in_proj_b = nn.Linear(d, self.hv, bias=False)
        self.in_proj_a = nn.Linear(d, self.hv, bias=False)
        self.conv = _Kernel(c, config.linear_conv_kernel)
        self.A_log = nn.Parameter(torch.empty(self.hv))
        self.dt_bias = nn.Parameter(torch.empty(self.hv))
        self.norm = RMSNorm(self.dv, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.hv * self.dv, d, bias=False)

    def mix(self, x: torch.Tensor, conv_state: torch.Tensor, state: torch.Tensor,
            chunk: int | None = DELTA_CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] after the states -> (y [B, T, D], conv state, recurrent state). ``chunk``: the
        most tokens per closed-form step (None: all T in one, as a layer program of T <= 64 does)."""
        b, t, _ = x.shape
        mixed, conv_state = causal_conv(conv_state, self.in_proj_qkv(x), self.conv.weight, None)
        mixed = F.silu(mixed)  # [B, T, C]
        kd = self.hk * self.dk
        q, k, v = mixed[..., :kd], mixed[..., kd:2 * kd], mixed[..., 2 * kd:]
        rep = self.hv // self.hk

        def heads(z: torch.Tensor, n: int, width: int) -> torch.Tensor:  # [B, T, n*w] -> [B, Hv, T, w]
            z = z.reshape(b, t, n, width).transpose(1, 2)
            # Each key head serves `rep` consecutive value heads; a concatenation of slices, as the
            # layer programs' GQA (torch.export takes it with a dynamic T).
            return z if n == self.hv else torch.cat([z[:, h:h + 1] for h in range(n) for _ in range(rep)], dim=1)

        q = l2norm(heads(q, self.hk, self.dk)) * self.dk ** -0.5
        k, v = l2norm(heads(k, self.hk, self.dk)), heads(v, self.hv, self.dv)
        beta = torch.sigmoid(self.in_proj_b(x)).transpose(1, 2)  # [B, Hv, T]
        g = (-self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)).transpose(1, 2)
        if chunk is None:  # one step, with no Python loop over T (it would fix a dynamic T when exported)
            out, state = gated_delta_chunk(q, k, v, g, beta, state)  # [B, Hv, T, dv]
        else:
            outs = []
            for start in range(0, t, chunk):
                end = start + chunk
                out, state = gated_delta_chunk(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                               g[:, :, start:end], beta[:, :, start:end], state)
                outs.append(out)
            out = torch.cat(outs, dim=2)  # [B, Hv, T, dv]
        z = self.in_proj_z(x).reshape(b, t, self.hv, self.dv)
        gated = self.norm(out.transpose(1, 2)) * F.silu(z)  # [B, T, Hv, dv]
        y = self.out_proj(gated.reshape(b, t, self.hv * self.dv))
        return y, conv_state, state

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None, pos: int = 0) -> torch.Tensor:
        """As Attention.forward; the cache's k and v hold the two states (zeros before position 0)."""
        b, _, d = x.shape
        k = self.conv.weight.shape[-1]
        if cache is None or pos == 0:
            conv_state = x.new_zeros(b, 1, k - 1, self.conv.weight.shape[0])
            state = x.new_zeros(b, self.hv, self.dk, self.dv)
        else:
            conv_state, state = cache.k, cache.v
        y, conv_state, state = self.mix(x, conv_state, state)
        if cache is not None:
            cache.k.copy_(conv_state)
            cache.v.copy_(state)
        return y


class _Kernel(nn.Module):
    """A depthwise convolution's kernel [C, 1, K] (tensor name .conv.weight), applied by short_conv."""

    def __init__(self, channels: int, taps: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, taps))


# Token mixer (runtime_py.config.MIXER_KINDS) -> (the DecoderLayer attribute, which is the canonical
# tensor-name segment: layers.L.attn.* / layers.L.conv.*; the module). Sliding is Attention with a window.
MIXER_MODULES: dict[str, tuple[str, type[nn.Module]]] = {
    "full": ("attn", Attention), "sliding": ("attn", Attention), "mla": ("attn", LatentAttention),
    "conv": ("conv", ShortConv), "linear": ("linear", GatedDeltaNet)}


class LowRankLinear(nn.Module):
    """CoSMoEs Eq. 1: M (n x m) = L (n x r) @ R (r x m); y = x @ R.T @ L.T, two small matmuls."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.left = nn.Parameter(torch.empty(out_features, rank))
        self.right = nn.Parameter(torch.empty(rank, in_features))
        nn.init.normal_(self.left, std=0.02)
        nn.init.normal_(self.right, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.right), self.left)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's activation (modeling_gpt_oss.py GptOssExperts._apply_gate): gate clamped above and
    up both ways at ``limit``, then (up + 1) * gate * sigmoid(alpha * gate)."""
    alpha: float
    limit: float

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


# config.expert_act -> (config -> act(gate [N, F], up [N, F]) -> [N, F]).
EXPERT_ACTS: dict[str, Callable[[CosmoeConfig], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "silu": lambda config: swiglu,
    "clamped_swiglu": lambda config: ClampedSwiGLU(config.swiglu_alpha, config.swiglu_limit),
}


class Expert(nn.Module):
    """Gated FFN: down(act(gate(x), up(x))), SwiGLU by default; standard or weight-decomposed
    matrices; biases on all three where the family has them (gpt-oss)."""

    def __init__(self, dim: int, ffn: int, kind: str = "standard", rank: int = 0, bias: bool = False,
                 act: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = swiglu) -> None:
        super().__init__()
        if kind == "wd":
            self.gate, self.up, self.down = (LowRankLinear(dim, ffn, rank), LowRankLinear(dim, ffn, rank),
                                             LowRankLinear(ffn, dim, rank))
        else:
            self.gate, self.up, self.down = (nn.Linear(dim, ffn, bias=bias), nn.Linear(dim, ffn, bias=bias),
                                             nn.Linear(ffn, dim, bias=bias))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x), self.up(x)))


def routed_expert(config: CosmoeConfig) -> Expert:
    """One routed expert as the config describes it (kind, rank, biases, activation)."""
    return Expert(config.hidden_size, config.intermediate_size, config.expert_kind, config.rank,
                  bias=config.expert_bias, act=EXPERT_ACTS[config.expert_act](config))


# Something that returns the module of expert e: an nn.ModuleList, or the runtime's lazy store.
ExpertLookup = Callable[[int], Callable[[torch.Tensor], torch.Tensor]]
# Called with (layer, indices [N, K]) after every routing decision, for metrics.
RouteObserver = Callable[[int, torch.Tensor], None]
# Runs the routed experts of one layer: (layer, x [N, D], weights [N, K], indices [N, K]) -> y [N, D].
# The runtime plugs its budgeted expert store in here (runtime_py/runner.py).
Dispatch = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def dispatch_experts(lookup: ExpertLookup, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                     order: Sequence[int] | None = None) -> torch.Tensor:
    """y = sum_k weights[:, k] * expert_{idx[:, k]}(x): x [N, D], weights/idx [N, K] -> y [N, D].

    Only the selected experts run (and, through a lazy ``lookup``, load), each once for all its tokens.
    """
    y = torch.zeros_like(x)
    if x.shape[0] == 1:  # decode: one token, so no gather/scatter (index_add_ alone was ~0.2 ms a call)
        chosen = idx[0].tolist()  # [K]
        for e in (chosen if order is None else order):
            y += lookup(e)(x) * weights[0, chosen.index(e)]
        return y
    for e in (torch.unique(idx).tolist() if order is None else order):
        tok, slot = torch.where(idx == e)  # [n_e] x2
        out = lookup(e)(x[tok]) * weights[tok, slot, None]  # [n_e, D]
        y.index_add_(0, tok, out.to(y.dtype))
    return y


def guess_logits(router: torch.Tensor, norm: torch.Tensor, prev_norm: torch.Tensor, x_prev: torch.Tensor,
                 bias: torch.Tensor | None = None, prev_bias: torch.Tensor | None = None,
                 router_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Layer l's router logits guessed from layer l-1's MoE input x_prev [N, D] -> [N, E].

    mixtral-offloading's speculative guess: the hidden state changes little from one layer to the
    next, so layer l's router applied to layer l-1's hidden state predicts its choice. x_prev is
    RMSNorm_{l-1}(h) = w_{l-1} * h / rms(h), and RMSNorm is scale-invariant, so RMSNorm_l(h) is
    exactly w_l / w_{l-1} * x_prev: no need for the un-normed h. A LayerNorm (weight w, bias b)
    normalises the same (h - mean) / std, so LayerNorm_l(h) = w_l / w_{l-1} * (x_prev - b_{l-1}) + b_l.
    """
    ratio = norm.float() / torch.where(prev_norm.abs() < 1e-6, 1e-6, prev_norm.float())  # [D]
    x = x_prev.float() if prev_bias is None else x_prev.float() - prev_bias.float()
    x = x * ratio if bias is None else x * ratio + bias.float()
    logits = x @ router.float().T  # [N, E]
    return logits if router_bias is None else logits + router_bias.float()


class MoE(nn.Module):
    def __init__(self, config: CosmoeConfig, layer: int, experts: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        d = config.hidden_size
        self.layer, self.config = layer, config
        self.router = nn.Linear(d, config.num_experts, bias=config.router_bias)
        # The selection-only bias (runtime_py/routers.py), canonical name layers.L.moe.score_bias.
        self.score_bias = nn.Parameter(torch.zeros(config.num_experts)) if config.score_bias else None
        if experts is None:
            experts = [routed_expert(config) for _ in range(config.num_experts)]
        self.experts = nn.ModuleList(experts)
        self.expert_lookup: ExpertLookup = self.experts.__getitem__
        fs = config.shared_expert_intermediate_size
        self.shared = Expert(d, fs) if fs else None
        self.shared_gate = nn.Linear(d, 1, bias=False) if fs and config.shared_expert_gate else None
        self.observer: RouteObserver | None = None
        self.dispatch: Dispatch | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (y [N, D], router logits [N, E])."""
        logits = self.router(x)  # [N, E]
        weights, idx = route(logits, self.config, self.score_bias)  # [N, K] x2
        if self.observer is not None:
            self.observer(self.layer, idx)
        if self.dispatch is not None:
            y = self.dispatch(self.layer, x, weights, idx)  # [N, D]
        else:
            y = dispatch_experts(self.expert_lookup, x, weights, idx)  # [N, D]
        if self.shared is not None:
            y = y + shared_expert(self, x)
        return y, logits


def shared_expert(moe: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The shared expert's output for x [N, D] -> [N, D], sigmoid-gated where the family gates it."""
    out = moe.shared(x)
    return out if moe.shared_gate is None else torch.sigmoid(moe.shared_gate(x)) * out


class DenseMLP(Expert):
    """A "dense" layer's FFN (Qwen3-MoE ``mlp_only_layers``, ERNIE's and GLM's first layers): the
    SwiGLU of an expert, of width dense_intermediate_size, for every token, no router. Same
    interface as MoE, with no router logits."""

    def __init__(self, config: CosmoeConfig, layer: int, experts: Sequence[nn.Module] | None = None) -> None:
        super().__init__(config.hidden_size, config.dense_intermediate_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        """x [N, D] -> (y [N, D], None)."""
        return super().forward(x), None


# FFN kind (runtime_py.config.FFN_KINDS) -> (the DecoderLayer attribute, which is the canonical
# tensor-name segment: layers.L.moe.* / layers.L.mlp.*; the module).
FFN_MODULES: dict[str, tuple[str, type[nn.Module]]] = {
    "moe": ("moe", MoE),
    "dense": ("mlp", DenseMLP),
}


class DecoderLayer(nn.Module):
    def __init__(self, config: CosmoeConfig, layer: int, experts: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        self.attn_norm = decoder_norm(config)
        mixer_attr, mixer = MIXER_MODULES[config.mixer(layer)]
        setattr(self, mixer_attr, mixer(config, layer))
        self.mixer = mixer_attr  # the token mixer's attribute name ("attn" | "conv")
        self.ffn_norm = decoder_norm(config)
        attr, module = FFN_MODULES[config.ffn_kind(layer).name]
        setattr(self, attr, module(config, layer, experts))
        self.ffn = attr  # the FFN's attribute name ("moe" | "mlp")
        self.residual_multiplier = config.residual_multiplier

    @property
    def routed(self) -> MoE | None:
        """The layer's MoE, None for a layer without routed experts."""
        ffn = getattr(self, self.ffn)
        return ffn if isinstance(ffn, MoE) else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None, pos: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.residual_multiplier
        x = add_residual(x, getattr(self, self.mixer)(self.attn_norm(x), cos, sin, cache, pos), m)  # [B, T, D]
        b, t, d = x.shape
        y, logits = getattr(self, self.ffn)(self.ffn_norm(x).reshape(b * t, d))  # [N, D], [N, E] or None
        return add_residual(x, y.view(b, t, d), m), None if logits is None else logits.view(b, t, -1)


def add_residual(x: torch.Tensor, branch: torch.Tensor, multiplier: float) -> torch.Tensor:
    """x + branch, the branch scaled by Granite's residual_multiplier (skipped at 1, so the other
    families' graphs hold no extra op)."""
    return x + branch if multiplier == 1.0 else x + branch * multiplier


def scale_embeddings(x: torch.Tensor, config: CosmoeConfig) -> torch.Tensor:
    m = config.embedding_multiplier  # Granite
    return x if m == 1.0 else x * m


def scale_logits(logits: torch.Tensor, config: CosmoeConfig) -> torch.Tensor:
    s = config.logits_scaling  # Granite divides its logits
    return logits if s == 1.0 else logits / s


class CosmoeForCausalLM(nn.Module):
    """The whole model. ``with_experts=False`` builds it without routed experts: the runtime plugs
    its on-demand store in through each layer's ``MoE.expert_lookup``."""

    def __init__(self, config: CosmoeConfig, with_experts: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, None if with_experts else []) for i in range(config.num_hidden_layers))
        self.norm = decoder_norm(config)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias))
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None,
                return_router_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """ids [B, T] -> logits [B, T, V]; with a cache, continues from ``cache.pos``."""
        x, router_logits = self.hidden(ids, cache)  # [B, T, D]
        logits = self.head(x)  # [B, T, V]
        return (logits, router_logits) if return_router_logits else logits

    def hidden(self, ids: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ids [B, T] -> (the final normed hidden states [B, T, D], each MoE layer's router logits
        [B, T, E]): the forward without the head, for callers that apply it a few positions at a time
        (a window's logits are T x V: 0.8 GB in fp32 at 4,096 positions of a 50k vocabulary)."""
        t = ids.shape[1]
        pos = cache.pos if cache is not None else 0
        if cache is not None and pos + t > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {pos + t} requested")
        x = scale_embeddings(self.embed(ids), self.config)  # [B, T, D]
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(pos, pos + t), x.dtype,
                                rope_attention_factor(self.config))  # [T, Dh] x2
        router_logits = []
        for i, layer in enumerate(self.layers):
            x, logits = layer(x, cos, sin, cache.layers[i] if cache is not None else None, pos)
            if logits is not None:  # a dense layer routes nothing
                router_logits.append(logits)  # [B, T, E]
        if cache is not None:
            cache.pos = pos + t
        return self.norm(x), router_logits

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states [..., D] -> logits [..., V]."""
        return scale_logits(self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight),
                            self.config)
