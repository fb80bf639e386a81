"""Audio response formats of vv-serve: wav (PCM16), raw pcm (s16le) and flac, whole or streamed.

A streamed wav starts with a header whose RIFF and data sizes are 0xFFFFFFFF ("unknown, up to the
end of the stream"), as streaming encoders write it; the PCM16 samples follow as frames are made. A
streamed pcm response is the bare s16le samples. flac is only produced whole (its header records the
total length and checksum, known only at the end), so a streamed flac request is refused.
"""

from __future__ import annotations

import io
import struct

import numpy as np

FORMATS = ("wav", "pcm", "flac")
STREAMABLE = ("wav", "pcm")
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac"}
UNKNOWN_SIZE = 0xFFFFFFFF


def pcm16(audio: np.ndarray) -> bytes:
    """float32 samples in [-1, 1] -> little-endian signed 16-bit bytes (clipped, rounded)."""
    samples = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    return np.round(samples * 32767.0).astype("<i2").tobytes()


def float32le(audio: np.ndarray) -> bytes:
    """float32 samples -> little-endian IEEE float bytes (as made: no clipping)."""
    return np.asarray(audio, dtype="<f4").reshape(-1).tobytes()


def wav_header(sample_rate: int, samples: int | None = None) -> bytes:
    """44-byte RIFF/WAVE header for mono PCM16; `samples=None`: sizes unknown (a stream)."""
    if samples is None:
        data_bytes = riff_bytes = UNKNOWN_SIZE
    else:
        data_bytes = 2 * int(samples)
        riff_bytes = 36 + data_bytes
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", riff_bytes, b"WAVE", b"fmt ", 16, 1, 1,
                       int(sample_rate), int(sample_rate) * 2, 2, 16, b"data", data_bytes)


def encode_whole(audio: np.ndarray, fmt: str, sample_rate: int) -> bytes:
    """A whole signal as a complete file of format `fmt`."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if fmt == "wav":
        return wav_header(sample_rate, audio.shape[0]) + pcm16(audio)
    if fmt == "pcm":
        return pcm16(audio)
    if fmt == "flac":
        import soundfile as sf

        buffer = io.BytesIO()
        with sf.SoundFile(buffer, "w", samplerate=int(sample_rate), channels=1, format="FLAC",
                          subtype="PCM_16") as handle:
            handle.write(np.clip(audio, -1.0, 1.0))
        return buffer.getvalue()
    raise ValueError(f"unknown format {fmt!r}")


def stream_start(fmt: str, sample_rate: int) -> bytes:
    """Bytes that open a streamed response of format `fmt` (before the first samples)."""
    if fmt == "wav":
        return wav_header(sample_rate, None)
    if fmt == "pcm":
        return b""
    raise ValueError(f"format {fmt!r} cannot be streamed")
