"""The frozen chat LLM: loaded once per process, shared by sessions.

Each session owns a ``PrefixCache``: the token ids the model has already seen
and their KV cache. A new prompt reuses the longest common prefix and prefills
only the rest, so across turns only the new user words (and the chat template's
few tokens) are computed. The same mechanism rolls the cache back when a prefix
is revised (the streaming adapter builds on it).

All methods here block; the session calls them in the model worker thread.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from agent.models import int8_linear


@dataclass
class PrefixCache:
    """What one session's model has seen: ``ids``, their KV cache, and the model's
    state after the last of them, ready to sample from (``ChatLLM.logits``)."""

    ids: list[int] = field(default_factory=list)
    kv: object = None  # transformers DynamicCache
    last: torch.Tensor | None = None  # [hidden_size] last-layer (normed) state at the last id
    logits: torch.Tensor | None = None  # [vocab] after the last id; None until ChatLLM.logits asks for it
    hidden: torch.Tensor | None = None  # [hidden_size] last-layer state at the last id, or extend's hidden_at (state heads)

    def copy(self, into: "PrefixCache | None" = None) -> "PrefixCache":
        """An independent copy (made in ``into``, in place, when given: others may
        hold that object): extending or rolling back one leaves the other as it was."""
        out = into if into is not None else PrefixCache()
        out.ids, out.kv = list(self.ids), copy.deepcopy(self.kv)
        out.last = None if self.last is None else self.last.clone()
        out.logits = None if self.logits is None else self.logits.clone()
        out.hidden = None if self.hidden is None else self.hidden.clone()
        return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class DecodeSwitch:
    """Shared by one model's linear layers: ``on`` while ``ChatLLM.generate`` runs a
    forward, or an ``extend`` asked to be fast (then layers with an int8 copy use
    it); off for every other forward."""

    on: bool = False


class DualPrecisionLinear(torch.nn.Module):
    """A linear layer that keeps its weight twice: float32 for prefill, bf16 for decoding.

    On CPUs without a native bf16 multiply (AVX2) the two phases want opposite
    formats. Prefill multiplies many rows at once and is compute-bound: float32
    runs it about 4x faster than bf16. Decoding multiplies one row and is bound
    by reading the weights: bf16 halves the bytes and runs about 2x faster.
    With ``keep_float32=False`` only the bf16 copy is kept and every input takes
    it: the output head (which only ever sees one position: see
    ``ChatLLM.logits``), and every layer on a CPU that multiplies bf16 natively
    (``native_bf16``).

    ``switch``: also keep an int8 copy (dynamic quantization, per output channel)
    for the reply's decoding. Measured on one core of this machine, one row:
    896x4864 0.88 ms bf16 -> 0.16 ms int8; the 151936-token output head 28 -> 8.7
    ms. Only ``generate`` and a fast ``extend`` (a cut-in's few words, the user's
    words as they are heard) turn it on; every other forward stays as the state
    heads were trained (what int8 does to their verdicts: ``train_heads.compare_fast``).
    """

    def __init__(self, linear: torch.nn.Linear, keep_float32: bool = True, max_rows_bf16: int = 4,
                 switch: DecodeSwitch | None = None):
        super().__init__()
        w = linear.weight.detach()
        self.weight = torch.nn.Parameter(w.float(), requires_grad=False) if keep_float32 else None
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(),
                                                                          requires_grad=False)
        self.weight_bf16 = w.to(torch.bfloat16)  # a plain attribute: model.float() must not touch it
        self.max_rows_bf16 = max_rows_bf16
        self.switch = switch
        self.int8 = None if switch is None else int8_linear(w, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None and self.switch.on:
            return self.int8(x)
        # As a 2-D matrix: given a slice of a longer sequence (the output head gets
        # the last position), torch 2.13 does not fold the batch dimension and runs
        # a batched multiply that first copies the whole weight (the head: ~0.6 s).
        x2 = x.reshape(-1, x.shape[-1])
        if self.weight is not None and len(x2) > self.max_rows_bf16:
            y = torch.nn.functional.linear(x2, self.weight, self.bias)
        else:
            y = torch.nn.functional.linear(x2.to(torch.bfloat16), self.weight_bf16).to(x.dtype)
            y = y + self.bias if self.bias is not None else y
        return y.reshape(*x.shape[:-1], y.shape[-1])


class Bf16Embedding(torch.nn.Module):
    """Token embeddings kept in bf16 (a lookup needs no float32), returned as float32."""

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        self.table = embedding.weight.detach().to(torch.bfloat16)  # plain attribute, as above

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.table).float()


def native_bf16() -> bool:
    """The CPU multiplies bf16 natively (AVX512-BF16 or AMX): then bf16 prefills
    faster than float32 at every length. Measured on the 2-core AMD EPYC
    (AVX512-BF16), Qwen2.5-0.5B, one forward of 5 / 16 / 120 new tokens: 121-140 /
    137-144 / 373-390 ms in bf16 against 250-273 / 294-341 / 863-865 ms in float32,
    last-layer states within 0.3% of float32's (what the state heads were trained on)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_dual_precision(model: torch.nn.Module, switch: DecodeSwitch | None = None,
                       bf16_prefill: bool = False) -> None:
    """Convert a bf16-loaded model in place: linear layers become DualPrecisionLinear,
    the token table stays bf16, everything else (norms, biases) becomes float32.
    Loading in bf16 and widening layer by layer keeps the peak memory low.
    ``switch``: the layers also get int8 copies for ``generate`` (see DualPrecisionLinear).
    ``bf16_prefill``: keep no float32 copies; every forward multiplies in bf16."""
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                keep = child is not head and not bf16_prefill
                setattr(module, child_name, DualPrecisionLinear(child, keep_float32=keep, switch=switch))
    if not model.config.tie_word_embeddings:
        model.set_input_embeddings(Bf16Embedding(model.get_input_embeddings()))
    model.float()


class ChatLLM:
    def __init__(self, path: Path, threads: int = 2, dtype: str = "dual", bf16_prefill: bool | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Threads are set per phase: prefill is compute-bound and takes every
        # thread given; decoding is bound by memory and runs beside the voice's
        # synthesis, where a second torch thread only fights it for the core
        # (measured: 2 threads on a half-busy 2-core machine ran 5x slower than 1).
        self.prefill_threads, self.decode_threads = threads, 1
        self.path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        # Measured on the 2-core AVX2 machine with Qwen2.5-0.5B: float32 prefills
        # 94 tokens in 1.1 s and decodes at 163 ms/token; bf16 takes 4.9 s and 78
        # ms/token; "dual" (see DualPrecisionLinear) takes the better of each.
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path, dtype=torch.float32 if dtype == "float32" else torch.bfloat16)
        self.decode_switch = DecodeSwitch()
        # "dual" keeps float32 copies for prefill only where bf16 is not multiplied
        # natively (``bf16_prefill`` None: as the CPU says).
        self.bf16_prefill = dtype in ("dual", "dual-int8") and (native_bf16() if bf16_prefill is None else bf16_prefill)
        self.int8 = dtype == "dual-int8"  # the linear layers carry int8 copies (``fast`` extends use them)
        if dtype in ("dual", "dual-int8"):
            use_dual_precision(self.model, self.decode_switch if dtype == "dual-int8" else None, self.bf16_prefill)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                eos.add(tid)
        self.eos_ids = frozenset(e for e in eos if e is not None)
        self.hidden_size = self.model.config.hidden_size

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Chat-template token ids for ``messages``, ending where the assistant speaks."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    @torch.inference_mode()
    def extend(self, cache: PrefixCache, ids: list[int], hidden_at: int | None = None, fast: bool = False,
               threads: int | None = None) -> int:
        """Make ``cache`` hold exactly ``ids``, reusing the common prefix.

        ``hidden_at``: also compute from this position on at least, and leave the
        hidden state there in ``cache.hidden`` (default: the last position).
        ``fast``: compute the new tokens through the int8 copies the reply decodes
        with, where the model has them ("dual-int8"): for the few tokens of a
        cut-in, whose verdict is waited for, or the user's words while the agent is
        silent. Their states are not quite those the heads were trained on
        (``train_heads.compare_fast`` measures the verdicts). ``threads``: torch
        threads for this forward (default: ``decode_threads`` for a fast extend,
        ``prefill_threads`` otherwise).
        Returns the number of tokens actually computed (the prefill cost).
        """
        from transformers import DynamicCache

        fast = fast and self.int8  # without the copies it is an ordinary extend, threads included
        # A fast extend's few rows are bound by reading the weights, as decoding
        # is, and a cut-in's run beside the voice's synthesis: one thread unless
        # told (the user's words, heard while the voice is silent). Measured (3-token
        # extends, 2-core AVX2 EPYC, p50): int8 79 ms on 1 thread, 59 on 2 idle,
        # but 74 against 201 ms with Piper synthesizing beside it.
        torch.set_num_threads(threads or (self.decode_threads if fast else self.prefill_threads))
        keep = common_prefix(cache.ids, ids)
        if (keep == len(ids) == len(cache.ids) and hidden_at is None
                and (cache.last is not None or cache.logits is not None)):
            return 0
        at = len(ids) - 1 if hidden_at is None else hidden_at
        if not 0 <= at < len(ids):
            raise ValueError(f"hidden_at {hidden_at} outside the {len(ids)} ids")
        keep = min(keep, at)  # recompute at least one token to get its state (and the asked one)
        if cache.kv is None or keep == 0:
            cache.kv, keep = DynamicCache(config=self.model.config), 0
        else:
            cache.kv.crop(keep - cache.kv.get_seq_length())  # a negative count removes tokens
        new = torch.tensor([ids[keep:]], dtype=torch.long)
        # No output head here: most extends are listening, whose state the heads
        # read, and the head's 151k-row multiply (~25 ms on one row in bf16) is
        # done by ``logits`` for the one that precedes generation.
        self.decode_switch.on = fast
        try:
            out = self.model.base_model(input_ids=new, past_key_values=cache.kv, use_cache=True)
        finally:
            self.decode_switch.on = False
        states = out.last_hidden_state[0]
        cache.ids, cache.last, cache.logits = list(ids), states[-1].float(), None
        cache.hidden = states[at - keep].float()
        return len(ids) - keep

    @torch.inference_mode()
    def logits(self, cache: PrefixCache) -> torch.Tensor:
        """[vocab] next-token logits after ``cache``'s last id (computed once, kept)."""
        if cache.logits is None:
            if cache.last is None:
                raise ValueError("the cache holds no tokens to predict from")
            head = self.model.get_output_embeddings()
            x = cache.last[None]
            if type(head) is torch.nn.Linear:  # "float32" / "bfloat16": the head takes its own dtype
                x = x.to(head.weight.dtype)
            cache.logits = head(x)[0].float()
        return cache.logits

    @torch.inference_mode()
    def generate(self, cache: PrefixCache, max_new_tokens: int, cancel: threading.Event,
                 temperature: float = 0.0, seed: int = 0, alone: Callable[[], bool] | None = None) -> Iterator[str]:
        """Stream the reply's text, token by token, from the prompt in ``cache``.

        Stops at an end-of-turn token, after ``max_new_tokens``, or as soon as
        ``cancel`` is set. The cache then holds the prompt plus what was generated.
        ``alone()``, asked before each token: nothing else computes beside the
        decoding (the voice has nothing to synthesize yet), so it takes every
        prefill thread (Qwen, int8, on the 2-core EPYC: 39 ms a token with 2
        threads, 50 ms with 1); otherwise it takes ``decode_threads``.
        """
        gen = torch.Generator().manual_seed(seed)
        out_ids: list[int] = []
        text_sent = ""
        for _ in range(max_new_tokens):
            if cancel.is_set():
                return
            torch.set_num_threads(self.prefill_threads if alone is not None and alone() else self.decode_threads)
            logits = self.logits(cache)
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                tok = int(torch.multinomial(probs, 1, generator=gen))
            else:
                tok = int(torch.argmax(logits))
            if tok in self.eos_ids:
                return
            out_ids.append(tok)
            text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
            # A multi-byte character may span tokens: hold it until complete.
            if not text.endswith("\ufffd") and len(text) > len(text_sent):
                yield text[len(text_sent):]
                text_sent = text
                if cancel.is_set():  # the consumer may have run other work on this cache meanwhile
                    return
            # The switch is on for this forward only: between tokens the consumer may
            # run listening work on the model thread (the state heads' forwards).
            self.decode_switch.on = True
            try:
                step = self.model(input_ids=torch.tensor([[tok]]), past_key_values=cache.kv, use_cache=True)
            finally:
                self.decode_switch.on = False
            cache.ids.append(tok)
            cache.logits, cache.last, cache.hidden = step.logits[0, -1].float(), None, None
