"""Regenerate the synthetic demo voices (examples/voice_a.wav, voice_b.wav): deterministic vowel-like tones.

They stand in for real voice samples so the demo needs no downloads; use your own recordings for real work.
"""

from pathlib import Path

import numpy as np
import soundfile as sf

SR = 24000


def voice(f0: float, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    pitch = f0 * (1 + 0.03 * np.sin(2 * np.pi * 5.0 * t))  # vibrato
    phase = 2 * np.pi * np.cumsum(pitch) / SR
    formants = (1.0, 0.6, 0.35, 0.2, 0.1)
    wave = sum(a * np.sin((k + 1) * phase) for k, a in enumerate(formants))
    syllables = 0.5 * (1 - np.cos(2 * np.pi * 3.0 * t)) ** 2  # ~3 syllables per second
    wave = wave * syllables + 0.01 * rng.standard_normal(t.shape)
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


if __name__ == "__main__":
    here = Path(__file__).parent
    sf.write(here / "voice_a.wav", voice(120.0, 2.0, 0), SR, subtype="PCM_16")
    sf.write(here / "voice_b.wav", voice(210.0, 2.0, 1), SR, subtype="PCM_16")
