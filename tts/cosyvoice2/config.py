"""Hyperparameters of an official CosyVoice 2 model directory.

The official ``cosyvoice2.yaml`` is HyperPyYAML: object tags (``!new:``, ``!name:``,
``!apply:``) and references (``!ref <key>``, possibly inside arithmetic such as
``!ref <chunk_size> * <token_mel_ratio>``).  We only need numbers, so a PyYAML loader
turns every tagged mapping into a plain dict (class path under ``"_class"``), drops
``!apply:`` side effects (the official file reseeds global RNGs there), and resolves
references against the top-level keys.  Nothing is imported from the upstream package.
"""
from __future__ import annotations

import ast
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REQUIRED_FILES = ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt",
                  "CosyVoice-BlankEN/config.json")


class ModelDirError(FileNotFoundError):
    """The model directory lacks files (or entries) inference needs."""


@dataclass(frozen=True)
class _Ref:
    expr: str  # e.g. "<chunk_size> * <token_mel_ratio>"


@dataclass(frozen=True)
class _Apply:
    target: str


def _loader() -> type:
    # A fresh Loader subclass per call keeps the constructors off yaml.SafeLoader itself.
    class Loader(yaml.SafeLoader):
        pass

    def multi(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
        if suffix.startswith("apply:"):
            return _Apply(suffix[len("apply:"):])
        if isinstance(node, yaml.MappingNode):
            out = loader.construct_mapping(node, deep=True)
            out = dict(out)
        elif isinstance(node, yaml.SequenceNode):
            out = {"_args": loader.construct_sequence(node, deep=True)}
        else:
            out = {}
        out["_class"] = suffix.split(":", 1)[-1]
        return out

    def ref(loader: yaml.SafeLoader, node: yaml.Node) -> _Ref:
        return _Ref(loader.construct_scalar(node))

    Loader.add_multi_constructor("!", multi)
    Loader.add_constructor("!ref", ref)
    return Loader


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv}


def _arith(expr: str) -> Any:
    """Evaluate a numeric expression made of literals and + - * / // only."""
    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"unsupported expression in yaml !ref: {expr!r}")
    return ev(ast.parse(expr, mode="eval"))


def _resolve(value: Any, top: dict) -> Any:
    if isinstance(value, _Ref):
        names = re.findall(r"<([^>]+)>", value.expr)
        if len(names) == 1 and value.expr.strip() == f"<{names[0]}>":
            return _resolve(top[names[0]], top)  # plain reference: keep the type
        expr = value.expr
        for name in names:
            expr = expr.replace(f"<{name}>", repr(_resolve(top[name], top)))
        return _arith(expr)
    if isinstance(value, dict):
        return {k: _resolve(v, top) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top) for v in value]
    return value


def parse_hyperpyyaml(text: str) -> dict:
    """Parse HyperPyYAML text into plain dicts/lists/numbers (see module doc)."""
    raw = yaml.load(text, Loader=_loader())  # noqa: S506 - our Loader is SafeLoader-based
    raw = {k: v for k, v in raw.items() if not isinstance(v, _Apply)}
    return _resolve(raw, raw)


@dataclass(frozen=True)
class LLMConfig:
    input_size: int          # Qwen hidden size fed by the embeddings
    output_size: int         # Qwen hidden size read by llm_decoder
    speech_token_size: int   # 6561; EOS = +0, unused = +1, FILL = +2
    mix_ratio: tuple[int, int]  # (text, speech) tokens per bistream group: (5, 15)


@dataclass(frozen=True)
class FlowConfig:
    input_size: int
    output_size: int         # mel bins (80)
    spk_embed_dim: int
    vocab_size: int
    token_mel_ratio: int     # mel frames per speech token (2)
    pre_lookahead_len: int   # lookahead tokens (3)
    enc_heads: int
    enc_linear_units: int
    enc_num_blocks: int
    enc_chunk_size: int      # static chunk size in tokens (25)
    cfm_in_channels: int
    cfm_spk_emb_dim: int
    cfg_rate: float          # inference classifier-free guidance rate (0.7)
    t_scheduler: str
    dec_in_channels: int
    dec_out_channels: int
    dec_channels: tuple[int, ...]
    dec_head_dim: int
    dec_n_blocks: int
    dec_num_mid_blocks: int
    dec_num_heads: int
    dec_act_fn: str
    dec_chunk_size: int      # static chunk size in mel frames (50)


@dataclass(frozen=True)
class HiFTConfig:
    in_channels: int
    base_channels: int
    nb_harmonics: int
    sampling_rate: int
    nsf_alpha: float
    nsf_sigma: float
    nsf_voiced_threshold: float
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    n_fft: int
    hop_len: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    source_resblock_kernel_sizes: tuple[int, ...]
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    lrelu_slope: float
    audio_limit: float
    f0_cond_channels: int

    @property
    def samples_per_frame(self) -> int:
        """Waveform samples per mel frame (480 at 24 kHz)."""
        n = self.hop_len
        for r in self.upsample_rates:
            n *= r
        return n


@dataclass(frozen=True)
class ModelConfig:
    sample_rate: int
    token_frame_rate: int
    llm: LLMConfig
    flow: FlowConfig
    hift: HiFTConfig
    qwen: dict  # CosyVoice-BlankEN/config.json as loaded


def check_model_dir(model_dir: Path) -> None:
    """Raise one ModelDirError naming every missing required file."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"CosyVoice 2 model directory not found: {model_dir}")
    missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
    if missing:
        raise ModelDirError(f"CosyVoice 2 model directory {model_dir} is incomplete; "
                            f"missing: {', '.join(missing)}")


def _tuple2(x: Any) -> tuple:
    return tuple(tuple(i) if isinstance(i, list) else i for i in x)


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read ``cosyvoice2.yaml`` and the Qwen ``config.json`` of an official model dir."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    y = parse_hyperpyyaml((model_dir / "cosyvoice2.yaml").read_text())
    try:
        llm, flow, hift = y["llm"], y["flow"], y["hift"]
        enc, cfm = flow["encoder"], flow["decoder"]
        est, cfm_params = cfm["estimator"], cfm["cfm_params"]
        cfm_params = cfm_params.get("content", cfm_params)
        lc = LLMConfig(llm["llm_input_size"], llm["llm_output_size"], llm["speech_token_size"],
                       tuple(llm.get("mix_ratio", (5, 15))))
        fc = FlowConfig(
            input_size=flow["input_size"], output_size=flow["output_size"],
            spk_embed_dim=flow["spk_embed_dim"], vocab_size=flow["vocab_size"],
            token_mel_ratio=flow["token_mel_ratio"], pre_lookahead_len=flow["pre_lookahead_len"],
            enc_heads=enc["attention_heads"], enc_linear_units=enc["linear_units"],
            enc_num_blocks=enc["num_blocks"], enc_chunk_size=enc["static_chunk_size"],
            cfm_in_channels=cfm["in_channels"], cfm_spk_emb_dim=cfm["spk_emb_dim"],
            cfg_rate=float(cfm_params["inference_cfg_rate"]),
            t_scheduler=cfm_params.get("t_scheduler", "cosine"),
            dec_in_channels=est["in_channels"], dec_out_channels=est["out_channels"],
            dec_channels=tuple(est["channels"]), dec_head_dim=est["attention_head_dim"],
            dec_n_blocks=est["n_blocks"], dec_num_mid_blocks=est["num_mid_blocks"],
            dec_num_heads=est["num_heads"], dec_act_fn=est["act_fn"],
            dec_chunk_size=int(est["static_chunk_size"]))
        hc = HiFTConfig(
            in_channels=hift["in_channels"], base_channels=hift["base_channels"],
            nb_harmonics=hift["nb_harmonics"], sampling_rate=hift["sampling_rate"],
            nsf_alpha=hift["nsf_alpha"], nsf_sigma=hift["nsf_sigma"],
            nsf_voiced_threshold=hift["nsf_voiced_threshold"],
            upsample_rates=tuple(hift["upsample_rates"]),
            upsample_kernel_sizes=tuple(hift["upsample_kernel_sizes"]),
            n_fft=hift["istft_params"]["n_fft"], hop_len=hift["istft_params"]["hop_len"],
            resblock_kernel_sizes=tuple(hift["resblock_kernel_sizes"]),
            resblock_dilation_sizes=_tuple2(hift["resblock_dilation_sizes"]),
            source_resblock_kernel_sizes=tuple(hift["source_resblock_kernel_sizes"]),
            source_resblock_dilation_sizes=_tuple2(hift["source_resblock_dilation_sizes"]),
            lrelu_slope=hift["lrelu_slope"], audio_limit=hift["audio_limit"],
            f0_cond_channels=hift["f0_predictor"]["cond_channels"])
    except KeyError as e:
        raise ModelDirError(f"{model_dir / 'cosyvoice2.yaml'} lacks the entry {e}") from None
    qwen = json.loads((model_dir / "CosyVoice-BlankEN" / "config.json").read_text())
    return ModelConfig(sample_rate=y.get("sample_rate", hc.sampling_rate),
                       token_frame_rate=y.get("token_frame_rate", 25),
                       llm=lc, flow=fc, hift=hc, qwen=qwen)
