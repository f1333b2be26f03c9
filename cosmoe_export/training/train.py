"""Train a small CoSMoE from plain text on CPU: tokenizer, model, loop, deterministic save.

Library code for ``recipes/train_tiny.py``. One recipe, three variants that differ only in the
expert setup (CoSMoEs Table 3): ``moe`` standard experts + load balancing, ``bles`` the same plus
the Block-wise Expert Selection loss (CoSMoEs Eq. 2-7), ``wd`` weight-decomposed experts
(CoSMoEs Eq. 1) parameter-aligned with ``moe``.

Determinism: one seed drives the init and the batch sampler through their own generators, the
tokenizer trainer is deterministic for a given corpus, and the saved files contain no clocks or
paths; with ``torch.set_num_threads(1)`` a rebuild on the same machine gives the same bytes.

Shape legend: B batch, T context tokens, V vocabulary, E experts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cosmoe_export.training.losses import bles_loss, linear_ramp, load_balancing_loss, router_z_loss
from runtime_py import format as fmt
from runtime_py.config import CosmoeConfig
from runtime_py.model import CosmoeForCausalLM, LowRankLinear

VARIANTS = ("moe", "bles", "wd")
EOT = "<|endoftext|>"  # the only special token: document separator, used as bos and eos (GPT-2 style)
WEIGHTS_NAME = "model.safetensors"


# ---- tokenizer -----------------------------------------------------------------------------------
def train_tokenizer(corpus: Sequence[Path], vocab_size: int) -> tokenizers.Tokenizer:  # noqa: F821
    """Byte-level BPE (GPT-2 / Llama-3 style): every byte has a token, so any text encodes and
    ``decode(encode(s)) == s``. The end-of-text token gets id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets on the raw bytes; the processor adds no bos/eos by itself.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in corpus], trainer)
    return tok


def encode_corpus(tok, corpus: Sequence[Path]) -> torch.Tensor:
    """All files as one id stream [N], files separated by the end-of-text token."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for p in corpus:
        text = Path(p).read_text(encoding="utf-8")
        # Encode in paragraph batches: one huge string would be a single pre-tokenizer pass with
        # no benefit, and paragraphs never split a BPE word.
        parts = text.split("\n\n")
        for enc in tok.encode_batch([s + "\n\n" for s in parts[:-1]] + parts[-1:]):
            ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.int64)


# ---- model presets ---------------------------------------------------------------------------------
def tiny_config(variant: str, *, vocab_size: int, bos_token_id: int, eos_token_id: int,
                context: int = 256) -> CosmoeConfig:
    """The tiny fixture models: hidden 128, 4 layers, 4 heads (2 kv), 8 experts top-2 in every layer.

    ``wd`` is parameter-aligned with ``moe``. A standard SwiGLU expert has gate, up [F, D] and
    down [D, F]: 3*D*F = 3*128*256 = 98,304 parameters. A WD expert stores each matrix n x m as
    L (n x r) + R (r x m) = r*(n + m) (CoSMoEs Eq. 1), so 3*r*(D + F_wd); with the paper's rank
    r = D/2 = 64: 3*64*(128 + F_wd) = 98,304  ->  F_wd = 384, exactly equal. The FLOPs per
    token are equal too (r*(n+m) multiply-adds per matrix).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    wd = variant == "wd"
    return CosmoeConfig(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=384 if wd else 256, num_experts=8, num_experts_per_tok=2,
        expert_kind="wd" if wd else "standard", wd_rank=64 if wd else None,
        rope_theta=10000.0,  # a 256-token context needs no long-range RoPE
        max_position_embeddings=context, tie_word_embeddings=False,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id)


# ---- training ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    variant: str = "moe"
    seed: int = 0
    steps: int = 1500
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lb_weight: float = 0.01  # sequence-level load balancing, all variants
    bles_weight: float = 0.0  # BlES (CoSMoEs Eq. 7); only the bles variant may set it
    bles_tau: float = 1.0  # Eq. 2's softmax temperature, W = softmax(tau R), in the BlES loss only
    # Levers added after the fixtures were trained. Their defaults leave the loss, and so the
    # weights, bit-for-bit as before, and train_config_dict leaves them out of recipe.json.
    z_weight: float = 0.0  # router z-loss (ST-MoE), all variants
    bles_warmup: int = 0  # BlES weight ramps linearly from 0 to bles_weight over this many steps
    lb_weight_end: float | None = None  # None: constant lb_weight; else linear lb_weight -> this over the run

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {self.variant!r}")
        if self.bles_weight and self.variant != "bles":
            raise ValueError(f"--bles-weight applies to the bles variant only, not {self.variant!r}")
        if self.bles_warmup and not self.bles_weight:
            raise ValueError("--bles-warmup needs a BlES weight (bles variant)")
        if self.bles_tau <= 0 or self.z_weight < 0 or self.bles_warmup < 0 or (self.lb_weight_end or 0) < 0:
            raise ValueError("bles_tau must be > 0; z_weight, bles_warmup, lb_weight_end >= 0")


# The later levers and the defaults under which they change nothing (see TrainConfig).
LATER_LEVERS = {"z_weight": 0.0, "bles_warmup": 0, "lb_weight_end": None}


@dataclass
class TrainResult:
    model: CosmoeForCausalLM
    log: list[dict]  # every log_every steps: step, loss terms (deterministic; no timings)
    seconds: float


def init_weights(model: CosmoeForCausalLM, seed: int) -> None:
    """GPT-2 init from one generator, parameters in name order, so the init is a function of the
    seed only. Output projections (attention o, expert down) are scaled by 1/sqrt(2L) so the
    residual stream does not grow with depth.

    WD matrices M = L @ R get std s per factor with s^2 * sqrt(r) = 0.02: the product then has the
    same std as a standard matrix (sum of r products of independent N(0, s^2) terms).
    """
    g = torch.Generator().manual_seed(seed)
    n_layers = model.config.num_hidden_layers
    lowrank = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            std = 0.02
            owner = name.rsplit(".", 1)[0]
            if owner in lowrank:
                std = math.sqrt(0.02 / math.sqrt(model.config.rank))
            if ".attn.o." in name or ".down." in name:
                # A WD matrix is the product of two factors: each takes the square root of the scale.
                scale = (2 * n_layers) ** -0.5
                std *= math.sqrt(scale) if owner in lowrank else scale
            p.copy_(torch.randn(p.shape, generator=g) * std)


def batches(ids: torch.Tensor, *, batch_size: int, context: int, seed: int):
    """Endless random windows [B, T+1] from the id stream, from a generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed + 1)  # not the init's stream
    n = ids.numel() - context - 1
    while True:
        starts = torch.randint(0, n, (batch_size,), generator=g)
        yield torch.stack([ids[s:s + context + 1] for s in starts.tolist()])  # [B, T+1]


def lb_weight_at(step: int, tc: TrainConfig) -> float:
    """The load-balancing weight at ``step``: constant, or linear from lb_weight at step 0 to
    lb_weight_end at the last step (e.g. strong balance while the routers form, or balance that
    grows while BlES pushes the routers towards the same experts)."""
    if tc.lb_weight_end is None:
        return tc.lb_weight  # the recipe's constant, untouched
    return linear_ramp(step, tc.lb_weight, tc.lb_weight_end, tc.steps - 1)


def bles_weight_at(step: int, tc: TrainConfig) -> float:
    """The BlES weight at ``step``: 0 -> bles_weight linearly over bles_warmup steps, so the routers
    first learn which experts suit which tokens before being asked to keep them; with no warm-up
    the ramp is exactly 1.0 and the weight is bles_weight itself."""
    return tc.bles_weight * linear_ramp(step, 0.0, 1.0, tc.bles_warmup)


def losses(model: CosmoeForCausalLM, window: torch.Tensor, tc: TrainConfig,
           step: int = 0) -> dict[str, torch.Tensor]:
    """window [B, T+1] -> loss terms at training step ``step``; the router terms are means over layers."""
    top_k = model.config.num_experts_per_tok
    logits, router = model(window[:, :-1], return_router_logits=True)  # [B, T, V], L x [B, T, E]
    ce = F.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten())
    lb = torch.stack([load_balancing_loss(r, top_k) for r in router]).mean()
    out = {"ce": ce, "lb": lb}
    total = ce + lb_weight_at(step, tc) * lb
    if tc.bles_weight:
        bl = torch.stack([bles_loss(r, top_k, tc.bles_tau) for r in router]).mean()
        out["bles"] = bl
        total = total + bles_weight_at(step, tc) * bl
    if tc.z_weight:  # skipped at 0: no extra graph, and no "z" key in the fixtures' logs
        z = torch.stack([router_z_loss(r) for r in router]).mean()
        out["z"] = z
        total = total + tc.z_weight * z
    out["total"] = total
    return out


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    frac = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(config: CosmoeConfig, ids: torch.Tensor, tc: TrainConfig, *, log_every: int = 50,
          on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """AdamW with warmup and cosine decay; weight decay on matrices only (not norms, embeddings)."""
    model = CosmoeForCausalLM(config)
    init_weights(model, tc.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "embed.weight"]
    keep = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n != "embed.weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": keep, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95), eps=1e-8)
    data = batches(ids, batch_size=tc.batch_size, context=config.max_position_embeddings, seed=tc.seed)
    log: list[dict] = []
    sums: dict[str, float] = {}
    t0 = time.perf_counter()
    model.train()
    for step in range(tc.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        terms = losses(model, next(data), tc, step)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        if (step + 1) % log_every == 0 or step + 1 == tc.steps:
            n = (step % log_every) + 1
            entry = {"step": step + 1, **{k: round(v / n, 4) for k, v in sums.items()}}
            log.append(entry)
            sums = {}
            if on_log is not None:
                on_log({**entry, "elapsed_s": round(time.perf_counter() - t0, 1)})
    return TrainResult(model.eval(), log, time.perf_counter() - t0)


# ---- saving ----------------------------------------------------------------------------------------
def save_checkpoint(out: Path, model: CosmoeForCausalLM, tok, *, recipe: dict | None = None) -> None:
    """An HF-style directory: config.json (CosmoeConfig.to_dict()), model.safetensors (bf16,
    canonical names), tokenizer.json (+ tokenizer_config.json so transformers' fast tokenizer
    loads it), and recipe.json (how it was trained). No timestamps, no paths: same bytes on rebuild."""
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sorted(model.state_dict().items())}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    tok.save(str(out / fmt.TOKENIZER_FILE))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
                  "model_max_length": config.max_position_embeddings, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    if recipe is not None:
        (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")


def train_config_dict(tc: TrainConfig) -> dict:
    """The config for recipe.json; the later levers only where set, so a rebuild of a committed
    fixture writes the same recipe.json as before they existed."""
    d = dataclasses.asdict(tc)
    return {k: v for k, v in d.items() if k not in LATER_LEVERS or v != LATER_LEVERS[k]}
