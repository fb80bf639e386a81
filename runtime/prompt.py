"""Prompt token ids in the original VibeVoice layout, built with the `tokenizers` library.

    system_prompt
    " Voice input:\n"                                    (only when voices are given)
      " Speaker i:" [speech_start] [speech_diffusion] * frames_i [speech_end] "\n"   per voice
    " Text input:\n"
      " Speaker id:" + " text" + "\n"                   per script line
    " Speech output:\n" [speech_start]

speech_input_mask is True at the voice placeholder ([speech_diffusion]) positions only.
prefix_len counts the tokens up to and including " Text input:\n": the part that depends only on the
voices (its LM cache can be computed once per voice set and reused, see vv_runtime.scheduler).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RuntimeInputError
from .manifest import PROMPT as DEFAULT_PROMPT
from .script import speakers



@dataclass
class Prompt:
    input_ids: np.ndarray          # [S] int64
    speech_input_mask: np.ndarray  # [S] bool
    voice_frames: list[int]        # placeholder count per voice actually used
    prefix_len: int = 0            # tokens that depend only on the voices (system, voices, text header)


class PromptBuilder:
    def __init__(self, tokenizer_file: str | Path, tokens: dict, prompt_texts: dict | None = None):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokens = tokens
        self.texts = {**DEFAULT_PROMPT, **(prompt_texts or {})}

    @classmethod
    def from_manifest(cls, engine_dir: str | Path, manifest: dict) -> "PromptBuilder":
        return cls(Path(engine_dir) / manifest.get("tokenizer", "tokenizer.json"), manifest["tokens"],
                   manifest.get("prompt"))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def build(self, parsed: list[tuple[int, str]], voice_frames: list[int] | None = None) -> Prompt:
        """parsed script lines + the frame count of each voice -> prompt ids and placeholder mask.

        Voices beyond the number of distinct speakers are dropped (as the original does).
        """
        n_speakers = len(speakers(parsed))
        voice_frames = list(voice_frames or [])
        if voice_frames and len(voice_frames) < n_speakers:
            raise RuntimeInputError(f"script has {n_speakers} speakers but {len(voice_frames)} voices "
                                    f"(give one --voice per speaker)")
        voice_frames = voice_frames[:n_speakers]
        ids: list[int] = []
        mask: list[bool] = []

        def add(tokens: list[int], flag: bool = False) -> None:
            ids.extend(tokens)
            mask.extend([flag] * len(tokens))

        t = self.tokens
        add(self.encode(self.texts["system_prompt"]))
        if voice_frames:
            add(self.encode(self.texts["voice_header"]))
            for i, frames in enumerate(voice_frames):
                add(self.encode(f" Speaker {i}:"))
                add([t["speech_start"]])
                add([t["speech_diffusion"]] * frames, True)
                add([t["speech_end"]])
                add(self.encode("\n"))
        add(self.encode(self.texts["text_header"]))
        prefix_len = len(ids)
        for speaker_id, text in parsed:
            add(self.encode(f" Speaker {speaker_id}:{text}\n"))
        add(self.encode(self.texts["output_header"]))
        add([t["speech_start"]])
        return Prompt(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool), voice_frames, prefix_len)
