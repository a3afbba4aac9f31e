"""The state heads: continue, interrupt or reject, read off the frozen LLM's state.

The decision rule and the prompt are checked on their own; the shipped heads
load for each LLM; the behaviour is checked on the real Qwen2.5-0.5B.
"""
import json

import pytest
import torch

from agent import models
from agent.config import DEFAULT_SYSTEM_PROMPT, config_from
from agent.heads import (LABELS, TIMING_FEATURES, StateHead, Thresholds, Timing, chunk_hidden, decide_label,
                         head_prompt_ids, timing_vector)
from agent.llm import ChatLLM, PrefixCache
from agent.train_heads import (LLMS, OPEN_ENDINGS, Context, Sequence, Sizes, Tap, build_sequences, cut_points, extract_features,
                               normalize, split_of)

SYSTEM = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
LISTENING, SPEAKING = Timing(0, 0, False), Timing(0, 0, True)


@pytest.fixture(scope="module")
def qwen():
    llm = ChatLLM(models.ensure(config_from().cache_dir, "qwen2.5-0.5b"), threads=1, dtype="dual-int8")
    return llm, StateHead.load("qwen2.5-0.5b")


# -- the decision rule -------------------------------------------------------------------------------


def test_reject_is_checked_first_then_interrupt_else_continue():
    assert decide_label((0.2, 0.2, 0.6)) == "reject"
    assert decide_label((0.1, 0.6, 0.3)) == "interrupt"
    assert decide_label((0.4, 0.35, 0.25)) == "continue"
    assert decide_label((0.5, 0.5, 0.0)) == "continue"  # strictly above the threshold


def test_thresholds_are_configurable_and_reject_still_wins():
    assert decide_label((0.1, 0.55, 0.35), Thresholds(reject=0.3)) == "reject"
    assert decide_label((0.35, 0.6, 0.05), Thresholds(interrupt=0.7)) == "continue"
    assert decide_label((0.6, 0.3, 0.1), Thresholds(interrupt=0.25)) == "interrupt"


def test_timing_vector_is_small_and_bounded():
    v = timing_vector(Timing(silence_ms=5000, speech_ms=1200, agent_speaking=True))
    assert v.shape == (TIMING_FEATURES,)
    assert v.tolist() == pytest.approx([2.0, 0.7885, 1.0, 0.0], abs=1e-3)
    assert timing_vector(Timing(0, 0, False)).tolist() == [0.0, 0.0, 0.0, 1.0]


# -- the LLM input ----------------------------------------------------------------------------------


def test_the_prompt_ends_on_the_partial_text_and_the_reply_prompt_continues_it(small_llm):
    tok = small_llm.tokenizer
    history = SYSTEM + [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]
    ids = head_prompt_ids(tok, history, "  what time is it ")
    assert tok.decode(ids).endswith("<|im_start|>user\nwhat time is it")
    reply = small_llm.prompt_ids(history + [{"role": "user", "content": "what time is it"}])
    assert reply[:len(ids)] == ids  # the reply reuses the heads' KV cache


def test_the_agents_reply_so_far_sits_before_the_user_turn_when_it_speaks(small_llm):
    tok = small_llm.tokenizer
    ids = head_prompt_ids(tok, SYSTEM, "wait", agent_reply="The museum opens at nine and")
    assert tok.decode(ids).endswith("assistant\nThe museum opens at nine and<|im_end|>\n<|im_start|>user\nwait")


def test_chunk_features_are_one_hidden_state_and_reuse_the_cache(small_llm):
    cache = PrefixCache()
    h = chunk_hidden(small_llm, cache, SYSTEM, "What is the")
    assert h.shape == (small_llm.hidden_size,) and h.dtype == torch.float32
    before = len(cache.ids)
    computed = small_llm.extend(cache, head_prompt_ids(small_llm.tokenizer, SYSTEM, "What is the capital of Peru"))
    assert computed == len(cache.ids) - before  # only the new words


def test_batched_training_features_equal_the_per_chunk_features(small_llm):
    ctx = Context((("user", "Hello there."), ("assistant", "Hi! How can I help?")))
    seqs = [Sequence(ctx, "What is the capital of Peru?", (Tap(11, 0, LISTENING, "k"), Tap(28, 1, LISTENING, "k")), "train"),
            Sequence(ctx, "Mm-hmm.", (Tap(7, 2, SPEAKING, "k"),), "eval")]
    feats = extract_features(small_llm, DEFAULT_SYSTEM_PROMPT, seqs, log=lambda _: None)
    assert feats.hidden.shape == (3, small_llm.hidden_size) and feats.split == ["train", "train", "eval"]
    msgs = SYSTEM + [{"role": r, "content": t} for r, t in ctx.history]
    for row, text in zip(feats.hidden, ["What is the", "What is the capital of Peru?", "Mm-hmm."]):
        assert torch.allclose(row, chunk_hidden(small_llm, PrefixCache(), msgs, text), atol=2e-3)


# -- the shipped heads -----------------------------------------------------------------------------


@pytest.mark.parametrize("llm_name", LLMS)
def test_a_head_ships_for_each_llm_and_is_keyed_to_it(llm_name):
    head = StateHead.load(llm_name)
    config = models.ensure(config_from().cache_dir, llm_name) / "config.json"
    assert head.meta["llm"] == llm_name
    assert head.hidden_size == json.loads(config.read_text())["hidden_size"]
    d = head.decide(torch.zeros(head.hidden_size), Timing(300, 900, False))
    assert d.label in LABELS and sum(d.probs) == pytest.approx(1.0)


def test_a_head_refuses_another_llms_hidden_state():
    head = StateHead.load("smollm2-135m")
    with pytest.raises(ValueError, match="trained on smollm2-135m"):
        head.decide(torch.zeros(896), LISTENING)
    with pytest.raises(FileNotFoundError, match="train one"):
        StateHead.load("gpt-9")


def test_a_saved_head_loads_back_identical(tmp_path):
    head = StateHead(16, meta={"llm": "toy"})
    torch.nn.init.normal_(head.members[0].proj.weight)
    head.save(tmp_path / "toy.safetensors")
    back = StateHead.load("toy", tmp_path)
    h, t = torch.randn(5, 16), torch.rand(5, TIMING_FEATURES)
    assert torch.equal(head.probs(h, t), back.probs(h, t))


# -- the training set --------------------------------------------------------------------------------


def test_prefixes_are_cut_mid_clause_only():
    text = "Good morning, how are you?"
    assert [text[:n] for n in cut_points(text)] == ["Good", "Good morning, how", "Good morning, how are"]


def test_held_out_text_is_never_trained_on_and_labels_follow_the_spec():
    lines = [f"Can you tell me about the number {w} please?" for w in
             "one two three four five six seven eight nine ten eleven twelve thirteen fourteen".split()] * 2
    lines += [f"I really like the color {c} a lot." for c in "red blue green pink gray black white gold".split()]
    pairs = list(zip(lines[::2], lines[1::2]))
    phrases = {"backchannel": ["yeah", "mm-hmm", "right", "okay", "sure"], "filler": ["um", "uh"],
               "noise": ["Thank you.", "[BLANK_AUDIO]", "(coughing)"], "cutin": ["wait", "stop", "no, stop"],
               "opener": ["Actually,", "Sorry,", "Wait,", "No,", "But"]}
    sizes = Sizes(chatterbot=10, seinfeld=5, trailing=5, open_marked=5, spoken_over=6, phrase_contexts=2, contexts=4)
    seqs = build_sequences(sorted(set(lines)), pairs, ["What a lovely day it is today."], phrases, sizes)
    texts = {split: {normalize(s.text) for s in seqs if s.split == split} for split in ("train", "eval")}
    assert texts["train"] and not texts["train"] & texts["eval"]
    for s in seqs:
        for t in s.taps:
            if t.kind == "speak/backchannel":
                assert t.label == 2 and t.timing.agent_speaking
            if t.kind == "listen/whole + silence":
                assert t.label == 1 and t.timing.silence_ms >= 240
            if t.kind == "listen/mid-phrase":
                assert t.label == 0 and s.text[:t.n_chars].split()[-1].lower() in OPEN_ENDINGS
            if t.kind == "listen/open end + stop":  # "... the name of?": Whisper's mark, still not over
                assert t.label == 0 and s.text[:t.n_chars].split()[-1].lower().rstrip("?.!") in OPEN_ENDINGS
        for role, text in s.context.history:
            assert split_of(text) == s.split  # contexts come from the sample's own split


def test_a_pinned_phrase_is_always_trained_on():
    lines = [f"Can you tell me about the number {w} please?" for w in
             "one two three four five six seven eight nine ten eleven twelve thirteen fourteen".split()]
    lines += [f"I really like the color {c} a lot." for c in "red blue green pink gray black white gold".split()]
    phrases = {"backchannel": ["yeah"], "filler": ["um"], "noise": ["Thank you."], "cutin": ["stop", "wait"],
               "opener": ["Stop.", "Actually,"]}
    sizes = Sizes(chatterbot=4, seinfeld=1, trailing=2, open_marked=2, spoken_over=4, phrase_contexts=2, contexts=2)
    assert split_of("stop") == "eval"  # by its hash it would be held out
    pairs = list(zip(lines[::2], lines[1::2]))
    for pinned, split in ((frozenset(), "eval"), (frozenset({"stop"}), "train")):
        seqs = build_sequences(lines, pairs, ["What a lovely day it is today."], phrases, sizes, pinned=pinned)
        assert {s.split for s in seqs if normalize(s.text) == "stop"} == {split}


# -- behaviour on the real model ---------------------------------------------------------------------


def decide(qwen, text: str, timing: Timing, agent_reply: str | None = None, fast: bool = False) -> str:
    """``fast``: as a cut-in is judged: the prompt up to the user's words warmed
    first, then only the words computed, through the int8 decoding copies."""
    llm, head = qwen
    history = SYSTEM + [{"role": "user", "content": "Hi, I'm planning a trip to the city."}] + \
        ([] if agent_reply else [{"role": "assistant", "content": "Nice! How can I help with your trip?"}])
    cache = PrefixCache()
    if fast:
        chunk_hidden(llm, cache, history, "", agent_reply)
    return head.decide(chunk_hidden(llm, cache, history, text, agent_reply, fast=fast), timing).label


REPLY = "The museum opens at nine in the morning, and on Sundays it stays open until"


def test_a_finished_question_followed_by_silence_ends_the_turn(qwen):
    assert decide(qwen, "What time does the museum open tomorrow?", Timing(400, 2200, False)) == "interrupt"


def test_a_phrase_cut_mid_clause_keeps_the_agent_listening(qwen):
    assert decide(qwen, "Can you tell me how to get to the", Timing(300, 1800, False)) == "continue"


@pytest.mark.parametrize("fast", [False, True], ids=["as-trained", "int8-words"])
def test_a_backchannel_while_the_agent_speaks_is_ignored(qwen, fast):
    assert decide(qwen, "Mm-hmm.", Timing(200, 400, True), REPLY, fast) == "reject"


@pytest.mark.parametrize("fast", [False, True], ids=["as-trained", "int8-words"])
def test_wait_stop_while_the_agent_speaks_interrupts_it(qwen, fast):
    assert decide(qwen, "Wait, stop.", Timing(100, 700, True), REPLY, fast) == "interrupt"
