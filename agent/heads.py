"""State heads on the frozen LLM (after Freeze-Omni): continue, interrupt or reject.

On every chunk of user speech the session shows the LLM the conversation so far
and the user's partial transcript, as the start of a user turn:

    <system, history>[<|im_start|>assistant\\n<reply heard so far><|im_end|>\\n]<|im_start|>user\\n<partial text>

and reads the last-layer hidden state at the last token of the partial text
(``PrefixCache.hidden`` after ``ChatLLM.extend``). A small MLP maps that state,
joined with what the engine knows about timing, to three classes:

- continue: keep listening (the user is mid-phrase, or only just stopped);
- interrupt: act now: the user's turn is over (answer it), or the user is
  cutting in while the agent speaks (stop the agent);
- reject: ignore: noise, a backchannel, a filler, the agent's own echo.

Decision rule (Freeze-Omni's): p(reject) > 0.5 first, then p(interrupt) > 0.5,
else continue; both thresholds are configurable. The LLM stays frozen: only the
head is trained (agent/train_heads.py), and a head is keyed to the LLM whose
states it was trained on; its weights ship in agent/heads_data/.

The prompt ends where the reply prompt of the same turn continues (the reply's
``prompt_ids`` has the finished user text, then ``<|im_end|>``), so the KV cache
the heads fill is the one the reply reuses.
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

LABELS = ("continue", "interrupt", "reject")
CONTINUE, INTERRUPT, REJECT = range(3)
HEADS_DIR = Path(__file__).resolve().parent / "heads_data"
TIMING_FEATURES = 4
_CUT = "\x00"  # marks the end of the partial text in the rendered template


def normalize(text: str) -> str:
    """Lowercase words only: what makes two texts 'the same text' (the training
    split; a transcript matched against the phrase lists)."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower().replace("’", "'")))


def load_phrases(path: Path = HEADS_DIR / "phrases.txt") -> tuple[dict[str, list[str]], frozenset[str]]:
    """The hand-written phrase lists: (phrases by section, the normalized phrases
    marked "+ ": always trained on)."""
    out: dict[str, list[str]] = defaultdict(list)
    pinned = set()
    section = None
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.fullmatch(r"== (\w+) ==", line):
            section = m.group(1)
            continue
        if line.startswith("+ "):
            line = line[2:].strip()
            pinned.add(normalize(line))
        out[section].append(line)
    return dict(out), frozenset(pinned)


@dataclass(frozen=True)
class Timing:
    """What the engine knows about the chunk besides the words."""

    silence_ms: float  # since the user's last voiced frame; 0 while the user speaks
    speech_ms: float  # voiced audio in the user's current turn (or cut-in)
    agent_speaking: bool  # the agent's voice is playing now


@dataclass(frozen=True)
class Thresholds:
    reject: float = 0.5
    interrupt: float = 0.5


@dataclass(frozen=True)
class Decision:
    label: str  # one of LABELS
    probs: tuple[float, float, float]  # in LABELS order

    def p(self, label: str) -> float:
        return self.probs[LABELS.index(label)]

    def by_label(self) -> dict[str, float]:
        """The probabilities as events carry them: label -> p, to 3 decimals."""
        return {k: round(float(p), 3) for k, p in zip(LABELS, self.probs)}


def decide_label(probs, thresholds: Thresholds = Thresholds()) -> str:
    """Freeze-Omni's rule: reject first, then interrupt, else continue."""
    if probs[REJECT] > thresholds.reject:
        return "reject"
    if probs[INTERRUPT] > thresholds.interrupt:
        return "interrupt"
    return "continue"


def timing_vector(t: Timing) -> torch.Tensor:
    """[TIMING_FEATURES] float32, each of order 1: silence (s, capped at 2), the
    log of speech (s), agent speaking (0/1), and 'the user is still speaking'."""
    silence = min(max(t.silence_ms, 0.0), 2000.0) / 1000
    speech = math.log1p(max(t.speech_ms, 0.0) / 1000)
    return torch.tensor([silence, speech, float(t.agent_speaking), float(t.silence_ms <= 0)])


# -- the LLM input -------------------------------------------------------------------------------


def head_prompt_ids(tokenizer, messages: list[dict], partial_text: str, agent_reply: str | None = None) -> list[int]:
    """Token ids of the heads' prompt: ``messages`` (system + history), then the
    agent's reply so far when it is speaking (``agent_reply``: the words played
    or being played), then a user turn holding ``partial_text``, cut right after
    its last token (no end-of-turn token: the turn is still open)."""
    turn = list(messages)
    if agent_reply:
        turn.append({"role": "assistant", "content": agent_reply.strip()})
    turn.append({"role": "user", "content": partial_text.strip() + _CUT})
    text = tokenizer.apply_chat_template(turn, tokenize=False)
    return tokenizer(text[:text.rindex(_CUT)], add_special_tokens=False)["input_ids"]


def chunk_hidden(llm, cache, messages: list[dict], partial_text: str, agent_reply: str | None = None,
                 fast: bool = False) -> torch.Tensor:
    """Model worker thread: extend ``cache`` (a ``PrefixCache``) to the heads'
    prompt and return the hidden state at its last token, [hidden_size] float32.

    Only the tokens after the common prefix are computed: from one chunk to the
    next that is the revised end of the partial text. ``fast``: see ``ChatLLM.extend``.
    """
    llm.extend(cache, head_prompt_ids(llm.tokenizer, messages, partial_text, agent_reply), fast=fast)
    return cache.hidden


# -- the head --------------------------------------------------------------------------------------


class _Member(torch.nn.Module):
    """One small classifier: standardized hidden state -> a few linear 'semantic'
    features (a narrow bottleneck: with a few thousand samples a wide layer
    learns the training texts by heart) -> joined with the timing vector ->
    small MLP -> 3 logits."""

    def __init__(self, hidden_size: int, bottleneck: int, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, bottleneck)
        self.fc1 = torch.nn.Linear(bottleneck + TIMING_FEATURES, width)
        self.fc2 = torch.nn.Linear(width, len(LABELS))

    def forward(self, h: torch.Tensor, timing: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(torch.cat([self.proj(h), timing], dim=-1))))


class StateHead(torch.nn.Module):
    """A few independently initialized members whose probabilities are averaged:
    one member's errors on rare kinds of sample (a backchannel over the agent)
    swing from one random seed to the next; their average does not."""

    def __init__(self, hidden_size: int, bottleneck: int = 8, width: int = 32, meta: dict | None = None,
                 members: int = 5):
        super().__init__()
        self.hidden_size = hidden_size
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("std", torch.ones(hidden_size))
        self.dropout = torch.nn.Dropout(0.5)
        self.members = torch.nn.ModuleList(_Member(hidden_size, bottleneck, width) for _ in range(members))
        self.shape = {"bottleneck": bottleneck, "width": width, "members": members}
        self.meta = dict(meta or {})
        self.thresholds = Thresholds()

    def forward(self, hidden: torch.Tensor, timing: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden_size], timing [B, TIMING_FEATURES] -> logits [members, B, 3]."""
        h = (hidden - self.mean) / self.std
        return torch.stack([m(self.dropout(h), timing) for m in self.members])

    @torch.inference_mode()
    def probs(self, hidden: torch.Tensor, timing: torch.Tensor) -> torch.Tensor:
        """Batched probabilities [B, 3] in LABELS order."""
        return torch.softmax(self.eval()(hidden.float(), timing.float()), dim=-1).mean(0)

    def decide(self, hidden: torch.Tensor, timing: Timing, thresholds: Thresholds | None = None) -> Decision:
        """One chunk's decision; ``hidden`` [hidden_size] from ``chunk_hidden``. Takes well under 1 ms."""
        if hidden.shape != (self.hidden_size,):
            raise ValueError(f"hidden state of shape {tuple(hidden.shape)}; this head takes ({self.hidden_size},) "
                             f"(trained on {self.meta.get('llm', '?')})")
        p = self.probs(hidden[None], timing_vector(timing)[None])[0].tolist()
        return Decision(decide_label(p, thresholds or self.thresholds), (p[0], p[1], p[2]))

    # -- files --------------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"meta": json.dumps(self.meta), "shape": json.dumps(self.shape)})

    @classmethod
    def from_file(cls, path: Path) -> "StateHead":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            info = f.metadata()
        tensors = load_file(str(path))
        head = cls(tensors["mean"].shape[0], **json.loads(info["shape"]), meta=json.loads(info["meta"]))
        head.load_state_dict(tensors)
        return head.eval()

    @classmethod
    def load(cls, llm_name: str, directory: Path = HEADS_DIR) -> "StateHead":
        """The shipped head trained on ``llm_name``'s hidden states."""
        path = Path(directory) / f"{llm_name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no state head for LLM {llm_name!r} at {path}; "
                                    f"train one: python -m agent.train_heads --llm {llm_name}")
        head = cls.from_file(path)
        if head.meta.get("llm") != llm_name:
            raise ValueError(f"{path} was trained on {head.meta.get('llm')!r}, not {llm_name!r}")
        return head
