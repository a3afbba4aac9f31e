"""Train and evaluate the state heads (agent/heads.py) on real dialogue text.

    python -m agent.train_heads [--llm NAME | --all] [--eval] [--eval-only] [--compare-fast N]

Text: whole turns from two corpora shipped inside PyPI packages (see
agent/heads_data/README.md): chatterbot-corpus (questions and requests to a
chatbot) and seinfeld-laugh-corpus (spoken TV dialogue, one subtitle cue a line),
plus the hand-written lists in agent/heads_data/phrases.txt (backchannels,
fillers, Whisper's transcripts of noise, cut-ins). Labels come from how a sample
is made, with timing drawn to match:

    listening  sentence cut after "the", "to", "and"..., any silence continue
               whole sentence, silence <= 80 ms (still talking)   continue
               whole sentence, silence >= 240 ms                  interrupt
               sentence cut + "...", ", um" (a pause mid-phrase)  continue
               cut after "the", "of"... + "?", "." (Whisper's)    continue
               filler, silence <= 80 ms / >= 240 ms               continue / reject
               noise transcript, any silence                      reject
    speaking   cut-in phrase, or a sentence (>= 3 words of it),
               optionally after "Actually," etc., any silence     interrupt
               backchannel, filler or noise, any silence          reject

Every text (sentence or phrase) goes wholly to the training or the held-out
split by a hash of its normalized form, so evaluation text is never trained on.

Cost: one LLM prefill per (context, text); every sample of that text (its
prefixes, its timings) is read off the same forward pass, since a causal
model's state at a prefix's last token does not depend on what follows. The
contexts (system prompt and history) are prefilled once and shared by a batch.
Features are cached on disk, keyed by the LLM and the data.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import importlib.util
import json
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from agent.heads import (CONTINUE, HEADS_DIR, INTERRUPT, LABELS, REJECT, StateHead, Thresholds, Timing,
                         decide_label, head_prompt_ids, load_phrases, normalize, timing_vector)
from agent.llm import common_prefix

LLMS = ("qwen2.5-0.5b", "smollm2-135m")
FEATURE_VERSION = 1
EVAL_SHARE = 0.2
SOURCES = {
    "chatterbot-corpus==1.3.3": "chatterbot_corpus",
    "seinfeld-laugh-corpus==1.0.13": "seinfeld_laugh_corpus",
}


@dataclass(frozen=True)
class Sizes:
    """How many texts go through the LLM: about 15k tokens in all, so that
    Qwen2.5-0.5B extracts its features in about 5 minutes on 2 shared CPU cores."""

    chatterbot: int = 240  # whole turns heard while listening
    seinfeld: int = 240
    trailing: int = 180  # cut sentences ending in "...", ", um": listening
    open_marked: int = 120  # sentences cut after "the", "of"... and closed with "?" or ".": listening
    spoken_over: int = 180  # sentences said over the agent
    phrase_contexts: int = 5  # each phrase is heard in this many contexts per role
    contexts: int = 12  # history contexts per role (train); a quarter as many again for eval


@dataclass(frozen=True)
class Tap:
    """One labelled sample read off a sequence: the hidden state after the first
    ``n_chars`` characters of its text, with a timing."""

    n_chars: int
    label: int
    timing: Timing
    kind: str  # how it was made, for the per-kind report


@dataclass(frozen=True)
class Context:
    history: tuple[tuple[str, str], ...] = ()  # (role, text) after the system prompt
    agent_reply: str | None = None  # the reply being spoken, when the agent speaks


@dataclass(frozen=True)
class Sequence:
    context: Context
    text: str
    taps: tuple[Tap, ...]
    split: str  # "train" | "eval"


# -- text sources ----------------------------------------------------------------------------------


def package_dir(import_name: str) -> Path:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        pins = " ".join(SOURCES)
        raise RuntimeError(f"the training text needs package {import_name!r}; fix: pip install --no-deps {pins}")
    return Path(list(spec.submodule_search_locations)[0])


def split_of(text: str) -> str:
    digest = hashlib.sha1(normalize(text).encode()).digest()
    return "eval" if digest[0] < 256 * EVAL_SHARE else "train"


_CODE = re.compile(r"[{}\[\]()<>=_*#/\\|~^@$%`♪]|\.\.|^[A-Z]+:|^[^A-Za-z\"']")


def usable(text: str, max_words: int = 25, min_words: int = 1) -> bool:
    """A whole, plain turn: no code or stage directions, not a fragment."""
    return min_words <= len(text.split()) <= max_words and not _CODE.search(text) and text.isascii()


def load_chatterbot() -> tuple[list[str], list[tuple[str, str]]]:
    """The user's side of chatterbot-corpus's English conversations (turns 1, 3, ...;
    the others are the bot's answers, often a bare name), and (turn, reply) pairs."""
    import yaml

    lines, pairs = [], []
    for f in sorted((package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        for conv in yaml.safe_load(f.read_text()).get("conversations", []):
            conv = [" ".join(str(t).split()) for t in conv]
            lines += [t for t in conv[::2] if usable(t, min_words=3)]
            pairs += [(a, b) for a, b in zip(conv, conv[1:]) if usable(a) and usable(b, 40)]
    return list(dict.fromkeys(lines)), list(dict.fromkeys(pairs))


def load_seinfeld() -> list[str]:
    """Subtitle cues of seinfeld-laugh-corpus that are whole sentences."""
    lines = []
    for f in sorted((package_dir("seinfeld_laugh_corpus") / "the_corpus").iterdir()):
        cue: list[str] = []
        for raw in f.read_text(encoding="utf-8", errors="replace").splitlines() + [""]:
            raw = raw.strip()
            if not raw or raw.startswith("#") or raw == "**LOL**" or re.fullmatch(r"[\d.]+", raw):
                text = " ".join(cue).strip('"')
                if cue and text[-1:] in ".?!" and text[:1].isupper() and usable(text, min_words=3):
                    lines.append(text)
                cue = []
            else:
                cue.append(raw)
    return list(dict.fromkeys(lines))


# -- samples ---------------------------------------------------------------------------------------


def _short_silence(rng: random.Random) -> int:
    return rng.choice([0, 0, 0, 20, 40, 60, 80])  # still speaking, or a breath


def _long_silence(rng: random.Random) -> int:
    return 20 * rng.randint(12, 75)  # 240..1500 ms


def _any_silence(rng: random.Random) -> int:
    return _short_silence(rng) if rng.random() < 0.5 else _long_silence(rng)


def _speech_ms(rng: random.Random, text: str) -> float:
    return round(len(text.split()) * rng.uniform(220, 420) + rng.uniform(0, 300))


# Words after which a phrase cannot be over: articles, possessives, prepositions,
# conjunctions, pronoun contractions. A cut after a content word ("Of course",
# "My intern") is often a whole phrase itself, so those prefixes are not labelled.
OPEN_ENDINGS = frozenset("""the a an my your his her our their its this these those every each
to of for with from by into than and or but because if although though whether i
i'm you're we're they're he's she's it's there's that's i'll you'll we'll they'll i've you've we've i'd""".split())


def open_cut_points(text: str) -> list[int]:
    """The cut points right after a word in OPEN_ENDINGS."""
    return [n for n in cut_points(text) if text[:n].split()[-1].lower().replace("’", "'") in OPEN_ENDINGS]


def cut_points(text: str) -> list[int]:
    """Ends of prefixes that stop mid-clause: after a word not followed by
    punctuation, and not the last word."""
    return [m.end() for m in re.finditer(r"\S+", text) if m.end() < len(text) and m.group()[-1].isalnum()]


def whisper_style(rng: random.Random, phrase: str) -> str:
    """A phrase as Whisper may write it: as is, or capitalized with a stop."""
    if rng.random() < 0.5:
        return phrase
    return phrase[0].upper() + phrase[1:].rstrip(",") + rng.choice([".", ".", "!", "?", "..."])


def make_contexts(rng: random.Random, pairs: list[tuple[str, str]], texts: list[str], split: str,
                  n: int) -> tuple[list[Context], list[Context]]:
    """(listening contexts, speaking contexts), built from ``split``'s texts only:
    no history or a (turn, reply) pair while listening; a turn and the first
    words of a reply being spoken while speaking."""
    pairs = [p for p in pairs if split_of(p[0]) == split and split_of(p[1]) == split]
    texts = [t for t in texts if split_of(t) == split]
    replies = [t for t in texts if len(t.split()) >= 6]
    if not replies:
        raise ValueError(f"no reply of 6 words or more in the {split} split to build contexts from")
    listening = [Context()] + [Context((("user", a), ("assistant", b))) for a, b in rng.sample(pairs, min(n - 1, len(pairs)))]
    speaking = []
    turns = [a for a, _ in pairs] if len(pairs) >= n else texts
    for a in rng.sample(turns, min(n, len(turns))):
        words = rng.choice(replies).split()
        speaking.append(Context((("user", a),), " ".join(words[:rng.randint(3, len(words))])))
    return listening, speaking


def build_sequences(chatterbot: list[str], pairs: list[tuple[str, str]], seinfeld: list[str],
                    phrases: dict[str, list[str]], sizes: Sizes = Sizes(), seed: int = 0,
                    pinned: frozenset[str] = frozenset()) -> list[Sequence]:
    """The labelled set (see the module docstring for the labelling). ``pinned``:
    normalized phrases that go to training whatever their hash."""
    rng = random.Random(seed)

    def phrase_split(phrase: str) -> str:
        return "train" if normalize(phrase) in pinned else split_of(phrase)

    ignore = {normalize(p) for k in ("backchannel", "filler", "noise") for p in phrases[k]}
    chatterbot = [t for t in chatterbot if normalize(t) and normalize(t) not in ignore]
    seinfeld = [t for t in seinfeld if normalize(t) and normalize(t) not in ignore]
    ctx = {s: make_contexts(rng, pairs, chatterbot + seinfeld, s,
                            sizes.contexts if s == "train" else max(4, sizes.contexts // 4))
           for s in ("train", "eval")}
    seqs: list[Sequence] = []

    def add(text: str, split: str, speaking: bool, taps: list[Tap], context: Context | None = None) -> None:
        listening_ctx, speaking_ctx = ctx[split]
        context = context or rng.choice(speaking_ctx if speaking else listening_ctx)
        seqs.append(Sequence(context, text, tuple(taps), split))

    def tap(n: int, label: int, silence: int, speech: float, speaking: bool, kind: str) -> Tap:
        return Tap(n, label, Timing(float(silence), float(speech), speaking), kind)

    # Listening: whole turns, their prefixes, and the timing that tells them apart.
    sentences = rng.sample(chatterbot, min(sizes.chatterbot, len(chatterbot))) + \
        rng.sample(seinfeld, min(sizes.seinfeld, len(seinfeld)))
    for text in sentences:
        sp = _speech_ms(rng, text)
        taps = [tap(len(text), CONTINUE, _short_silence(rng), sp, False, "listen/whole, still talking"),
                tap(len(text), INTERRUPT, _long_silence(rng), sp, False, "listen/whole + silence")]
        bare = text.rstrip(".?!")
        if bare != text and bare.strip():
            taps.append(tap(len(bare), INTERRUPT, _long_silence(rng), sp, False, "listen/whole + silence"))
        for n in rng.sample(open_cut_points(text), min(3, len(open_cut_points(text)))):
            taps.append(tap(n, CONTINUE, _any_silence(rng), _speech_ms(rng, text[:n]), False, "listen/mid-phrase"))
        add(text, split_of(text), False, taps)

    # Listening: a phrase broken off with a pause mark or a filler is not over.
    pool = [t for t in chatterbot + seinfeld if cut_points(t)]
    for text in rng.sample(pool, min(sizes.trailing, len(pool))):
        cut = text[:rng.choice(cut_points(text))] + rng.choice(["...", ".", ",", ", um", ", uh...", " um", " uh", "-"])
        # Split by the cut text itself: sentences of both splits may share a beginning.
        add(cut, split_of(cut), False,
            [tap(len(cut), CONTINUE, _any_silence(rng), _speech_ms(rng, cut), False, "listen/mid-phrase + pause mark")])

    # ... nor one broken off after "the", "of", "to"..., even when Whisper, at the
    # edge of its window, closes it with a stop or a question mark ("... the name of?").
    pool = [t for t in chatterbot + seinfeld if open_cut_points(t)]
    for text in rng.sample(pool, min(sizes.open_marked, len(pool))):
        cut = text[:rng.choice(open_cut_points(text))] + rng.choice(["?", "?", ".", ".", "!", "..."])
        add(cut, split_of(cut), False,
            [tap(len(cut), CONTINUE, _any_silence(rng), _speech_ms(rng, cut), False, "listen/open end + stop")])

    for phrase in phrases["filler"]:
        for _ in range(sizes.phrase_contexts):
            text, sp = whisper_style(rng, phrase), rng.uniform(150, 700)
            add(text, phrase_split(phrase), False,
                [tap(len(text), CONTINUE, _short_silence(rng), sp, False, "listen/filler, still talking"),
                 tap(len(text), REJECT, _long_silence(rng), sp, False, "listen/filler + silence")])
    for phrase in phrases["noise"]:
        for _ in range(sizes.phrase_contexts):
            add(phrase, phrase_split(phrase), False,
                [tap(len(phrase), REJECT, _any_silence(rng), rng.uniform(60, 900), False, "listen/noise")
                 for _ in range(2)])

    # Speaking: what stops the agent and what does not.
    for kind, label in (("backchannel", REJECT), ("filler", REJECT), ("noise", REJECT), ("cutin", INTERRUPT)):
        for phrase in phrases[kind]:
            for _ in range(sizes.phrase_contexts):
                text = phrase if kind == "noise" else whisper_style(rng, phrase)
                add(text, phrase_split(phrase), True,
                    [tap(len(text), label, _any_silence(rng), _speech_ms(rng, text), True, f"speak/{kind}")
                     for _ in range(2)])
    openers = {s: [o for o in phrases["opener"] if phrase_split(o) == s] for s in ("train", "eval")}
    for text in rng.sample(chatterbot + seinfeld, min(sizes.spoken_over, len(chatterbot + seinfeld))):
        split = split_of(text)
        if openers[split] and rng.random() < 0.5:
            opener = rng.choice(openers[split])
            # After "Stop." the sentence starts anew; after "Wait," it goes on.
            rest = text if re.match(r"I\b", text) or opener.endswith((".", "!", "?")) else text[0].lower() + text[1:]
            text = f"{opener} {rest}"
            taps = [tap(len(opener), INTERRUPT, _any_silence(rng), _speech_ms(rng, opener), True, "speak/opener")]
        else:
            taps = []
        taps.append(tap(len(text), INTERRUPT, _any_silence(rng), _speech_ms(rng, text), True, "speak/sentence"))
        for n in [n for n in cut_points(text) if len(text[:n].split()) >= 3][:2]:
            taps.append(tap(n, INTERRUPT, _any_silence(rng), _speech_ms(rng, text[:n]), True, "speak/sentence"))
        add(text, split, True, taps)

    return seqs


# -- features --------------------------------------------------------------------------------------


@dataclass
class Features:
    """One row per tap: hidden [N, H] float32, timing [N, 4], label [N], kind, split."""

    hidden: torch.Tensor
    timing: torch.Tensor
    label: torch.Tensor
    kind: list[str]
    split: list[str]

    def select(self, split: str) -> "Features":
        idx = [i for i, s in enumerate(self.split) if s == split]
        return Features(self.hidden[idx], self.timing[idx], self.label[idx],
                        [self.kind[i] for i in idx], [self.split[i] for i in idx])


def _messages(system_prompt: str, context: Context) -> list[dict]:
    return [{"role": "system", "content": system_prompt}] + [{"role": r, "content": t} for r, t in context.history]


@torch.inference_mode()
def extract_features(llm, system_prompt: str, seqs: list[Sequence], batch: int = 16,
                     log: Callable[[str], None] = print) -> Features:
    """Run every sequence through the frozen LLM once and read each tap's hidden state.

    Sequences sharing a context share its prefill: its KV cache is computed once,
    repeated over a batch, and the batch's texts (right-padded) run after it.
    """
    from transformers import DynamicCache

    # On a machine busy with other work, a second torch thread spins at every
    # barrier waiting for a core: measured 8x slower than one thread at load 9 on 2 cores.
    busy = os.getloadavg()[0] >= (os.cpu_count() or 1) - 0.5
    torch.set_num_threads(1 if busy else llm.prefill_threads)
    tok, model = llm.tokenizer, llm.model
    rows: list[tuple[tuple[int, int], torch.Tensor, Tap, str]] = []  # ((sequence, tap), hidden, tap, split)
    groups: dict[Context, list[tuple[int, Sequence]]] = defaultdict(list)
    for i, s in enumerate(seqs):
        groups[s.context].append((i, s))
    dropped, done, t0 = 0, 0, time.monotonic()
    for context, group in groups.items():
        msgs = _messages(system_prompt, context)
        items = []  # (ids of the whole text, [((sequence, tap), tap, position of its last token)], split)
        for i, s in group:
            full = head_prompt_ids(tok, msgs, s.text, context.agent_reply)
            taps = []
            for j, t in enumerate(s.taps):
                ids = head_prompt_ids(tok, msgs, s.text[:t.n_chars], context.agent_reply)
                if full[:len(ids)] == ids:  # the prefix tokenizes as the start of the whole
                    taps.append(((i, j), t, len(ids) - 1))
                else:
                    dropped += 1
            if taps:
                items.append((full, taps, s.split))
        keep = min(min(common_prefix(items[0][0], full), min(p for _, _, p in taps)) for full, taps, _ in items)
        kv_ctx = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([items[0][0][:keep]]), past_key_values=kv_ctx, use_cache=True, logits_to_keep=1)
        items.sort(key=lambda it: len(it[0]))
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            width = max(len(full) for full, _, _ in chunk) - keep
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), keep + width, dtype=torch.long)
            mask[:, :keep] = 1
            for b, (full, _, _) in enumerate(chunk):
                ids[b, :len(full) - keep] = torch.tensor(full[keep:])
                mask[b, keep:keep + len(full) - keep] = 1
            kv = copy.deepcopy(kv_ctx)
            kv.batch_repeat_interleave(len(chunk))
            out = model(input_ids=ids, attention_mask=mask, past_key_values=kv, use_cache=True,
                        output_hidden_states=True, logits_to_keep=1)
            last = out.hidden_states[-1].float()
            for b, (_, taps, split) in enumerate(chunk):
                rows += [(key, last[b, pos - keep], t, split) for key, t, pos in taps]
            done += len(chunk)
        log(f"  features: {done}/{len(seqs)} texts, {len(rows)} samples, {time.monotonic() - t0:.0f} s")
    if dropped:
        log(f"  features: {dropped} samples dropped (prefix tokenized differently from the whole)")
    rows.sort(key=lambda r: r[0])  # the order of the input
    return Features(torch.stack([r[1] for r in rows]), torch.stack([timing_vector(r[2].timing) for r in rows]),
                    torch.tensor([r[2].label for r in rows]), [r[2].kind for r in rows], [r[3] for r in rows])


def data_key(llm_name: str, system_prompt: str, seqs: list[Sequence]) -> str:
    h = hashlib.sha1(f"{FEATURE_VERSION}|{llm_name}|{system_prompt}".encode())
    for s in seqs:
        h.update(repr((s.context, s.text, s.split, [(t.n_chars, t.label, t.timing, t.kind) for t in s.taps])).encode())
    return h.hexdigest()[:16]


def cached_features(llm, llm_name: str, system_prompt: str, seqs: list[Sequence], cache_dir: Path,
                    log: Callable[[str], None] = print) -> tuple[Features, float]:
    """Features from disk if this exact data was extracted before; else extract and store.
    Returns (features, seconds spent extracting; 0 when cached)."""
    path = Path(cache_dir) / "heads" / f"features-{llm_name}-{data_key(llm_name, system_prompt, seqs)}.pt"
    if path.is_file():
        log(f"  features: cached at {path}")
        return Features(**torch.load(path)), 0.0
    t0 = time.monotonic()
    feats = extract_features(llm, system_prompt, seqs, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(asdict(feats), tmp)
    tmp.replace(path)
    return feats, time.monotonic() - t0


# -- training and evaluation ---------------------------------------------------------------------


def fit(train: Features, epochs: int = 40, lr: float = 2e-3, weight_decay: float = 1e-2, seed: int = 0,
        meta: dict | None = None) -> StateHead:
    """Class-balanced cross-entropy (each member its own), Adam, minibatches of
    128; seconds on a CPU."""
    torch.manual_seed(seed)
    head = StateHead(train.hidden.shape[1], meta=meta)
    head.mean.copy_(train.hidden.mean(0))
    head.std.copy_(train.hidden.std(0).clamp_min(1e-3))
    counts = torch.bincount(train.label, minlength=len(LABELS)).float()
    loss_fn = torch.nn.CrossEntropyLoss(weight=counts.sum() / (len(LABELS) * counts.clamp_min(1)))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(train.label)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(n).split(128):
            logits = head(train.hidden[idx], train.timing[idx])
            loss = sum(loss_fn(member, train.label[idx]) for member in logits) / len(logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


def evaluate(head: StateHead, data: Features, thresholds: Thresholds = Thresholds()) -> dict:
    """Per-class precision/recall/F1, confusion matrix (rows: truth, columns:
    decision), macro-F1 and accuracy per kind, under the decision rule."""
    probs = head.probs(data.hidden, data.timing)
    pred = [LABELS.index(decide_label(p, thresholds)) for p in probs.tolist()]
    conf = [[0] * len(LABELS) for _ in LABELS]
    for y, p in zip(data.label.tolist(), pred):
        conf[y][p] += 1
    classes = {}
    for c, name in enumerate(LABELS):
        tp = conf[c][c]
        prec = tp / max(1, sum(conf[r][c] for r in range(len(LABELS))))
        rec = tp / max(1, sum(conf[c]))
        classes[name] = {"precision": prec, "recall": rec, "f1": 2 * prec * rec / max(1e-9, prec + rec),
                         "support": sum(conf[c])}
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for k, y, p in zip(data.kind, data.label.tolist(), pred):
        kinds[k][0] += y == p
        kinds[k][1] += 1
    return {"classes": classes, "confusion": conf, "macro_f1": sum(c["f1"] for c in classes.values()) / len(LABELS),
            "accuracy": sum(conf[c][c] for c in range(len(LABELS))) / max(1, len(pred)),
            "kinds": {k: {"accuracy": v[0] / v[1], "n": v[1]} for k, v in sorted(kinds.items())}}


def format_report(report: dict) -> str:
    lines = [f"{'class':10} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>8}"]
    for name, c in report["classes"].items():
        lines.append(f"{name:10} {c['precision']:9.3f} {c['recall']:7.3f} {c['f1']:6.3f} {c['support']:8d}")
    lines.append(f"macro-F1 {report['macro_f1']:.3f}, accuracy {report['accuracy']:.3f}")
    lines.append("confusion (rows: truth, columns: decision)")
    lines.append(" " * 11 + "".join(f"{n:>10}" for n in LABELS))
    for name, row in zip(LABELS, report["confusion"]):
        lines.append(f"{name:11}" + "".join(f"{v:10d}" for v in row))
    lines.append("accuracy per kind of sample")
    lines += [f"  {k:38} {v['accuracy']:.3f}  (n={v['n']})" for k, v in report["kinds"].items()]
    return "\n".join(lines)


# -- the entry points --------------------------------------------------------------------------------


def dataset(sizes: Sizes = Sizes(), seed: int = 0) -> list[Sequence]:
    chatterbot, pairs = load_chatterbot()
    phrases, pinned = load_phrases()
    return build_sequences(chatterbot, pairs, load_seinfeld(), phrases, sizes, seed, pinned)


def train(llm_name: str, out_dir: Path = HEADS_DIR, cache_dir: Path | None = None, sizes: Sizes = Sizes(),
          seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Build the data, extract (or load cached) features, fit the head on the
    training split, evaluate on the held-out one, and write
    ``out_dir/<llm>.safetensors`` and ``out_dir/<llm>.card.json``. Returns the card."""
    from agent import models
    from agent.config import config_from
    from agent.llm import ChatLLM

    cfg = config_from()
    cache_dir = Path(cache_dir or cfg.cache_dir)
    t0 = time.monotonic()
    seqs = dataset(sizes, seed)
    llm = ChatLLM(models.ensure(cache_dir, llm_name), cfg.torch_threads, "dual")
    log(f"{llm_name}: {len(seqs)} texts, {sum(len(s.taps) for s in seqs)} samples")
    feats, extract_s = cached_features(llm, llm_name, cfg.system_prompt, seqs, cache_dir, log)
    train_set, eval_set = feats.select("train"), feats.select("eval")
    t1 = time.monotonic()
    head = fit(train_set, seed=seed)
    fit_s = time.monotonic() - t1
    report = evaluate(head, eval_set)
    card = {
        "llm": llm_name, "hidden_size": llm.hidden_size, "feature_version": FEATURE_VERSION,
        "trained": datetime.date.today().isoformat(),
        "sources": {**{pin: f"pip package ({mod})" for pin, mod in SOURCES.items()},
                    "agent/heads_data/phrases.txt": "hand-written lists"},
        "system_prompt": "agent.config.DEFAULT_SYSTEM_PROMPT" if cfg.system_prompt else "",
        "texts": dict(Counter(s.split for s in seqs)),
        "samples": {split: dict(zip(LABELS, torch.bincount(part.label, minlength=3).tolist()))
                    for split, part in (("train", train_set), ("eval", eval_set))},
        "seconds": {"features": round(extract_s, 1), "fit": round(fit_s, 1), "total": round(time.monotonic() - t0, 1)},
        "eval": {"macro_f1": round(report["macro_f1"], 4), "accuracy": round(report["accuracy"], 4),
                 "classes": {k: {m: round(v, 4) for m, v in c.items()} for k, c in report["classes"].items()},
                 "confusion": report["confusion"]},
    }
    head.meta = {"llm": llm_name, "hidden_size": llm.hidden_size, "feature_version": FEATURE_VERSION,
                 "trained": card["trained"], "macro_f1": card["eval"]["macro_f1"]}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    head.save(out_dir / f"{llm_name}.safetensors")
    (out_dir / f"{llm_name}.card.json").write_text(json.dumps(card, indent=1) + "\n")
    log(f"{llm_name}: wrote {out_dir / llm_name}.safetensors; eval macro-F1 {report['macro_f1']:.3f}; "
        f"features {extract_s:.0f} s, fit {fit_s:.0f} s, total {card['seconds']['total']:.0f} s")
    card["report"] = report
    return card


def evaluate_shipped(llm_name: str, cache_dir: Path | None = None, sizes: Sizes = Sizes(), seed: int = 0,
                     log: Callable[[str], None] = print) -> dict:
    """The shipped head's figures on the held-out split (features from the cache when present)."""
    from agent import models
    from agent.config import config_from
    from agent.llm import ChatLLM

    cfg = config_from()
    cache_dir = Path(cache_dir or cfg.cache_dir)
    seqs = [s for s in dataset(sizes, seed)]
    llm = ChatLLM(models.ensure(cache_dir, llm_name), cfg.torch_threads, "dual")
    feats, _ = cached_features(llm, llm_name, cfg.system_prompt, seqs, cache_dir, log)
    return evaluate(StateHead.load(llm_name), feats.select("eval"))


def compare_fast(llm_name: str, taps: int = 400, seed: int = 0, log: Callable[[str], None] = print) -> list[dict]:
    """``compare_fast_on`` cut-ins and then samples heard while the agent is
    silent, with the model loaded once."""
    from agent import models
    from agent.config import config_from
    from agent.llm import ChatLLM

    cfg = config_from()
    llm = ChatLLM(models.ensure(cfg.cache_dir, llm_name), cfg.torch_threads, "dual-int8")
    head = StateHead.load(llm_name)
    return [compare_fast_on(llm, head, llm_name, cfg.system_prompt, taps, seed, listening, log)
            for listening in (False, True)]


def compare_fast_on(llm, head: StateHead, llm_name: str, system_prompt: str, taps: int = 400, seed: int = 0,
                    listening: bool = False, log: Callable[[str], None] = print) -> dict:
    """The shipped head's verdicts on held-out cut-ins (samples said over the
    agent) computed three ways, one sample at a time after a warm cache, as the
    session's judge does: all as the head was trained (``extend``); the cut-in's
    words through the int8 decoding copies (``extend(fast=True)``); and the
    agent's words before them too (the warm-up made fast). ``taps`` samples drawn
    at random; the time of the cut-in's words by tokens computed.
    ``listening``: samples said while the agent is silent instead, two ways (as
    trained; the words in int8 on every prefill thread, as the session hears them)."""
    import statistics

    from agent.llm import PrefixCache

    rows = [(s, t) for s in dataset() if s.split == "eval" and bool(s.context.agent_reply) != listening
            for t in s.taps]
    random.Random(seed).shuffle(rows)
    rows = rows[:taps]
    ways = ("trained", "words") if listening else ("trained", "words", "all")
    threads = llm.prefill_threads if listening else None
    warm: dict[tuple[tuple[int, ...], bool], PrefixCache] = {}
    same = Counter()
    right = Counter()
    ms: dict[str, dict[int, list[float]]] = {way: defaultdict(list) for way in ways}
    for n, (s, t) in enumerate(rows):
        msgs = _messages(system_prompt, s.context)
        start = head_prompt_ids(llm.tokenizer, msgs, "", s.context.agent_reply)
        for reply_fast in (False,) if listening else (False, True):
            if (tuple(start), reply_fast) not in warm:
                cache = warm[tuple(start), reply_fast] = PrefixCache()
                if not listening:
                    llm.extend(cache, llm.prompt_ids(msgs))  # the reply's prompt, computed as trained
                llm.extend(cache, start, fast=reply_fast)  # then the agent's words (listening: the user's turn opens)
        ids = head_prompt_ids(llm.tokenizer, msgs, s.text[:t.n_chars], s.context.agent_reply)
        labels = {}
        for way in (ways if n % 2 else ways[::-1]):  # alternate: no way always runs first
            cache = warm[tuple(start), way == "all"].copy()
            t0 = time.perf_counter()
            k = llm.extend(cache, ids, fast=way != "trained", threads=threads)
            ms[way][k].append((time.perf_counter() - t0) * 1000)
            labels[way] = decide_label(head.probs(cache.hidden[None], timing_vector(t.timing)[None])[0].tolist())
            right[way] += labels[way] == LABELS[t.label]
        for way in ways[1:]:
            same[way] += labels[way] == labels["trained"]
            if labels[way] != labels["trained"]:
                log(f"  {s.text[:t.n_chars]!r} ({LABELS[t.label]}): {labels['trained']} as trained, "
                    f"{labels[way]} with {way} in int8")
    report = {"taps": len(rows), "same": dict(same), "right": dict(right),
              "ms_p50": {way: {k: statistics.median(v) for k, v in sorted(by.items())} for way, by in ms.items()}}
    if listening:
        log(f"{llm_name}, {len(rows)} samples heard while the agent is silent: verdicts as trained with the words "
            f"in int8 {same['words']}; right: {right['trained']} as trained, {right['words']}")
    else:
        log(f"{llm_name}, {len(rows)} cut-ins: verdicts as trained with the words in int8 {same['words']}, with the "
            f"agent's words too {same['all']}; right: {right['trained']} as trained, {right['words']}, {right['all']}")
    for k in sorted(ms["words"]):
        log(f"  {k} tokens: as trained {report['ms_p50']['trained'][k]:.0f} ms, int8 {report['ms_p50']['words'][k]:.0f} ms"
            f" (p50 of {len(ms['words'][k])})")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train-heads", description="Train the state heads on the frozen LLM.")
    p.add_argument("--llm", choices=LLMS, default=None, help="the LLM whose head to train (default: the configured one)")
    p.add_argument("--all", action="store_true", help="train a head for every LLM")
    p.add_argument("--out", type=Path, default=HEADS_DIR, help="where the weights and card go")
    p.add_argument("--eval", action="store_true", help="print per-class figures on the held-out split")
    p.add_argument("--eval-only", action="store_true", help="evaluate the shipped head, train nothing")
    p.add_argument("--compare-fast", type=int, metavar="N", default=0,
                   help="the shipped head's verdicts on N held-out cut-ins and N samples heard while the agent is silent, "
                        "computed as trained and in int8, one at a time")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from agent.config import config_from

    names = LLMS if args.all else (args.llm or config_from().llm,)
    for name in names:
        if args.compare_fast:
            compare_fast(name, args.compare_fast, args.seed)
            continue
        if args.eval_only:
            report = evaluate_shipped(name, seed=args.seed)
        else:
            report = train(name, args.out, seed=args.seed)["report"]
        if args.eval or args.eval_only:
            print(f"\n{name}: held-out split\n{format_report(report)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
