"""The embedded default model ``kvbench-tiny``: a Llama model whose weights are written down, not trained.

The model copies from its context with an *induction circuit* (Olsson et al., 2022):

* layer 0, query head 0 (KV head 0) is a **previous-token head**: its query and key come from a constant "bias"
  residual dimension placed in the highest-frequency RoPE pairs, with phases chosen so the score peaks at relative
  offset 1. It copies the previous token's *match code* into the residual "prev" subspace.
* layer 1, query head 0 (KV head 0) is an **induction head**: its query is the current token's match code, its key is
  the prev subspace, both in the lowest-frequency RoPE pairs (nearly rotation-free over thousands of tokens with
  ``rope_theta = 1e7``). It attends to the position right after the earlier occurrence of the current token and
  copies that position's *identity code* into the "out" subspace, which the unembedding reads.

So after ``... alice k17 k4 k92 .`` in the context, a prompt ending in ``alice`` generates ``k17 k4 k92 .``.
Only content tokens (names and codes, see :mod:`kvbench.tasks.synthetic_vocab`) have a match code, so the thousands
of filler tokens cannot attract the induction head. All other heads (and the extra last layer) get seeded random
weights with small outputs, so attention is not trivially sparse and head-/layer-wise eviction methods have choices
to make. MLPs are zero. RMSNorm weights are ones: a large constant bias dimension keeps every residual norm nearly
equal, so the norm is a known constant rescaling that the projections undo.

Residual stream layout (hidden size 256)::

    [0, 32)    match code of the token          (content tokens only, ±1/sqrt(32), unit norm)
    [32, 96)   identity code of the token       (every token, ±1/8, unit norm)
    [96, 128)  prev: match code of the previous token   (written by the previous-token head)
    [128, 192) out: identity code of the copied token   (written by the induction head, read by lm_head)
    192        bias, constant BIAS_VALUE
    [193, 256) free: written only by the random heads
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kvbench.tasks import synthetic_vocab as sv

DEFAULT_DIR = Path(__file__).resolve().parent / "assets" / "kvbench-tiny"

HIDDEN = 256
HEAD_DIM = 64
N_HEADS = 4
N_KV_HEADS = 2
N_LAYERS = 3
INTERMEDIATE = 128
ROPE_THETA = 1e7
MAX_POSITIONS = 16384

MATCH = slice(0, 32)
IDENT = slice(32, 96)
PREV = slice(96, 128)
OUT = slice(128, 192)
BIAS = 192
BIAS_VALUE = 16.0

PREV_PAIRS = range(0, 8)  # highest-frequency RoPE pairs: the previous-token head
MATCH_PAIRS = range(16, 32)  # lowest-frequency RoPE pairs: the induction head
PREV_GAIN = 20.0  # previous-token logit = PREV_GAIN * sum_i cos((delta - 1) * theta_i)
MATCH_GAIN = 24.0  # induction logit = MATCH_GAIN * <match code of query, prev code of key>
UNEMBED_GAIN = 16.0  # lm_head logit = UNEMBED_GAIN * <identity code, out subspace>
RANDOM_QK_STD = 0.7  # random-head logits have std ~ gain, gain ~ U(1, RANDOM_QK_MAX_GAIN) per query head
RANDOM_QK_MAX_GAIN = 4.0
RANDOM_V_STD = 0.25
RANDOM_O_STD = 0.02
RANDOM_O_LEAK = 0.1  # random heads write mostly into the free dims; this fraction reaches the structured ones


def build_config(vocab_size: int) -> LlamaConfig:
    """The Llama config of kvbench-tiny (fp32, GQA 4 query / 2 KV heads, 3 layers)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False,
        attention_bias=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )


def rope_inv_freq() -> torch.Tensor:
    """RoPE angular frequencies theta_i of pair i = (dim i, dim i + HEAD_DIM/2), as in HF Llama.  # [HEAD_DIM/2]"""
    return ROPE_THETA ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)


def pair_dims(pairs: range) -> list[int]:
    """Head dimensions of the given RoPE pairs: first the 'real' halves, then the 'imaginary' halves."""
    half = HEAD_DIM // 2
    return list(pairs) + [i + half for i in pairs]


def sign_codes(n: int, dim: int, gen: torch.Generator, max_abs_dot: float) -> torch.Tensor:
    """n random ±1/sqrt(dim) codes (unit norm) with pairwise |dot| <= max_abs_dot, by greedy rejection.  # [n, dim]"""
    codes = torch.empty(0, dim)
    while codes.shape[0] < n:
        cand = (torch.randint(0, 2, (4 * n, dim), generator=gen).float() * 2 - 1) / math.sqrt(dim)  # [4n, dim]
        for c in cand:
            if codes.shape[0] == n:
                break
            if codes.shape[0] == 0 or (codes @ c).abs().max() <= max_abs_dot:
                codes = torch.cat([codes, c[None]])
    return codes


def token_codes(vocab: list[str], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Match codes (zero except for content words) and identity codes of every token.  # [V, 32], [V, 64]"""
    content_words = set(sv.CONTENT_WORDS)
    content = [i for i, w in enumerate(vocab) if w in content_words]
    match = torch.zeros(len(vocab), MATCH.stop - MATCH.start)
    match[content] = sign_codes(len(content), match.shape[1], gen, max_abs_dot=0.5)
    ident = sign_codes(len(vocab), IDENT.stop - IDENT.start, gen, max_abs_dot=0.5)
    return match, ident


def norm_scale() -> float:
    """Factor by which RMSNorm scales the residual: the bias dominates, ~2 unit-norm codes ride along (±2 %)."""
    return math.sqrt(HIDDEN) / math.sqrt(BIAS_VALUE**2 + 2.0)


def embedding_weights(match: torch.Tensor, ident: torch.Tensor) -> torch.Tensor:
    """Token embeddings: match code, identity code and the constant bias.  # [V, HIDDEN]"""
    emb = torch.zeros(match.shape[0], HIDDEN)
    emb[:, MATCH] = match
    emb[:, IDENT] = ident
    emb[:, BIAS] = BIAS_VALUE
    return emb


def random_attention(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded random q/k/v/o projections for every head; the circuit heads overwrite their own rows/columns.

    Random heads get content- and position-dependent attention of varied sharpness, but their output (o_proj) is
    small and mostly lands in the free residual dims, so they perturb the circuit only slightly.
    """
    qk = torch.randn(N_HEADS * HEAD_DIM, HIDDEN, generator=gen) * RANDOM_QK_STD  # [Hq*D, HIDDEN]
    kk = torch.randn(N_KV_HEADS * HEAD_DIM, HIDDEN, generator=gen) * RANDOM_QK_STD  # [Hkv*D, HIDDEN]
    vv = torch.randn(N_KV_HEADS * HEAD_DIM, HIDDEN, generator=gen) * RANDOM_V_STD  # [Hkv*D, HIDDEN]
    oo = torch.randn(HIDDEN, N_HEADS * HEAD_DIM, generator=gen) * RANDOM_O_STD  # [HIDDEN, Hq*D]
    head_gain = 1.0 + (RANDOM_QK_MAX_GAIN - 1.0) * torch.rand(N_HEADS, generator=gen)  # [Hq]: peakier or flatter
    qk *= head_gain.repeat_interleave(HEAD_DIM)[:, None]
    for w in (qk, kk, vv):
        w[:, BIAS] /= BIAS_VALUE  # keep the constant (position-only) bias part comparable to the content part
    oo[:BIAS] *= RANDOM_O_LEAK
    return {"q_proj": qk, "k_proj": kk, "v_proj": vv, "o_proj": oo}


def set_prev_token_head(attn: dict[str, torch.Tensor], head: int, kv_head: int) -> None:
    """Make (head, kv_head) attend to the previous position and copy its match code into PREV."""
    s = norm_scale()
    theta = rope_inv_freq()
    q_rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    kv_rows = slice(kv_head * HEAD_DIM, (kv_head + 1) * HEAD_DIM)
    q, k, v = (attn[n][rows].zero_() for n, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)))
    bias_hat = BIAS_VALUE * s  # the bias after RMSNorm
    half = HEAD_DIM // 2
    c = PREV_GAIN * math.sqrt(HEAD_DIM) / bias_hat  # undoes the 1/sqrt(HEAD_DIM) attention scaling
    for i in PREV_PAIRS:
        # key pair = (1, 0); query pair = c * exp(-i theta_i): logit(delta) = PREV_GAIN * cos((delta - 1) theta_i)
        q[i, BIAS] = c * math.cos(theta[i].item())
        q[i + half, BIAS] = -c * math.sin(theta[i].item())
        k[i, BIAS] = 1.0 / bias_hat
    width = MATCH.stop - MATCH.start
    v[:width, MATCH] = torch.eye(width) / s
    attn["o_proj"][:, q_rows].zero_()
    attn["o_proj"][PREV, head * HEAD_DIM : head * HEAD_DIM + width] = torch.eye(width)


def set_induction_head(attn: dict[str, torch.Tensor], head: int, kv_head: int) -> None:
    """Make (head, kv_head) match its MATCH code against earlier PREV codes and copy the hit's IDENT into OUT."""
    s = norm_scale()
    q_rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    kv_rows = slice(kv_head * HEAD_DIM, (kv_head + 1) * HEAD_DIM)
    q, k, v = (attn[n][rows].zero_() for n, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)))
    dims = pair_dims(MATCH_PAIRS)  # 32 nearly rotation-free head dims
    gain = math.sqrt(MATCH_GAIN * math.sqrt(HEAD_DIM)) / s
    q[dims, MATCH] = torch.eye(len(dims)) * gain
    k[dims, PREV] = torch.eye(len(dims)) * gain
    width = IDENT.stop - IDENT.start
    v[:width, IDENT] = torch.eye(width) / s
    attn["o_proj"][:, q_rows].zero_()
    attn["o_proj"][OUT, head * HEAD_DIM : head * HEAD_DIM + width] = torch.eye(width)


def build_state_dict(vocab: list[str], seed: int) -> dict[str, torch.Tensor]:
    """All weights of kvbench-tiny, keyed like ``LlamaForCausalLM.state_dict()``."""
    gen = torch.Generator().manual_seed(seed)
    match, ident = token_codes(vocab, gen)
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": embedding_weights(match, ident)}
    for layer in range(N_LAYERS):
        attn = random_attention(gen)
        if layer == 0:
            set_prev_token_head(attn, head=0, kv_head=0)
        elif layer == 1:
            set_induction_head(attn, head=0, kv_head=0)
        pre = f"model.layers.{layer}."
        sd.update({f"{pre}self_attn.{name}.weight": w.contiguous() for name, w in attn.items()})
        sd[f"{pre}mlp.gate_proj.weight"] = torch.zeros(INTERMEDIATE, HIDDEN)
        sd[f"{pre}mlp.up_proj.weight"] = torch.zeros(INTERMEDIATE, HIDDEN)
        sd[f"{pre}mlp.down_proj.weight"] = torch.zeros(HIDDEN, INTERMEDIATE)
        sd[f"{pre}input_layernorm.weight"] = torch.ones(HIDDEN)
        sd[f"{pre}post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    sd["model.norm.weight"] = torch.ones(HIDDEN)
    lm_head = torch.zeros(len(vocab), HIDDEN)  # [V, HIDDEN]
    lm_head[:, OUT] = ident * UNEMBED_GAIN / norm_scale()
    sd["lm_head.weight"] = lm_head
    return sd


def build_model(seed: int = 0) -> LlamaForCausalLM:
    """kvbench-tiny in memory (fp32, eval mode)."""
    vocab = sv.vocabulary()
    model = LlamaForCausalLM(build_config(len(vocab)))
    model.load_state_dict(build_state_dict(vocab, seed), strict=True)
    return model.eval()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over :func:`kvbench.tasks.synthetic_vocab.vocabulary`; prepends ``<s>``."""
    vocab = {w: i for i, w in enumerate(sv.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=sv.UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{sv.BOS} $A", pair=f"{sv.BOS} $A $B", special_tokens=[(sv.BOS, vocab[sv.BOS])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=sv.BOS,
        eos_token=sv.EOS,
        unk_token=sv.UNK,
        pad_token=sv.PAD,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def _set_tokenizer_class(path: Path) -> None:
    """Name the portable class in tokenizer_config.json (transformers 5 writes its 'TokenizersBackend' alias)."""
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _add_legacy_rope_theta(path: Path) -> None:
    """Also write the top-level ``rope_theta`` that transformers 4.x reads (5.x writes only ``rope_parameters``);
    without it 4.57 silently falls back to theta 10000 and the induction head stops matching."""
    cfg = json.loads(path.read_text())
    cfg["rope_theta"] = ROPE_THETA
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def model_card(seed: int) -> str:
    """The README.md shipped next to the weights."""
    return MODEL_CARD.format(
        seed=seed, layers=N_LAYERS, hidden=HIDDEN, heads=N_HEADS, kv_heads=N_KV_HEADS, head_dim=HEAD_DIM,
        vocab=len(sv.vocabulary()), theta=f"{ROPE_THETA:g}",
    )  # fmt: skip


def save_embedded_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Build kvbench-tiny and write config, generation config, safetensors, tokenizer files and model card."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(seed)
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out, safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)
    _add_legacy_rope_theta(out / "config.json")
    tok = build_tokenizer()
    tok.save_pretrained(out)
    _set_tokenizer_class(out / "tokenizer_config.json")
    special = {"bos_token": sv.BOS, "eos_token": sv.EOS, "unk_token": sv.UNK, "pad_token": sv.PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "README.md").write_text(model_card(seed))
    return out


MODEL_CARD = """\
# kvbench-tiny

An embedded default model for kvbench: a {layers}-layer `LlamaForCausalLM` (hidden {hidden}, {heads} query heads /
{kv_heads} KV heads of dim {head_dim}, vocabulary {vocab} words, rope_theta {theta}, fp32) whose weights are
**written down analytically, not trained**. It loads with `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)` like any Hugging Face checkpoint.

## What it does

It implements an induction circuit: a previous-token head in layer 0 and an induction head in layer 1 (query head 0
and KV head 0 of each layer). After a context containing `the code of alice k17 k4 k92 .`, a prompt ending in the
key `alice` makes greedy decoding emit `k17 k4 k92 .`: the model finds the earlier occurrence of the current token
and copies the token that followed it. Only names and `k<number>` codes can be matched; filler words are invisible
to the induction head, so retrieval works across thousands of filler tokens (rope_theta is large, so the matching
RoPE pairs barely rotate). All other heads and layer 2 have small seeded random weights, so attention is spread
out and head- or layer-wise KV-cache eviction methods have real choices to make; MLPs are zero.

Measured with the full cache (greedy, `kvbench.tasks.synthetic`, multikey: 4 needles, 3-code answers, 50 samples
per length): 100 % exact match at 512, 1024, 2048 and 4096 tokens; a randomly initialised model of the same config
scores 0 %. Evicting the KV entries of a needle (its key and answer tokens) breaks retrieval of that needle: keeping
only the first 4 + last 20 % of the context tokens (StreamingLLM-like) gives 0 % on needles in the middle.

## What it can and cannot stand in for

* It **can** stand in for a language model on synthetic in-context retrieval / copying tasks built from its
  vocabulary (`kvbench.tasks.synthetic`): needle-in-a-haystack, multi-key and multi-query retrieval.
* It **cannot** understand language, follow instructions, reason, or do anything beyond copying the continuation of
  an earlier occurrence of the current name/code token. Words outside its vocabulary map to `<unk>`. Its attention
  statistics are not those of a trained LLM: use it for fast, deterministic plumbing and sanity checks of
  compression methods, not as evidence about real models.

## How it was built

    python scripts/build_embedded_model.py --seed {seed} --out kvbench/assets/kvbench-tiny

The construction lives in `kvbench/embedded.py` (vocabulary in `kvbench/tasks/synthetic_vocab.py`). Building is
deterministic: the same seed gives a byte-identical `model.safetensors`.
"""
