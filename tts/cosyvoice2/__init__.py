"""CosyVoice 2 (SFT bistream streaming) inference on our own PyTorch modules.

Loads an official model directory (cosyvoice2.yaml, llm.pt, flow.pt, hift.pt,
CosyVoice-BlankEN/, optional spk2info.pt and ONNX front-end models) without the upstream
package.  Parts: config (yaml), llm (Qwen2 speech LM + bistream decode), flow_encoder /
flow_decoder / flow (chunk-aware flow matching, incremental cache), hift (vocoder),
stream (token -> audio driver), frontend + speakers (speaker registration), model (the
TTSBackend), bench (latency / RTF).
"""
from .config import ModelDirError, load_config
from .model import CosyVoice2TTS
from .speakers import Speaker, UnknownSpeakerError

__all__ = ["CosyVoice2TTS", "ModelDirError", "Speaker", "UnknownSpeakerError", "load_config"]
