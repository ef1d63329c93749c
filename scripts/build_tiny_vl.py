"""Build the embedded vision-language model kvbench-tiny-vl: a Qwen2-VL whose weights are written down, not trained.

    python scripts/build_tiny_vl.py --seed 0 --out kvbench/assets/kvbench-tiny-vl [--check]

Writes config.json, generation_config.json, model.safetensors, the word-level tokenizer, the (PIL) image
processor's preprocessor_config.json and a model card. Deterministic: the same seed gives the same weights.
``--check`` runs plain transformers ``generate()`` (full cache) on ``synth_gui`` and ``synth_video`` and prints the
accuracy. How it works (see the model card written below):

* **Vision tower** (patch 14, temporal patch 2, 2 x 2 merge, one block that adds a constant): the patch embedding
  reads the 49 2 x 2 sub-blocks of a patch (pixels in [0, 1]), LayerNorm is made predictable by a large constant
  pair, and the merger maps the lit sub-block of each of the four patches of a merged token to codes in the text
  model's residual stream: the widget's **label** key code (top-left patch), the **changed** key code (top-right),
  the **value** (bottom-left), plus a constant and an "image token" flag.
* **Language model** (2 layers, hidden 256, 4 query / 2 KV heads of 64, M-RoPE sections [8, 12, 12], theta 1e9):
  layer 0, query head 0 is a **previous-token head** (fastest temporal M-RoPE pairs) that copies the previous
  word's query code; layer 1, query head 0 is a **retrieval head**: the query code of the current or the previous
  word (a label, ``changed`` / ``flashed``) is matched against the image tokens' key codes in rotation-free head
  dims, and a **recency** term in a slow temporal M-RoPE pair (key: the image flag; query: a phase chosen so
  ``cos`` falls over the prompt) makes the newest screenshot win; the hit's value goes to an output subspace that
  ``lm_head`` reads. A question's last word makes the model say ``is``; at ``is`` the previous-token code queries
  again, over the (possibly compressed) cache, and the value follows; a value word makes the next token ``.``.
  Every other head has small seeded random weights; MLPs are 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbench.tasks import synth_gui as sg  # noqa: E402

OUT_DIR = Path(__file__).resolve().parents[1] / "kvbench" / "assets" / "kvbench-tiny-vl"
HIDDEN, HEADS, KV_HEADS, LAYERS, INTER = 256, 4, 2, 2, 8
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA, MROPE = 1e9, [8, 12, 12]
EMBED, MERGE, PATCH, TPATCH = 64, 2, 14, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>", "<unk>"]

KEY, QRY, PREVQ = slice(0, 40), slice(40, 80), slice(80, 120)
VAL, OUT = slice(120, 152), slice(152, 184)
BIAS, IMG, DOT, ASK = 184, 185, 186, 187
FREE = slice(188, HIDDEN)
BIAS_VALUE = 16.0
CONST = 8.0  # the vision block's constant pair (+CONST, -CONST) that fixes LayerNorm's scale
MATCH_GAIN = 40.0  # retrieval logit for a matching key code
RECENCY_GAIN = 40.0  # recency logit amplitude: cos(phase + theta * distance)
RECENCY_PAIR = MROPE[0] - 2  # a slow temporal M-RoPE pair (theta_6 = 0.0205 rad per position)
CODE_DIMS = list(range(12, HEAD_DIM // 2)) + list(range(12 + HEAD_DIM // 2, HEAD_DIM))  # rotation-free head dims
RECENCY_SPAN = (40, 150)  # distances (t positions) from the question to the screenshots the phase is centred on
PREV_PAIRS = range(0, 4)  # the fastest temporal M-RoPE pairs: the previous-token head
PREV_GAIN = 24.0  # previous-token logit = PREV_GAIN * sum_i cos((distance - 1) * theta_i)
UNEMBED_GAIN, DOT_GAIN, ASK_GAIN = 16.0, 24.0, 32.0
RANDOM_QK_STD, RANDOM_V_STD, RANDOM_O_STD, RANDOM_O_LEAK = 0.5, 0.25, 0.02, 0.05


def vocabulary() -> list[str]:
    colours = [c for c in sg.COLOURS if c not in sg.VALUES]
    words = SPECIALS + sg.LABELS + sg.VALUES + sg.LETTERS + colours + sg.WORDS + sg.INSTRUCTION_WORDS
    if len(set(words)) != len(words):
        raise ValueError("the tiny VLM's words must be distinct")
    return words


def key_codes(gen: torch.Generator) -> torch.Tensor:
    """Label codes (random signs in all but the last key dim) and the changed code (the last dim, orthogonal to
    every label, so a marked widget matches ``changed`` exactly as strongly on every screen).  # [50, 40]"""
    dim = KEY.stop - KEY.start
    codes = torch.zeros(sg.CHANGED_CODE + 1, dim)
    codes[: sg.CHANGED_CODE, : dim - 1] = sign_codes(sg.CHANGED_CODE, dim - 1, gen)
    codes[sg.CHANGED_CODE, dim - 1] = 1.0
    return codes


def sign_codes(n: int, dim: int, gen: torch.Generator, max_abs_dot: float = 0.4) -> torch.Tensor:
    """n random unit ±1/sqrt(dim) codes with pairwise |dot| <= max_abs_dot (greedy rejection).  # [n, dim]"""
    codes = torch.empty(0, dim)
    while codes.shape[0] < n:
        c = (torch.randint(0, 2, (dim,), generator=gen).float() * 2 - 1) / math.sqrt(dim)
        if codes.shape[0] == 0 or (codes @ c).abs().max() <= max_abs_dot:
            codes = torch.cat([codes, c[None]])
    return codes


def theta(i: int) -> float:
    return ROPE_THETA ** (-2 * i / HEAD_DIM)


def norm_scale() -> float:
    """RMSNorm's factor on the residual: the bias dominates, ~3 unit codes ride along."""
    return math.sqrt(HIDDEN) / math.sqrt(BIAS_VALUE**2 + 3.0)


def ln_levels() -> tuple[float, float]:
    """LayerNorm output of a lit and an unlit sub-block in a patch with exactly one lit sub-block."""
    mu = 1 / EMBED
    var = ((1 - mu) ** 2 + (EMBED - 3) * mu**2 + (CONST - mu) ** 2 + (CONST + mu) ** 2) / EMBED
    return (1 - mu) / math.sqrt(var + 1e-6), -mu / math.sqrt(var + 1e-6)


# ------------------------------------------------------------------ vision tower
def vision_weights(codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Patch embedding, the constant-adding block and the merger (names relative to ``model.visual``)."""
    pe = torch.zeros(EMBED, 3, TPATCH, PATCH, PATCH)
    side = PATCH // sg.SUB
    for j in range(sg.POSITIONS):
        r, c = divmod(j, side)
        pe[j, :, :, sg.SUB * r: sg.SUB * (r + 1), sg.SUB * c: sg.SUB * (c + 1)] = 1 / (3 * TPATCH * sg.SUB**2)
    w: dict[str, torch.Tensor] = {"patch_embed.proj.weight": pe}
    fc2_bias = torch.zeros(EMBED)
    fc2_bias[EMBED - 2], fc2_bias[EMBED - 1] = CONST, -CONST
    w["blocks.0.mlp.fc2.bias"] = fc2_bias
    lit, unlit = ln_levels()
    width = 4 * EMBED
    w2, b2 = torch.zeros(HIDDEN, width), torch.zeros(HIDDEN)
    tl, tr, bl = 0, EMBED, 2 * EMBED
    for j in range(sg.POSITIONS):  # label one-hot -> key code, the unlit level cancelled by the bias
        w2[KEY, tl + j] = codes[j] / (lit - unlit)
        b2[KEY] -= codes[j] * unlit / (lit - unlit)
    w2[KEY, tr] = codes[sg.CHANGED_CODE] / lit  # changed marker (sub-block 0 of the top-right patch)
    n_val = VAL.stop - VAL.start
    for v in range(n_val):
        w2[VAL.start + v, bl + v] = 1 / (lit - unlit)
        b2[VAL.start + v] -= unlit / (lit - unlit)
    b2[BIAS], b2[IMG] = BIAS_VALUE, 1.0
    offset = 10.0  # GELU(x + 10) = x + 10 to 1e-20 for |x| < 1: the merger's hidden layer passes values linearly
    # the bias cancelling the offset is summed in float64 and rounded once: a float32 BLAS matvec rounds differently
    # on different CPUs and thread counts, and the asset must be rebuilt bit-identically on any machine
    w["merger.mlp.0.weight"], w["merger.mlp.0.bias"] = torch.eye(width), torch.full((width,), offset)
    w["merger.mlp.2.weight"], w["merger.mlp.2.bias"] = w2, b2 - (offset * w2.double().sum(dim=1)).float()
    return w


# ------------------------------------------------------------------ language model
def random_attention(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded random projections (the structured head overwrites its rows); outputs small, mostly in FREE."""
    q = torch.randn(HEADS * HEAD_DIM, HIDDEN, generator=gen) * RANDOM_QK_STD
    k = torch.randn(KV_HEADS * HEAD_DIM, HIDDEN, generator=gen) * RANDOM_QK_STD
    v = torch.randn(KV_HEADS * HEAD_DIM, HIDDEN, generator=gen) * RANDOM_V_STD
    o = torch.randn(HIDDEN, HEADS * HEAD_DIM, generator=gen) * RANDOM_O_STD
    gain = 1.0 + 3.0 * torch.rand(HEADS, generator=gen)
    q *= gain.repeat_interleave(HEAD_DIM)[:, None]
    for m in (q, k, v):
        m[:, BIAS] /= BIAS_VALUE
    o[: FREE.start] *= RANDOM_O_LEAK
    return {"q_proj": q, "k_proj": k, "v_proj": v, "o_proj": o}


def recency_phase() -> float:
    """Phase so that ``cos(phase + theta * d)`` falls steadily over the distances in RECENCY_SPAN."""
    th = theta(RECENCY_PAIR)
    return math.pi / 2 - th * sum(RECENCY_SPAN) / 2


def set_prev_token_head(attn: dict[str, torch.Tensor]) -> None:
    """Query head 0 / KV head 0 of layer 0: attends to the previous position and copies its query code to PREVQ."""
    s = norm_scale()
    q, k, v = attn["q_proj"][:HEAD_DIM].zero_(), attn["k_proj"][:HEAD_DIM].zero_(), attn["v_proj"][:HEAD_DIM].zero_()
    bias_hat, half = BIAS_VALUE * s, HEAD_DIM // 2
    c = PREV_GAIN * math.sqrt(HEAD_DIM) / bias_hat
    for i in PREV_PAIRS:  # key pair (1, 0), query pair c * exp(-i theta_i): logit = PREV_GAIN cos((d - 1) theta_i)
        q[i, BIAS], q[i + half, BIAS] = c * math.cos(theta(i)), -c * math.sin(theta(i))
        k[i, BIAS] = 1.0 / bias_hat
    width = QRY.stop - QRY.start
    v[:width, QRY] = torch.eye(width) / s
    attn["o_proj"][:, :HEAD_DIM].zero_()
    attn["o_proj"][PREVQ, :width] = torch.eye(width)


def set_retrieval_head(attn: dict[str, torch.Tensor]) -> None:
    """Query head 0 / KV head 0 of layer 1: the query code of the token or of the previous token matched against
    image key codes, plus recency; copies the hit's value code into OUT."""
    s = norm_scale()
    q, k, v = attn["q_proj"][:HEAD_DIM].zero_(), attn["k_proj"][:HEAD_DIM].zero_(), attn["v_proj"][:HEAD_DIM].zero_()
    g = math.sqrt(MATCH_GAIN * math.sqrt(HEAD_DIM)) / s
    for d, hd in enumerate(CODE_DIMS):
        q[hd, QRY.start + d] = q[hd, PREVQ.start + d] = g
        k[hd, KEY.start + d] = g
    a, half, i = recency_phase(), HEAD_DIM // 2, RECENCY_PAIR
    amp = RECENCY_GAIN * math.sqrt(HEAD_DIM) / (BIAS_VALUE * s * s)  # (q . k) / sqrt(D) = RECENCY_GAIN cos(...)
    q[i, BIAS], q[i + half, BIAS] = amp * math.cos(a), amp * math.sin(a)
    k[i, IMG] = 1.0
    n_val = VAL.stop - VAL.start
    v[:n_val, VAL] = torch.eye(n_val) / s
    attn["o_proj"][:, :HEAD_DIM].zero_()
    attn["o_proj"][OUT, :n_val] = torch.eye(n_val)


def embeddings(vocab: list[str], codes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    emb = torch.zeros(len(vocab), HIDDEN)
    emb[:, BIAS] = BIAS_VALUE
    emb[:, FREE] = torch.randn(len(vocab), FREE.stop - FREE.start, generator=gen) * 0.1
    for w, idx in ((w, i) for i, w in enumerate(vocab)):
        if w in sg.LABELS:
            emb[idx, QRY], emb[idx, ASK] = codes[sg.LABELS.index(w)], 1.0
        elif w in ("changed", "flashed"):
            emb[idx, QRY], emb[idx, ASK] = codes[sg.CHANGED_CODE], 1.0
        if w in sg.VALUES or w in sg.LETTERS:
            emb[idx, DOT] = 1.0
    return emb


def lm_head(vocab: list[str]) -> torch.Tensor:
    head = torch.zeros(len(vocab), HIDDEN)
    s = norm_scale()
    for i, w in enumerate(sg.VALUES + sg.LETTERS):
        head[vocab.index(w), OUT.start + i] = UNEMBED_GAIN / s
    head[vocab.index("."), DOT] = DOT_GAIN / s
    head[vocab.index("is"), ASK] = ASK_GAIN / s
    return head


def state_dict(vocab: list[str], seed: int) -> dict[str, torch.Tensor]:
    """All weights that differ from zero-initialised defaults, keyed like the model's state dict."""
    gen = torch.Generator().manual_seed(seed)
    codes = key_codes(gen)
    sd = {f"model.visual.{k}": v for k, v in vision_weights(codes).items()}
    sd["model.language_model.embed_tokens.weight"] = embeddings(vocab, codes, gen)
    for layer in range(LAYERS):
        attn = random_attention(gen)
        if layer == 0:
            set_prev_token_head(attn)
        else:
            set_retrieval_head(attn)
        sd.update({f"model.language_model.layers.{layer}.self_attn.{n}.weight": w for n, w in attn.items()})
    sd["lm_head.weight"] = lm_head(vocab)
    return sd


def build_config(vocab: list[str]):  # noqa: ANN201 - a transformers config
    import transformers as tf

    ids = {t: vocab.index(t) for t in SPECIALS}
    text = tf.Qwen2VLTextConfig(
        vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": MROPE},
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"])
    vision = tf.Qwen2VLVisionConfig(depth=1, embed_dim=EMBED, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2,
                                    patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TPATCH)
    return tf.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def build_model(seed: int = 0):  # noqa: ANN201
    import transformers as tf

    vocab = vocabulary()
    torch.manual_seed(seed)
    model = tf.Qwen2VLForConditionalGeneration(build_config(vocab)).eval()
    with torch.no_grad():
        for p in model.parameters():  # every weight is written down: start from zeros / LayerNorm ones
            p.zero_()
        for name, p in model.named_parameters():
            if ("norm" in name or "ln_q" in name) and name.endswith("weight"):
                p.fill_(1.0)
        missing = set(state_dict(vocab, seed)) - set(model.state_dict())
        if missing:
            raise RuntimeError(f"weight names not in the model: {sorted(missing)[:5]}")
        for name, value in state_dict(vocab, seed).items():
            model.state_dict()[name].copy_(value)
    return model


VISION_TOKENS = ("image_token", "video_token", "vision_start_token", "vision_end_token")


def build_tokenizer():  # noqa: ANN201
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tk.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        model_max_length=32768, clean_up_tokenization_spaces=False,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})


def image_processor():  # noqa: ANN201
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": 4 * 28 * 28, "longest_edge": 1024 * 28 * 28}, patch_size=PATCH, merge_size=MERGE,
        temporal_patch_size=TPATCH, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])


def save(out: Path, seed: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(seed)
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"]["rope_theta"] = ROPE_THETA  # transformers 4.x reads the top-level name
    cfg["text_config"]["rope_scaling"] = {"type": "mrope", "mrope_section": MROPE}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok = build_tokenizer()
    tok.save_pretrained(out)
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tcfg["extra_special_tokens"] = {k: tcfg.pop(k) for k in VISION_TOKENS}  # a dict: what transformers 4.x reads
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, sort_keys=True) + "\n")
    image_processor().save_pretrained(out)
    (out / "README.md").write_text(MODEL_CARD.format(seed=seed))
    return out


def check(out: Path, n: int) -> dict[str, float]:
    """Greedy ``generate()`` accuracy (full cache) on synth_gui and synth_video, by question kind."""
    from kvbench.tasks import synth_video
    from kvbench.tasks.vision import generate_answer, load_vl

    model, proc = load_vl(out)
    scores: dict[str, list[float]] = {}
    for task, samples in (("gui", sg.make_samples(n_samples=n)), ("video", synth_video.make_samples(n_samples=n))):
        for s in samples:
            for q in s.questions:
                pred = generate_answer(model, proc, s, q, max_new_tokens=3)
                scores.setdefault(f"{task}/{q.meta['category']}", []).append(float(pred.split(".")[0].strip()
                                                                                   == q.answers[0]))
    return {k: 100 * sum(v) / len(v) for k, v in scores.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--check", type=int, default=0, metavar="N", help="check generate() on N episodes per task")
    args = parser.parse_args(argv)
    out = save(args.out, args.seed)
    for f in sorted(out.iterdir()):
        print(f"{f.stat().st_size:>10}  {f}")
    print("sha256(model.safetensors) =", hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    if args.check:
        for k, v in check(out, args.check).items():
            print(f"{k:<20} {v:5.1f} %")


MODEL_CARD = """\
# kvbench-tiny-vl

An embedded vision-language model for kvbench: a `Qwen2VLForConditionalGeneration` (language model: 2 layers,
hidden 256, 4 query / 2 KV heads of dim 64, M-RoPE sections [8, 12, 12], rope_theta 1e9; vision tower: patch 14,
temporal patch 2, 2 x 2 merge, 1 block of width 64) whose weights are **written down, not trained**
(`scripts/build_tiny_vl.py --seed {seed}`). It loads with `Qwen2VLForConditionalGeneration.from_pretrained(dir)`;
the tokenizer is word-level, the image processor `Qwen2VLImageProcessor` (PIL variant, no torchvision; pixels
rescaled to [0, 1], no normalisation); video frames are laid out by hand as the video processor does
(`kvbench.tasks.vision.video_inputs`).

## What it does

It reads the widget code of `kvbench.tasks.synth_gui` (one widget per 28 x 28 cell = one merged vision token:
label, value and a "changed" marker lit as 2 x 2 sub-blocks) and answers `... now value of <label>` with
`is <value> .`, the widget's value on the **newest** screenshot, and `... now value of changed` (or the video
task's `... flashed`) with the value of the marked widget. Layer 0 has a previous-token head, layer 1 a retrieval
head that matches the question word against the image tokens' key codes and prefers recent screenshots through a
slow temporal M-RoPE pair. The first answer word `is` comes from the prompt's last position; the value is decoded
at the next step over the cache, so evicting the target widget's KV entry (or keeping only older screenshots)
breaks the answer, also when the question was compressed with the context. All other heads have small random
weights, so attention is spread out and methods have choices to make.

Measured with plain transformers `generate()` (full cache): 100 % on `synth_gui` (16 episodes, 32 questions) and
`synth_video` (16 videos); keeping 4 sink + the most recent tokens (10 % of the cache, StreamingLLM-like) in every
layer after the prefill: 0 % (8 episodes) and 25 % (8 videos).

## What it cannot stand in for

It understands no natural images, no language and no instructions: only its own pixel code and question words. Its
attention statistics are not those of a trained VLM. Use it to check plumbing (image/video inputs, M-RoPE positions
after eviction) and that methods differ measurably, not as evidence about real models.
"""


if __name__ == "__main__":
    main()
