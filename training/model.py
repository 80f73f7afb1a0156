"""The trained test model: official ``qwen_asr`` transformers classes with a restricted vocabulary.

Runs in ``.venv-official`` (transformers 4.57.6 + qwen-asr 0.0.6).  Only the ids the task can produce
get their own embedding / lm_head rows ("used rows"); every other lm_head row is ONE trainable vector
``other`` (the loss's extra class has logit ``h.other + log(n_other)``), which is exactly the full
151,936-way softmax of the exported checkpoint whose unused lm_head rows all equal ``other``.  Unused
input-embedding rows are never fed by the task's prompts; they are regenerated from a fixed seed.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from qwen_asr.core.transformers_backend.configuration_qwen3_asr import Qwen3ASRConfig
from qwen_asr.core.transformers_backend.modeling_qwen3_asr import (
    Qwen3ASRForConditionalGeneration,
    _get_feat_extract_output_lengths,
)
from torch.nn.utils.rnn import pad_sequence

VOCAB_SIZE = 151936
IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|audio_start|>": 151669,
    "<|audio_end|>": 151670,
    "<|audio_pad|>": 151676,
    "<asr_text>": 151704,
}
# The official prompt with an empty context and no forced language (Qwen3ASRModel._build_text_prompt).
PROMPT = (
    "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>"
    "<|im_end|>\n<|im_start|>assistant\n"
)
TARGET_PREFIX = "language English<asr_text>"
WINDOW_TOKENS = 13 * 8  # encoder attention window: n_window_infer 800 frames = 8 chunks of 13 tokens

DEFAULT_ARCH = {
    "a_d": 128,
    "a_layers": 3,
    "a_heads": 2,
    "a_ffn": 512,
    "ds": 32,
    "h": 128,
    "t_layers": 4,
    "heads": 2,
    "kv": 2,
    "inter": 384,
}


def model_config(arch: dict) -> dict:
    a = {**DEFAULT_ARCH, **arch}
    audio = {
        "model_type": "qwen3_asr_audio_encoder",
        "num_mel_bins": 128,
        "encoder_layers": a["a_layers"],
        "encoder_attention_heads": a["a_heads"],
        "encoder_ffn_dim": a["a_ffn"],
        "d_model": a["a_d"],
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_function": "gelu",
        "activation_dropout": 0.0,
        "scale_embedding": False,
        "initializer_range": 0.02,
        "max_source_positions": 1500,
        "n_window": 50,
        "n_window_infer": 800,
        "conv_chunksize": 500,
        "downsample_hidden_size": a["ds"],
        "output_dim": a["h"],
    }
    text = {
        "model_type": "qwen3_asr_text",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": a["h"],
        "intermediate_size": a["inter"],
        "num_hidden_layers": a["t_layers"],
        "num_attention_heads": a["heads"],
        "num_key_value_heads": a["kv"],
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 65536,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "tie_word_embeddings": False,
        "rope_theta": 1000000.0,
        "rope_scaling": {
            "interleaved": True,
            "mrope_interleaved": True,
            "mrope_section": [12, 10, 10],
            "rope_type": "default",
            "type": "default",
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": IDS["<|endoftext|>"],
        "eos_token_id": IDS["<|im_end|>"],
        "pad_token_id": IDS["<|endoftext|>"],
    }
    return {
        "architectures": ["Qwen3ASRForConditionalGeneration"],
        "model_type": "qwen3_asr",
        "support_languages": ["English"],
        "thinker_config": {
            "model_type": "qwen3_asr_thinker",
            "audio_config": audio,
            "text_config": text,
            "audio_token_id": IDS["<|audio_pad|>"],
            "audio_start_token_id": IDS["<|audio_start|>"],
            "audio_end_token_id": IDS["<|audio_end|>"],
            "user_token_id": 872,
            "initializer_range": 0.02,
            "tie_word_embeddings": False,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "dtype": "float32",
        "transformers_version": "4.57.6",
    }


class Vocab:
    """Compact id space: every id the prompt or a transcript over the word list can contain."""

    def __init__(self, tok, words: list[str]) -> None:
        ids = set(IDS.values())
        ids.update(tok(PROMPT, add_special_tokens=False)["input_ids"])
        ids.update(tok(TARGET_PREFIX, add_special_tokens=False)["input_ids"])
        for w in words:
            ids.update(tok(w, add_special_tokens=False)["input_ids"])
            ids.update(tok(" " + w, add_special_tokens=False)["input_ids"])
        self.full = sorted(ids)
        self.K = len(self.full)
        self.to_c = {t: i for i, t in enumerate(self.full)}
        self.full_t = torch.tensor(self.full)
        self.tok = tok
        p = tok(PROMPT, add_special_tokens=False)["input_ids"]
        k = p.index(IDS["<|audio_pad|>"])
        self.pre = [self.to_c[t] for t in p[:k]]  # ... <|audio_start|>
        self.post = [self.to_c[t] for t in p[k + 1 :]]  # <|audio_end|> ... assistant\n
        self.audio_c = self.to_c[IDS["<|audio_pad|>"]]
        self.eos_c = self.to_c[IDS["<|im_end|>"]]

    def target(self, text: str) -> list[int]:
        t = self.tok(TARGET_PREFIX + text, add_special_tokens=False)["input_ids"] + [IDS["<|im_end|>"]]
        return [self.to_c[x] for x in t]


class Heads(nn.Module):
    """Used rows of embed_tokens / lm_head and the one ``other`` row shared by the unused lm_head rows."""

    def __init__(self, K: int, h: int) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.randn(K, h) * 0.02)
        self.out = nn.Parameter(torch.randn(K, h) * 0.02)
        self.other = nn.Parameter(torch.zeros(h))
        self.log_n_other = math.log(VOCAB_SIZE - K)

    def logits(self, hs: torch.Tensor) -> torch.Tensor:  # (..., h) -> (..., K+1); last class = any unused id
        W = torch.cat([self.out, self.other[None]], 0)
        lg = hs @ W.T
        return torch.cat([lg[..., :-1], lg[..., -1:] + self.log_n_other], -1)


def build_model(cfg: dict) -> Qwen3ASRForConditionalGeneration:
    c = Qwen3ASRConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    model = Qwen3ASRForConditionalGeneration(c).float()
    # HF's std-0.02 init shrinks the conv front-end's output ~3000x below the position embedding: the
    # encoder cannot see the audio (the spike's plateau).  Fan-in (He) init for the convs instead.
    t = model.thinker.audio_tower
    with torch.no_grad():
        for conv in (t.conv2d1, t.conv2d2, t.conv2d3):
            conv.weight.normal_(0.0, (2.0 / conv.weight[0].numel()) ** 0.5)
            conv.bias.zero_()
        t.conv_out.weight.normal_(0.0, t.conv_out.weight.shape[1] ** -0.5)
    model.thinker.model.embed_tokens.weight.requires_grad_(False)
    model.thinker.lm_head.weight.requires_grad_(False)
    return model


def encode_audio(tower, feats: list[torch.Tensor]):
    """Batched Qwen3ASRAudioEncoder.forward for (128, T_i) features: 100-frame conv chunks, then
    attention inside each utterance's 104-token (8 s) windows, as the official encoder and vLLM do.
    Returns padded (B, L, out), lengths (B,) and the valid-token mask (B, L)."""
    lens = torch.tensor([f.shape[1] for f in feats])
    x = torch.cat(feats, dim=1)
    nw2 = tower.n_window * 2
    chunk_num = torch.ceil(lens / nw2).long()
    chunk_lengths = torch.full((int(chunk_num.sum()),), nw2, dtype=torch.long)
    tail = F.pad(chunk_num, (1, 0), value=-1).cumsum(0)[1:]
    chunk_lengths[tail] = lens % nw2
    chunk_lengths[chunk_lengths == 0] = nw2
    chunks = x.T.split(chunk_lengths.tolist(), dim=0)
    pf = pad_sequence(chunks, batch_first=True).transpose(1, 2).unsqueeze(1)
    la = _get_feat_extract_output_lengths(chunk_lengths)
    mask_after = torch.arange(int(la.max()))[None, :] < la[:, None]
    e = F.gelu(tower.conv2d1(pf))
    e = F.gelu(tower.conv2d2(e))
    e = F.gelu(tower.conv2d3(e))
    b, c, f, t = e.size()
    e = tower.conv_out(e.permute(0, 3, 1, 2).contiguous().view(b, t, c * f))
    e = e + tower.positional_embedding.positional_embedding[:t].unsqueeze(0).to(e.dtype)
    hflat = e[mask_after]
    aft = _get_feat_extract_output_lengths(lens)
    H = pad_sequence(hflat.split(aft.tolist()), batch_first=True)
    B, L, D = H.shape
    pos = torch.arange(L)
    keym = pos[None, :] < aft[:, None]
    win = pos // WINDOW_TOKENS
    am = (keym[:, None, :] & (win[:, None] == win[None, :])[None])[:, None]  # (B,1,L,L)
    for layer in tower.layers:
        sa = layer.self_attn
        nh = sa.num_heads
        y = layer.self_attn_layer_norm(H)
        q = sa.q_proj(y).view(B, L, nh, -1).transpose(1, 2)
        k = sa.k_proj(y).view(B, L, nh, -1).transpose(1, 2)
        v = sa.v_proj(y).view(B, L, nh, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=am, scale=sa.scaling)
        H = H + sa.out_proj(o.transpose(1, 2).reshape(B, L, D))
        y = layer.final_layer_norm(H)
        H = H + layer.fc2(layer.activation_fn(layer.fc1(y)))
    H = tower.ln_post(H)
    H = tower.proj2(tower.act(tower.proj1(H)))
    return H, aft, keym


def assemble(model, heads, vocab, feats, targets=None, left_pad=False):
    """inputs_embeds for prompt (+ target): embeds, attention mask, mrope positions, ids, seqs, audio."""
    A, aft, keym = encode_audio(model.thinker.audio_tower, feats)
    seqs = []
    for i, n in enumerate(aft.tolist()):
        s = vocab.pre + [vocab.audio_c] * n + vocab.post
        if targets is not None:
            s = s + targets[i]
        seqs.append(s)
    S = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.zeros(B, S, dtype=torch.long)
    am = torch.zeros(B, S, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(S - len(s), S) if left_pad else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        am[i, sl] = 1
    emb = heads.emb[ids]
    amask = (ids == vocab.audio_c) & (am == 1)
    emb = emb.masked_scatter(amask[..., None].expand_as(emb), A[keym])
    pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)
    return emb, am, pos[None].expand(3, -1, -1), ids, seqs, (A, aft)


def loss_fn(model, heads, vocab, feats, texts, ctc_head=None, ctc_weight=0.0):
    """Teacher-forced cross-entropy on ``language English<asr_text>{text}<|im_end|>`` (+ auxiliary CTC).

    Teacher forcing trains every continuation of every target prefix, which is exactly what a streaming
    step asks (prompt + previous text minus K tokens -> the rest), so cut-audio examples need no
    separate prefix prompts."""
    tg = [vocab.target(t) for t in texts]
    emb, am, pos, ids, seqs, (A, aft) = assemble(model, heads, vocab, feats, tg)
    ctc = torch.zeros(())
    if ctc_head is not None and ctc_weight > 0:
        lp = F.log_softmax(ctc_head(A), -1).transpose(0, 1)  # (L, B, K+1), blank = class K
        ct = [[vocab.to_c[x] for x in vocab.tok(t, add_special_tokens=False)["input_ids"]] for t in texts]
        ctc = F.ctc_loss(
            lp,
            torch.tensor(sum(ct, [])),
            aft,
            torch.tensor([len(c) for c in ct]),
            blank=vocab.K,
            zero_infinity=True,
        )
    hs = model.thinker.model(
        inputs_embeds=emb, attention_mask=am, position_ids=pos, use_cache=False
    ).last_hidden_state
    lab = torch.zeros_like(ids, dtype=torch.bool)
    for i, s in enumerate(seqs):
        lab[i, len(s) - len(tg[i]) : len(s)] = True
    sel = hs[:, :-1][lab[:, 1:]]
    y = ids[:, 1:][lab[:, 1:]]
    ce = F.cross_entropy(heads.logits(sel), y)
    return ce + ctc_weight * ctc, int(y.numel()), (ce.item(), ctc.item())


@torch.no_grad()
def greedy(model, heads, vocab, feats, max_new=200):
    """Batched greedy decoding with a KV cache over the compact vocabulary (+ the 'other' class)."""
    from transformers import DynamicCache

    emb, am, pos, ids, seqs, _ = assemble(model, heads, vocab, feats, None, left_pad=True)
    B, S = am.shape
    cache = DynamicCache()
    out = model.thinker.model(
        inputs_embeds=emb,
        attention_mask=am,
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
        cache_position=torch.arange(S),
    )
    h = out.last_hidden_state[:, -1]
    nxtpos = pos[0, :, -1] + 1
    res: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    for t in range(max_new):
        nxt = heads.logits(h).argmax(-1)
        for i in range(B):
            if not done[i]:
                if int(nxt[i]) in (vocab.K, vocab.eos_c):
                    done[i] = True
                else:
                    res[i].append(int(nxt[i]))
        if bool(done.all()):
            break
        nxt = nxt.clamp(max=vocab.K - 1)
        am = torch.cat([am, torch.ones(B, 1, dtype=am.dtype)], 1)
        p = nxtpos[None, :, None].expand(3, -1, 1)
        out = model.thinker.model(
            inputs_embeds=heads.emb[nxt][:, None],
            attention_mask=am,
            position_ids=p,
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.tensor([S + t]),
        )
        h = out.last_hidden_state[:, -1]
        nxtpos = nxtpos + 1
    return [vocab.tok.decode([vocab.full[c] for c in r], skip_special_tokens=False) for r in res]


def parse(raw: str) -> str:
    return raw.split("<asr_text>", 1)[1].strip() if "<asr_text>" in raw else raw.strip()


def norm_words(s: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", s.lower()).split()


def edit_distance(a: list[str], b: list[str]) -> int:
    d = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(b) + 1):
            cur = d[j]
            d[j] = min(d[j] + 1, d[j - 1] + 1, prev + (a[i - 1] != b[j - 1]))
            prev = cur
    return d[-1]


def wer(refs: list[str], hyps: list[str]) -> float:
    e = n = 0
    for r, h in zip(refs, hyps, strict=True):
        rw, hw = norm_words(r), norm_words(h)
        e += edit_distance(rw, hw)
        n += len(rw)
    return e / max(n, 1)
