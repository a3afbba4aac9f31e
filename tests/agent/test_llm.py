"""The prefix cache: reuse and rollback give what a fresh prefill gives.

Mechanics only, so the small SmolLM2-135M stands in for the chat model.
"""
import threading

import pytest
import torch

from agent.llm import PrefixCache, common_prefix


def fresh_logits(llm, ids):
    cache = PrefixCache()
    llm.extend(cache, ids)
    return llm.logits(cache)


def chat(llm, *turns):
    msgs = [{"role": "system", "content": "Be brief."}]
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return llm.prompt_ids(msgs)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0


def test_extending_a_cached_prompt_computes_only_the_new_tokens_and_matches_a_fresh_prefill(small_llm):
    first = chat(small_llm, "Hello there.")
    second = chat(small_llm, "Hello there.", "Hi!", "What is two plus two?")
    cache = PrefixCache()
    assert small_llm.extend(cache, first) == len(first)
    computed = small_llm.extend(cache, second)
    assert computed == len(second) - common_prefix(first, second)
    assert torch.allclose(small_llm.logits(cache), fresh_logits(small_llm, second), atol=1e-4)


def test_rolling_back_to_a_revised_prefix_equals_a_fresh_prefill(small_llm):
    a = chat(small_llm, "Tell me about the weather in Paris today please.")
    b = chat(small_llm, "Tell me about the trains in Rome.")
    cache = PrefixCache()
    small_llm.extend(cache, a)
    small_llm.extend(cache, b)
    assert cache.kv.get_seq_length() == len(b)
    assert torch.allclose(small_llm.logits(cache), fresh_logits(small_llm, b), atol=1e-4)


def test_generation_streams_text_keeps_the_cache_consistent_and_stops_on_cancel(small_llm):
    ids = chat(small_llm, "Count from one to ten.")
    cache = PrefixCache()
    small_llm.extend(cache, ids)
    pieces = list(small_llm.generate(cache, 12, threading.Event()))
    assert pieces and all(isinstance(p, str) for p in pieces)
    assert cache.ids[:len(ids)] == ids and cache.kv.get_seq_length() == len(cache.ids)
    stop = threading.Event()
    stop.set()
    assert list(small_llm.generate(cache, 12, stop)) == []


def test_int8_decoding_leaves_every_other_forward_as_it_was_and_still_speaks(dual_and_int8):
    """dual-int8 quantizes only the reply's token-by-token forwards: the hidden
    states the state heads read (prefills, short extends) are those of "dual"."""
    dual, int8 = dual_and_int8
    ids = chat(dual, "Name three colours.")
    states, after = [], []
    for llm in (dual, int8):
        cache = PrefixCache()
        llm.extend(cache, ids[:-3])
        llm.extend(cache, ids)  # three rows: the bf16 path of a short extend
        states.append(cache.hidden)
        pieces = list(llm.generate(cache, 10, threading.Event()))
        assert "".join(pieces).strip()
        assert not llm.decode_switch.on  # off again between and after the reply's forwards
        after.append(cache.logits)
    assert torch.equal(states[0], states[1])
    assert not torch.equal(after[0], after[1])  # ... while the reply's own forwards did run in int8


def test_a_fast_extend_takes_the_int8_copies_only_where_the_model_has_them(dual_and_int8):
    """A cut-in's words (``extend(fast=True)``) go through the reply's int8 copies
    under dual-int8, and leave the switch off; under "dual" fast changes nothing."""
    dual, int8 = dual_and_int8
    ids = chat(dual, "Name three colours.")
    hidden = {}
    for name, llm in (("dual", dual), ("int8", int8)):
        for fast in (False, True):
            cache = PrefixCache()
            llm.extend(cache, ids[:-3])
            assert llm.extend(cache, ids, fast=fast) == 3
            assert not llm.decode_switch.on
            # One thread only for the int8 rows; without them, an ordinary extend's threads.
            assert torch.get_num_threads() == (1 if fast and name == "int8" else 2)
            hidden[name, fast] = cache.hidden
    assert torch.equal(hidden["dual", True], hidden["dual", False])
    assert torch.equal(hidden["int8", False], hidden["dual", False])
    assert not torch.equal(hidden["int8", True], hidden["int8", False])
    # int8 rounding, not another computation: the state still points the same way.
    assert torch.nn.functional.cosine_similarity(hidden["int8", True], hidden["int8", False], dim=0) > 0.9


def test_a_copied_cache_is_independent_of_its_original(small_llm):
    base = chat(small_llm, "Hello there.")
    original = PrefixCache()
    small_llm.extend(original, base)
    before = small_llm.logits(original).clone()
    copied = original.copy()
    small_llm.extend(copied, chat(small_llm, "Something else entirely, please."))
    assert original.ids == base and original.kv.get_seq_length() == len(base)
    assert torch.equal(small_llm.logits(original), before)
    small_llm.extend(original, base + [copied.ids[-1]])  # the original still extends as a fresh prefill would
    assert torch.allclose(small_llm.logits(original), fresh_logits(small_llm, base + [copied.ids[-1]]), atol=1e-4)


def test_every_session_starts_from_one_prefill_of_the_system_prompt(small_llm):
    from agent.config import Config
    from agent.engine import Engine

    engine = Engine(Config(), None, small_llm, None)
    try:
        system = [{"role": "system", "content": "Be brief."}]
        first = engine.system_prefix("Be brief.")
        prompt = small_llm.prompt_ids(system + [{"role": "user", "content": "Hi."}])
        assert small_llm.extend(first, prompt) < len(prompt)  # the system prompt was there already
        into = PrefixCache()
        second = engine.system_prefix("Be brief.", into=into)
        assert second is into and into.ids == small_llm.prompt_ids(system)  # untouched by the first session
        assert torch.allclose(small_llm.logits(into), fresh_logits(small_llm, into.ids), atol=1e-4)
        assert list(engine._prefixes) == ["Be brief."]
    finally:
        engine.close()


def test_a_dual_precision_layer_computes_what_its_linear_computes_for_any_input_layout():
    # Tiny random weights: mechanics only.
    from agent.llm import DualPrecisionLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    layer = DualPrecisionLinear(linear, max_rows_bf16=4)
    for rows in (1, 3, 9):  # bf16 rows, and float32 beyond max_rows_bf16
        x = torch.randn(1, rows + 2, 64)[:, -rows:, :]  # the last positions, as the output head gets them
        y = layer(x)
        assert y.shape == (1, rows, 96)
        assert torch.allclose(y, linear(x.contiguous()), atol=0.05, rtol=0.02)


def test_a_bf16_prefill_gives_the_state_heads_the_hidden_states_of_float32():
    """Where the CPU multiplies bf16 natively, "dual" prefills in bf16 and keeps no
    float32 copies; the last-layer states the heads read stay within a few percent
    of float32's, whatever the number of rows."""
    from agent import models
    from agent.config import config_from
    from agent.llm import ChatLLM, DualPrecisionLinear

    path = models.ensure(config_from().cache_dir, "smollm2-135m")
    exact, fast = ChatLLM(path, threads=2, dtype="float32"), ChatLLM(path, threads=2, dtype="dual", bf16_prefill=True)
    layers = [m for m in fast.model.modules() if isinstance(m, DualPrecisionLinear)]
    assert layers and all(m.weight is None for m in layers)
    ids = chat(exact, "Name three colours, and say which one you like best.")
    for cut in (1, 3, 12):  # one row, a short extend, a prefill
        states = []
        for llm in (exact, fast):
            cache = PrefixCache()
            llm.extend(cache, ids[:-cut])
            llm.extend(cache, ids)
            states.append(cache.hidden)
        assert float((states[0] - states[1]).norm() / states[0].norm()) < 0.03
