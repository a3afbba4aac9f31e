"""Text-speech language model of CosyVoice 2 (Qwen2 backbone) and its SFT bistream decode.

Rows fed to Qwen2 are embeddings [1, n, D]: ``sos``/``task_id`` from ``llm_embedding``
(rows 0/1), text ids from Qwen's ``embed_tokens``, speech ids from ``speech_embedding``.
``llm_decoder`` maps the last hidden state to scores over speech_token_size + 3 ids:
0..S-1 speech tokens, S = EOS, S+1 never valid, S+2 = FILL (S = 6561).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
from transformers import DynamicCache, Qwen2Config, Qwen2Model

from .config import LLMConfig

# sampler(log_probs [V], decoded_tokens) -> chosen id
Sampler = Callable[[torch.Tensor, list], int]
# on_step(raw_logits [V], rows_fed, chosen_id): observation hook for tests/benchmarks
StepHook = Callable[[torch.Tensor, int, int], None]


class SpeechLM(nn.Module):
    """Qwen2LM without its training parts; parameter names map from ``llm.pt`` (see load)."""

    def __init__(self, cfg: LLMConfig, qwen_config: dict):
        super().__init__()
        self.cfg = cfg
        qcfg = Qwen2Config.from_dict(dict(qwen_config))
        qcfg._attn_implementation = "sdpa"  # what the official recording used
        self.qwen = Qwen2Model(qcfg)
        self.llm_embedding = nn.Embedding(2, cfg.input_size)
        n_out = cfg.speech_token_size + 3
        self.llm_decoder = nn.Linear(cfg.output_size, n_out)
        self.speech_embedding = nn.Embedding(n_out, cfg.input_size)

    @property
    def eos(self) -> int:
        return self.cfg.speech_token_size

    @property
    def fill(self) -> int:
        return self.cfg.speech_token_size + 2

    def load_official(self, sd: dict[str, torch.Tensor]) -> None:
        """Load an official Qwen2LM state dict (``llm.model.model.*`` is the Qwen2 body;
        the tied ``llm.model.lm_head`` text head is unused for speech and dropped)."""
        mapped = {}
        for k, v in sd.items():
            if k.startswith("llm.model.lm_head."):
                continue
            if k.startswith("llm.model.model."):
                k = "qwen." + k[len("llm.model.model."):]
            mapped[k] = v
        self.load_state_dict(mapped, strict=True)

    # -- embeddings [1, n, D] --------------------------------------------------------
    def embed_text(self, ids: Sequence[int]) -> torch.Tensor:
        t = torch.as_tensor(list(ids), dtype=torch.long, device=self.llm_decoder.weight.device)
        return self.qwen.embed_tokens(t)[None]

    def embed_speech(self, ids: Sequence[int]) -> torch.Tensor:
        t = torch.as_tensor(list(ids), dtype=torch.long, device=self.llm_decoder.weight.device)
        return self.speech_embedding(t)[None]

    def embed_special(self, index: int) -> torch.Tensor:
        """index 0 = sos, 1 = task_id."""
        return self.llm_embedding.weight[index].reshape(1, 1, -1)

    def step(self, rows: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Feed rows [1, n, D] after the cached ones; return raw scores [V] of the last row."""
        out = self.qwen(inputs_embeds=rows, past_key_values=cache, use_cache=True)
        return self.llm_decoder(out.last_hidden_state[0, -1]).float()


def greedy_sampler(logp: torch.Tensor, decoded: list) -> int:
    return int(torch.argmax(logp))


@dataclass
class RasSampler:
    """Repetition-aware sampling (upstream ras_sampling): nucleus (top_p, top_k); if the
    pick already occurs >= win_size * tau_r times in the last win_size tokens, resample from
    the full distribution with that id banned.  Own generator, so sessions don't share RNG."""

    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1
    generator: torch.Generator | None = field(default=None, repr=False)

    def __call__(self, logp: torch.Tensor, decoded: list) -> int:
        probs = logp.float().softmax(dim=0).cpu()
        sp, si = probs.sort(descending=True, stable=True)
        # keep a token while the mass *before* it is < top_p, at most top_k tokens
        before = torch.cumsum(sp, 0) - sp
        keep = int(min(self.top_k, int((before < self.top_p).sum())))
        pick = int(si[torch.multinomial(sp[:max(keep, 1)], 1, generator=self.generator)])
        recent = decoded[-self.win_size:]
        if sum(1 for t in recent if t == pick) >= self.win_size * self.tau_r:
            probs = probs.clone()
            probs[pick] = 0.0
            pick = int(torch.multinomial(probs, 1, generator=self.generator))
        return pick


@torch.inference_mode()
def bistream_decode(lm: SpeechLM, text: Iterable[Sequence[int]], sampler: Sampler,
                    prompt_text: Sequence[int] = (), prompt_speech: Sequence[int] = (),
                    on_step: StepHook | None = None, max_final_tokens: int | None = None,
                    max_token_text_ratio: float | None = None) -> Iterator[int]:
    """SFT bistream decoding, step for step as upstream ``Qwen2LM.inference_bistream``.

    text: pieces of text ids as an upstream LLM emits them (may block).  Yields speech
    tokens (never FILL/EOS) as soon as each is chosen.  Rules (mix ratio 5:15):
    - before any decoding, sos plus the first 5 text ids are fed; prompt text/speech are
      interleaved 5:15 first when a prompt is given;
    - a FILL is forced when len(out) reaches next_fill (15 - P mod 15 at the start), after
      which decoding pauses until 5 more text ids are cached; a FILL is never fed back;
    - when the text ends: feed [held-over input row, leftover text, task_id], then decode
      with EOS allowed until EOS.  The held-over row is the last speech token when the text
      ended right after a FILL: upstream feeds it a second time (quirk kept on purpose).
    max_final_tokens / max_token_text_ratio: optional safety caps (final-phase tokens;
    total speech tokens per text id fed) -- upstream has none; None keeps that.  Id S+1 is never valid: it (and FILL in the final phase, which upstream
    would crash on) is banned before sampling.  Banning can't change a greedy pick that
    upstream accepts, since upstream raises on them.
    """
    n_text, n_speech = lm.cfg.mix_ratio
    eos, fill, invalid = lm.eos, lm.fill, lm.eos + 1
    cache = DynamicCache()
    lm_input = lm.embed_special(0)
    text_cache = lm.embed_text(prompt_text)
    prompt_emb = lm.embed_speech(prompt_speech)
    p = len(prompt_speech)
    next_fill = (p // n_speech + 1) * n_speech - p
    out: list[int] = []
    n_text_ids = 0  # target text only; the prompt transcript is not spoken
    n_yielded = 0

    def decide(rows: torch.Tensor, final: bool) -> int:
        nonlocal next_fill
        raw = lm.step(rows, cache)
        logp = raw.log_softmax(dim=-1)
        if not final and len(out) == next_fill:
            tok = fill
        else:
            logp = logp.clone()
            logp[invalid] = -float("inf")
            logp[fill if final else eos] = -float("inf")
            tok = int(sampler(logp, out))
        if tok == fill:
            next_fill = len(out) + n_speech + 1
        if on_step is not None:
            on_step(raw, rows.shape[1], tok)
        out.append(tok)
        return tok

    for piece in text:
        if len(piece) == 0:
            continue
        text_cache = torch.cat([text_cache, lm.embed_text(piece)], dim=1)
        n_text_ids += len(piece)
        while prompt_emb.shape[1] and text_cache.shape[1] >= n_text:
            lm_input = torch.cat([lm_input, text_cache[:, :n_text], prompt_emb[:, :n_speech]], dim=1)
            text_cache, prompt_emb = text_cache[:, n_text:], prompt_emb[:, n_speech:]
        if prompt_emb.shape[1]:
            continue
        after_fill = bool(out) and out[-1] == fill
        if after_fill or (not out and lm_input.shape[1] == 1):
            if text_cache.shape[1] < n_text:
                continue  # wait for more text
            head = text_cache[:, :n_text]
            lm_input = head if after_fill else torch.cat([lm_input, head], dim=1)
            text_cache = text_cache[:, n_text:]
        while True:
            tok = decide(lm_input, final=False)
            if tok == fill:
                break  # lm_input keeps the last speech row: the source of the repeat quirk
            if tok >= lm.cfg.speech_token_size:
                raise ValueError(f"speech LM produced invalid token {tok}")
            yield tok
            n_yielded += 1
            lm_input = lm.speech_embedding.weight[tok].reshape(1, 1, -1)

    lm_input = torch.cat([lm_input, text_cache, lm.embed_special(1)], dim=1)
    n_final = 0
    cap = None if max_token_text_ratio is None else int(max_token_text_ratio * max(n_text_ids, 1))
    while (max_final_tokens is None or n_final < max_final_tokens) and (cap is None or n_yielded < cap):
        tok = decide(lm_input, final=True)
        if tok == eos:
            return
        if tok >= lm.cfg.speech_token_size:
            raise ValueError(f"speech LM produced invalid token {tok}")
        yield tok
        n_final += 1
        n_yielded += 1
        lm_input = lm.speech_embedding.weight[tok].reshape(1, 1, -1)
