"""The text adapter: the user's words reach the LLM's KV cache while they speak.

Mechanics only, so the small SmolLM2-135M stands in for the chat model.
"""
import torch

from agent.llm import PrefixCache
from speech_encoder.adapter import TextAdapter, split_template
from speech_encoder.streaming import Hypothesis

SYSTEM = [{"role": "system", "content": "Be brief."}]


def fresh(llm, ids):
    cache = PrefixCache()
    llm.extend(cache, ids)
    return cache


def same_state(a: PrefixCache, b: PrefixCache) -> bool:
    return (a.ids == b.ids and a.kv.get_seq_length() == b.kv.get_seq_length() == len(a.ids)
            and torch.allclose(a.last, b.last, atol=1e-4) and torch.allclose(a.hidden, b.hidden, atol=1e-4))


def hyp(committed, tentative="", silence_ms=0, rollback=None):
    return Hypothesis(committed=committed, tentative=tentative, silence_ms=silence_ms, rollback=rollback)


def started(llm, **options) -> tuple[TextAdapter, PrefixCache]:
    """An adapter on a new cache, at the start of a user turn after SYSTEM."""
    cache = PrefixCache()
    adapter = TextAdapter(llm, cache, **options)
    adapter.begin(SYSTEM)
    return adapter, cache


def ids_after_head(llm, text: str) -> list[int]:
    """Token ids of the template's head (SYSTEM, then the user's turn) followed by ``text``."""
    head, _ = split_template(llm, SYSTEM)
    return llm.tokenizer.encode(head + text, add_special_tokens=False)


def test_the_template_is_split_around_the_users_text(small_llm):
    head, tail = split_template(small_llm, SYSTEM)
    assert head.endswith("user\n") and "Be brief." in head
    assert tail.startswith("<|im_end|>") and tail.rstrip().endswith("assistant")


def test_finalize_leaves_exactly_the_prompt_the_session_would_build(small_llm):
    adapter, cache = started(small_llm)
    for h in [hyp("", "What"), hyp("What", " is the"), hyp("What is the", " capital of France?")]:
        adapter.update(h)
    adapter.finalize("What is the capital of France?")
    expected = small_llm.prompt_ids(SYSTEM + [{"role": "user", "content": "What is the capital of France?"}])
    assert cache.ids == expected
    assert same_state(cache, fresh(small_llm, expected))
    assert small_llm.extend(cache, expected) == 0  # the session's own prefill then costs nothing


def test_after_a_revised_tentative_tail_and_a_rollback_the_cache_equals_a_fresh_prefill(small_llm):
    adapter, cache = started(small_llm)
    adapter.update(hyp("Book a table", " for four people"))
    adapter.update(hyp("Book a table for", " for people"))  # the tentative tail changed
    adapter.update(hyp("", "Look", rollback=0))  # everything withdrawn
    adapter.update(hyp("Look at the", " trains in Rome"))
    assert same_state(cache, fresh(small_llm, ids_after_head(small_llm, "Look at the trains in Rome")))


def test_growing_text_costs_only_its_new_tokens_and_little_is_left_at_the_end(small_llm):
    adapter, cache = started(small_llm, tentative=False)
    words = "I would like to book a table for four people tomorrow evening".split()
    costs = [adapter.update(hyp(" ".join(words[:i]))).tokens for i in range(1, len(words) + 1)]
    assert max(costs) <= 3  # one word at a time
    end = adapter.finalize(" ".join(words))
    _, tail = split_template(small_llm, SYSTEM)
    assert end.tokens <= len(small_llm.tokenizer.encode(tail, add_special_tokens=False)) + 1


def test_a_pause_speculates_the_end_of_the_turn_so_nothing_is_left_to_prefill(small_llm):
    adapter, cache = started(small_llm, end_guess_ms=200)
    adapter.update(hyp("Is it going", " to rain"))
    adapter.update(hyp("Is it going to", " rain today?", silence_ms=240))
    assert adapter.finalize("Is it going to rain today?").tokens == 0
    # A pause that was not the end: the speculated tail is rolled back when speech goes on.
    adapter.update(hyp("Is it going to rain today? And", " tomorrow"))
    assert same_state(cache, fresh(small_llm, ids_after_head(small_llm, "Is it going to rain today? And tomorrow")))


def test_the_state_after_the_last_word_is_kept_for_the_heads_with_the_end_speculated(small_llm):
    adapter, cache = started(small_llm, end_guess_ms=60)
    adapter.update(hyp("Is it going", " to rain"))
    adapter.update(hyp("Is it going to", " rain today?", silence_ms=100))  # words and the prompt's end: one pass
    _, tail = split_template(small_llm, SYSTEM)
    # The state after "today", before Whisper's "?" (a guess at the edge of its window).
    words = fresh(small_llm, ids_after_head(small_llm, "Is it going to rain today"))
    assert torch.allclose(adapter.hidden, words.hidden, atol=1e-4)
    assert cache.ids == ids_after_head(small_llm, "Is it going to rain today?" + tail)
    # Nothing new heard: no work, and the state is still there.
    assert adapter.update(hyp("Is it going to", " rain today?", silence_ms=260)).tokens == 0
    assert torch.allclose(adapter.hidden, words.hidden, atol=1e-4)
    # The words shrink (a revision): the state is that of the shorter text.
    adapter.update(hyp("Is it going", "", silence_ms=300))
    shorter = fresh(small_llm, ids_after_head(small_llm, "Is it going"))
    assert torch.allclose(adapter.hidden, shorter.hidden, atol=1e-4)


def test_with_int8_the_words_go_through_the_int8_copies_on_every_thread_and_the_head_as_trained(dual_and_int8):
    """The user's words (and the template's tail) take the int8 copies the reply
    decodes with, on every prefill thread (the agent is silent: nothing else
    computes); the system prompt and history stay as the heads were trained."""
    dual, int8 = dual_and_int8
    heads, hidden, ids = [], [], []
    for llm, options in ((dual, {}), (int8, {"int8": True})):
        adapter, cache = started(llm, **options)
        heads.append(cache.last)
        adapter.update(hyp("What is the", " capital of France?"))
        assert torch.get_num_threads() == 2 and not llm.decode_switch.on
        hidden.append(adapter.hidden)
        adapter.finalize("What is the capital of France?")
        ids.append(cache.ids)
    assert torch.equal(heads[0], heads[1])  # the head: as trained
    assert not torch.equal(hidden[0], hidden[1])  # the words: int8
    assert torch.nn.functional.cosine_similarity(hidden[0], hidden[1], dim=0) > 0.9  # ... and still the same words
    assert ids[0] == ids[1] == dual.prompt_ids(SYSTEM + [{"role": "user", "content": "What is the capital of France?"}])
