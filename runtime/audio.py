"""Voice prompt loading (exactly the original processor's normalisation) and atomic wav output."""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path

import numpy as np

from .errors import RuntimeInputError

SAMPLE_RATE = 24000
HOP = 3200
TARGET_DB_FS = -25.0
EPS = 1e-6
# sample rates a voice file may declare: telephone-band recordings up to the fastest studio converters
# (a header declaring anything else is a damaged or forged file, not a recording)
SAMPLE_RATE_RANGE = (4_000, 384_000)


def normalize(wav: np.ndarray) -> np.ndarray:
    """RMS to -25 dBFS, then scale down if the peak exceeds 1 (the original AudioNormalizer, float32)."""
    wav = np.asarray(wav, dtype=np.float32)
    rms = np.sqrt(np.mean(wav ** 2))
    wav = wav * (10 ** (TARGET_DB_FS / 20) / (rms + EPS))
    peak = np.max(np.abs(wav))
    if peak > 1.0:
        wav = wav / (peak + EPS)
    return wav.astype(np.float32, copy=False)


def to_mono(data: np.ndarray) -> np.ndarray:
    """soundfile gives [frames] or [frames, channels]; channels are averaged."""
    if data.ndim == 2:
        data = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return np.asarray(data, dtype=np.float32)


def check_sample_rate(rate: int, label: str) -> None:
    """RuntimeInputError (one line) unless `rate` is within SAMPLE_RATE_RANGE."""
    low, high = SAMPLE_RATE_RANGE
    if not low <= rate <= high:
        raise RuntimeInputError(f"{label}: declares a sample rate of {rate} Hz, outside {low}..{high} Hz")


def resample(wav: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if rate == target:
        return wav.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(wav, rate, target, quality="HQ").astype(np.float32, copy=False)


def read_audio(path: str | Path) -> np.ndarray:
    """Any format soundfile reads -> mono float32 at 24 kHz (not normalised)."""
    path = Path(path)
    if not path.is_file():
        raise RuntimeInputError(f"voice file {path}: not found")
    return _decode(str(path), f"voice file {path}")


def read_audio_bytes(data: bytes | bytearray | memoryview, label: str = "voice") -> np.ndarray:
    """The bytes of a sound file (an upload) -> mono float32 at 24 kHz (not normalised)."""
    import io

    if len(data) == 0:
        raise RuntimeInputError(f"{label}: empty upload")
    return _decode(io.BytesIO(bytes(data)), label)


def _decode(source, label: str) -> np.ndarray:
    """soundfile source (path or file object) -> mono float32 at 24 kHz; one-line errors naming `label`."""
    import soundfile as sf

    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        detail = " ".join(str(exc).split())
        raise RuntimeInputError(f"{label}: unreadable audio ({detail})") from exc
    check_sample_rate(rate, label)
    wav = to_mono(data)
    if wav.size == 0:
        raise RuntimeInputError(f"{label}: contains no audio samples")
    if not np.all(np.isfinite(wav)):
        raise RuntimeInputError(f"{label}: contains non-finite samples")
    wav = resample(wav, rate)
    if wav.size == 0:
        raise RuntimeInputError(f"{label}: too short to hold one sample at {SAMPLE_RATE} Hz")
    return wav


def prepare_voice(voice: str | Path | np.ndarray, label: str = "voice") -> tuple[np.ndarray, int]:
    """Voice file path or 24 kHz array -> (normalised audio zero-padded to a multiple of HOP, frames).

    frames = ceil(unpadded length / HOP): the number of placeholder tokens in the prompt.
    """
    if isinstance(voice, (str, Path)):
        wav = read_audio(voice)
    else:
        wav = to_mono(np.asarray(voice, dtype=np.float32))
        if wav.size == 0:
            raise RuntimeInputError(f"{label}: contains no audio samples")
    wav = normalize(wav)
    frames = math.ceil(wav.shape[0] / HOP)
    padded = np.zeros(frames * HOP, dtype=np.float32)
    padded[: wav.shape[0]] = wav
    return padded, frames


class WavWriter:
    """Writes a mono wav chunk by chunk into a temp file beside `path`, renamed onto it by commit().

    abort() (or leaving a `with` block on an exception) removes the temp file: no partial output.
    With `live=True` (vv-run --stream) the chunks go straight to `path`, a growing file a player can
    follow while it is written; abort() removes it just the same.
    """

    def __init__(self, path: str | Path, sample_rate: int = SAMPLE_RATE, subtype: str = "FLOAT",
                 live: bool = False):
        import soundfile as sf

        self.path = Path(path)
        self.live = live
        self.samples = 0
        parent = self.path.parent
        if self.path.is_dir():
            raise RuntimeInputError(f"output {self.path}: is a directory")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            # a fresh name created exclusively, with the umask's usual permissions (mkstemp's are 0600)
            self.tmp = self.path if live else parent / f".{self.path.name}.{secrets.token_hex(6)}.tmp"
            handle = open(self.tmp, "wb" if live else "xb")
        except OSError as exc:
            blocker = next((p for p in reversed(self.path.parents) if p.exists() and not p.is_dir()), None)
            reason = f"{blocker} is not a directory" if blocker is not None else (exc.strerror or str(exc))
            raise RuntimeInputError(f"output {self.path}: cannot write there ({reason})") from exc
        try:
            self._file = sf.SoundFile(handle, "w", samplerate=sample_rate, channels=1, format="WAV",
                                      subtype=subtype, closefd=True)
        except Exception as exc:
            handle.close()
            self.tmp.unlink(missing_ok=True)
            raise RuntimeInputError(f"output {self.path}: cannot write there ({' '.join(str(exc).split())})") from exc

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        self._file.write(chunk)
        self.samples += chunk.shape[0]
        if self.live:
            self._file.flush()

    def commit(self) -> Path:
        self._file.close()
        if self.live:
            return self.path
        try:
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.tmp.unlink(missing_ok=True)
            raise RuntimeInputError(f"output {self.path}: cannot write there ({exc.strerror or exc})") from exc
        return self.path

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE, subtype: str = "FLOAT") -> Path:
    """Write a whole signal atomically (temp file + rename)."""
    with WavWriter(path, sample_rate, subtype) as writer:
        writer.write(audio)
    return writer.path
