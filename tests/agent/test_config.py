import argparse

import pytest

from agent.config import Config, add_config_flags, config_from, config_from_args


def test_defaults_are_the_documented_ones():
    cfg = config_from(env={})
    assert cfg.chunk_ms == 160 and cfg.asr_model == "tiny.en" and cfg.llm == "qwen2.5-0.5b"
    assert cfg.chunk_samples == 2560
    assert cfg.io_ms == 20 and cfg.io_samples == 320  # audio in and out one VAD frame at a time


def test_environment_overrides_defaults_and_flags_override_environment(monkeypatch):
    monkeypatch.setenv("DUPLEX_CHUNK_MS", "80")
    monkeypatch.setenv("DUPLEX_LLM", "smollm2-135m")
    assert config_from().chunk_ms == 80
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    cfg = config_from_args(parser.parse_args(["--chunk-ms", "240"]))
    assert cfg.chunk_ms == 240 and cfg.llm == "smollm2-135m"


@pytest.mark.parametrize("field,value", [("chunk_ms", 90), ("chunk_ms", 400), ("asr_model", "large"),
                                         ("llm", "gpt"), ("vad_aggressiveness", 5),
                                         ("io_ms", 30), ("io_ms", 60), ("io_ms", 0)])
def test_bad_values_are_refused_with_the_field_named(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value})


@pytest.mark.parametrize("text,value", [("false", False), ("0", False), ("off", False), ("No", False),
                                        ("true", True), ("1", True), ("on", True), ("Yes", True)])
def test_a_switch_reads_the_same_from_a_flag_and_from_the_environment(text, value):
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    assert config_from_args(parser.parse_args(["--listen-int8", text])).listen_int8 is value
    assert config_from(env={"DUPLEX_LISTEN_INT8": text}).listen_int8 is value


def test_a_switch_set_to_anything_else_is_refused(capsys):
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--cut-in-int8", "maybe"])
    assert "invalid bool value: 'maybe'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="DUPLEX_STREAMING"):
        config_from(env={"DUPLEX_STREAMING": "fals"})


def test_an_unparseable_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="DUPLEX_CHUNK_MS"):
        config_from(env={"DUPLEX_CHUNK_MS": "fast"})


def test_config_is_immutable():
    with pytest.raises(Exception):
        Config().chunk_ms = 80


def test_every_command_explains_its_flags():
    # argparse formats help strings with %: a bare "35%" in a flag's help broke --help.
    import argparse

    from run_agent import build_parser

    def parsers(p: argparse.ArgumentParser):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    for p in parsers(build_parser()):
        assert p.format_help().startswith("usage:"), p.prog
