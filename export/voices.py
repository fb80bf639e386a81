"""VibeVoice-Realtime voice presets: Microsoft's `.pt` files -> ENGINE_DIR voices, without running their pickles.

A released preset is a ``torch.save`` zip archive of ``{"lm", "tts_lm", "neg_lm", "neg_tts_lm"}``, each a
transformers ``BaseModelOutputWithPast`` holding ``last_hidden_state`` [1, P, H] and a ``DynamicCache`` whose
``key_cache`` / ``value_cache`` are lists of [1, KV, P, D] tensors, one per layer (bf16). The archive holds
``<archive>/data.pkl`` (the pickle) and one raw record per tensor storage, ``<archive>/data/<key>``.

``read_preset`` unpickles ``data.pkl`` with ``PresetUnpickler``: its ``find_class`` answers only the globals
those files name, each with a stand-in of this module (tensors are rebuilt into numpy from the storage records,
the transformers objects into plain ones); any other global is refused with one line naming it, before
anything is called. ``check_preset_dims`` compares a preset with a model's dimensions (PRESET_DIMS).

``convert_voices`` writes each preset into a VibeVoice-Realtime ENGINE_DIR as ``voices/<stem>.safetensors``:
``<cache>.kv`` [layers, 2 (key, value), 1, kv_heads, positions, head_dim] (the lm graphs' cache layout) and
``<cache>.hidden`` [positions, hidden] for the caches text_lm, tts_lm, neg_text_lm and neg_tts_lm, float32
(float16 for an fp16 engine), and records it in ``manifest["voices"][<stem>]`` (``voice_entry``).

Imports neither torch nor transformers: `vv-export voices` runs with numpy alone.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .engine_dir import MANIFEST, STREAMING_FAMILY, atomic_write, read_manifest, update_manifest
from .errors import ExportError, one_line

VOICES_DIR = "voices"
VOICE_FORMAT = "vibevoice-trt/voice"

# preset key -> (its name in the ENGINE_DIR, the dimension giving its number of layers)
PRESET_CACHES = {"lm": ("text_lm", "text_lm_layers"), "tts_lm": ("tts_lm", "tts_lm_layers"),
                 "neg_lm": ("neg_text_lm", "text_lm_layers"), "neg_tts_lm": ("neg_tts_lm", "tts_lm_layers")}
# the model dimensions a preset must match (manifest["model"] fields), as the errors name them
PRESET_DIMS = {"text_lm_layers": "text LM layers", "tts_lm_layers": "TTS LM layers", "num_kv_heads": "KV heads",
               "head_dim": "head size", "hidden_size": "hidden size"}
# the engine's dtype -> the dtype of its voice tensors (float32 for any other)
VOICE_DTYPES = {"fp16": np.float16}
MAX_PICKLE_BYTES = 16 << 20  # a released preset's data.pkl is about 10 KiB: its tensors are storage records
ALLOWED_GLOBALS_TEXT = "tensor storages, OrderedDict, BaseModelOutputWithPast and DynamicCache"


class PresetError(ExportError):
    """A file that is not a readable voice preset, or one that does not fit the engine."""


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (e.g. os.system): nothing of it was called."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


# ---- stand-ins for the globals a preset names -------------------------------------------------------------

@dataclass(frozen=True)
class _StorageType:
    """torch.<Name>Storage: the element type of a storage record."""
    name: str
    dtype: str  # "bf16" (read as uint16 bit patterns), else a little-endian numpy float dtype


_STORAGE_TYPES = {name: _StorageType(name, dtype) for name, dtype in
                  (("BFloat16Storage", "bf16"), ("HalfStorage", "<f2"), ("FloatStorage", "<f4"))}


@dataclass(frozen=True)
class _Storage:
    """One storage record's elements as float32, flat."""
    key: str
    values: np.ndarray


class _ModelOutput(dict):
    """transformers' BaseModelOutputWithPast: its fields as dict items."""

    FIELDS = ("last_hidden_state", "past_key_values", "hidden_states", "attentions")

    def __init__(self, *args):
        if len(args) > len(self.FIELDS):
            raise pickle.UnpicklingError(f"BaseModelOutputWithPast with {len(args)} fields")
        super().__init__(zip(self.FIELDS, args))

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("BaseModelOutputWithPast with a non-dict state")
        self.update(state)


class _DynamicCache:
    """transformers' DynamicCache (the layout of the released presets): its pickled attributes."""

    __slots__ = ("state",)

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("DynamicCache with a non-dict state")
        self.state = dict(state)


class _Tensor:
    """A rebuilt tensor: its values as a float32 array. Takes no pickled state (BUILD on it is refused)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def __setstate__(self, state):
        raise pickle.UnpicklingError("state given to a tensor")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None) -> _Tensor:
    """torch._utils._rebuild_tensor_v2: the strided view of a storage, copied into a float32 array."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor without a storage record")
    if not (_is_int(storage_offset) and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(_is_int(v) for v in (*size, *stride))):
        raise pickle.UnpicklingError(f"tensor on storage {storage.key}: malformed offset, size or stride")
    if storage_offset < 0 or any(v < 0 for v in (*size, *stride)):
        raise pickle.UnpicklingError(f"tensor on storage {storage.key}: negative offset, size or stride")
    if math.prod(size) == 0:
        return _Tensor(np.zeros(size, np.float32))
    if math.prod(size) > storage.values.size:  # a broadcast view: never in a preset, and unbounded in memory
        raise pickle.UnpicklingError(f"tensor on storage {storage.key} has more elements than its storage")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.values.size:
        raise pickle.UnpicklingError(f"tensor on storage {storage.key} reaches element {last} of a "
                                     f"{storage.values.size}-element storage")
    base = storage.values[storage_offset:]
    view = np.lib.stride_tricks.as_strided(base, shape=size, strides=[s * base.itemsize for s in stride],
                                           writeable=False)
    return _Tensor(np.array(view, dtype=np.float32))


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("transformers.modeling_outputs", "BaseModelOutputWithPast"): _ModelOutput,
    ("transformers.cache_utils", "DynamicCache"): _DynamicCache,
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
}


def _bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> the float32 values they are the upper halves of (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class PresetUnpickler(pickle.Unpickler):
    """Unpickles a preset's data.pkl from its zip archive, resolving only ``_ALLOWED_GLOBALS``.

    Storages (persistent ids ``("storage", torch.<T>Storage, key, location, numel)``) are read from the
    archive's ``<prefix>/data/<key>`` records; the location (cpu, cuda:0) is ignored.
    """

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        self._archive = archive
        self._prefix = prefix
        self._storages: dict[str, _Storage] = {}
        info = archive.getinfo(f"{prefix}/data.pkl")
        if info.file_size > MAX_PICKLE_BYTES:
            raise PresetError(f"data.pkl is {info.file_size} bytes; a preset's is a few KiB")
        super().__init__(io.BytesIO(archive.read(info)))

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise RefusedGlobal(str(module), str(name)) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_int(pid[4])
                and pid[4] >= 0 and re.fullmatch(r"[A-Za-z0-9_]+", pid[2])):
            raise pickle.UnpicklingError("a persistent id that is not a tensor storage")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if key in self._storages:
            if self._storages[key].values.size != numel:
                raise pickle.UnpicklingError(f"storage {key} referenced with two sizes")
            return self._storages[key]
        record = f"{self._prefix}/data/{key}"
        itemsize = 2 if storage_type.dtype == "bf16" else np.dtype(storage_type.dtype).itemsize
        try:
            info = self._archive.getinfo(record)
        except KeyError:
            raise pickle.UnpicklingError(f"storage record data/{key} is missing") from None
        if info.file_size != numel * itemsize:
            raise pickle.UnpicklingError(f"storage record data/{key} holds {info.file_size} bytes, "
                                         f"expected {numel * itemsize}")
        data = self._archive.read(record)  # checks the record's CRC
        if storage_type.dtype == "bf16":
            values = _bf16_to_float32(np.frombuffer(data, "<u2"))
        else:
            values = np.frombuffer(data, storage_type.dtype).astype(np.float32)
        self._storages[key] = _Storage(key, values)
        return self._storages[key]


# ---- the preset ---------------------------------------------------------------------------------------------

@dataclass
class PresetCache:
    """One prefilled model state of a preset, in the ENGINE_DIR layout."""
    kv: np.ndarray  # [layers, 2 (key, value), 1, kv_heads, positions, head_dim]
    hidden: np.ndarray  # [positions, hidden_size] (last_hidden_state)

    @property
    def positions(self) -> int:
        return self.kv.shape[4]


@dataclass
class Preset:
    name: str  # the file stem: the voice's name in the ENGINE_DIR
    source: str  # the file name
    caches: dict[str, PresetCache]  # keyed by ENGINE_DIR name (text_lm, tts_lm, neg_text_lm, neg_tts_lm)

    def dims(self) -> dict[str, int]:
        """The model dimensions the preset was made for (PRESET_DIMS)."""
        text, tts = self.caches["text_lm"].kv, self.caches["tts_lm"].kv
        return {"text_lm_layers": text.shape[0], "tts_lm_layers": tts.shape[0], "num_kv_heads": text.shape[3],
                "head_dim": text.shape[5], "hidden_size": self.caches["text_lm"].hidden.shape[1]}

    def tensors(self, dtype=np.float32) -> dict[str, np.ndarray]:
        """The ENGINE_DIR voice file's tensors: <cache>.kv and <cache>.hidden (PresetError beyond dtype's range)."""
        out = {}
        for name, cache in self.caches.items():
            out[f"{name}.kv"] = np.ascontiguousarray(cache.kv, dtype=dtype)
            out[f"{name}.hidden"] = np.ascontiguousarray(cache.hidden, dtype=dtype)
        overflow = [k for k, v in out.items() if not np.isfinite(v).all()]
        if overflow:
            raise PresetError(f"{self.source}: {', '.join(overflow)} exceed the {np.dtype(dtype).name} range of "
                              f"this engine")
        return out


def _array(value) -> np.ndarray | None:
    return value.array if isinstance(value, _Tensor) else None


def _describe(value) -> str:
    if isinstance(value, _Tensor):
        return f"a tensor [{', '.join(map(str, value.array.shape))}]"
    return "None" if value is None else f"a {type(value).__name__.lstrip('_')}"


def _cache_of(entry, key: str) -> PresetCache:
    """PresetCache of one unpickled BaseModelOutputWithPast; PresetError naming what is not as expected."""
    if not isinstance(entry, _ModelOutput):
        raise PresetError(f"{key} is {_describe(entry)}, not a model output")
    hidden, cache = _array(entry.get("last_hidden_state")), entry.get("past_key_values")
    if hidden is None or hidden.ndim != 3 or hidden.shape[0] != 1 or hidden.shape[1] < 1:
        raise PresetError(f"{key}.last_hidden_state is {_describe(entry.get('last_hidden_state'))}, "
                          f"expected [1, positions, hidden]")
    if not isinstance(cache, _DynamicCache):
        raise PresetError(f"{key}.past_key_values is {_describe(cache)}, not a DynamicCache")
    state = getattr(cache, "state", {})  # unset when the pickle gave it no state
    keys, values = state.get("key_cache"), state.get("value_cache")
    if not (isinstance(keys, list) and isinstance(values, list) and keys and len(keys) == len(values)):
        raise PresetError(f"{key}: the cache has no key_cache/value_cache lists of one length")
    first = _array(keys[0])
    expected = (1, first.shape[1], hidden.shape[1], first.shape[3]) if first is not None and first.ndim == 4 else None
    for which, tensors in (("key_cache", keys), ("value_cache", values)):
        for layer, tensor in enumerate(tensors):
            if expected is None or _array(tensor) is None or tensor.array.shape != expected:
                raise PresetError(f"{key}.{which}[{layer}] is {_describe(tensor)}, expected [1, kv_heads, "
                                  f"{hidden.shape[1]} (the positions of last_hidden_state), head_dim]")
    kv = np.stack([np.stack([k.array, v.array]) for k, v in zip(keys, values)])  # [L, 2, 1, KV, P, D]
    if not (np.isfinite(kv).all() and np.isfinite(hidden).all()):
        raise PresetError(f"{key} holds non-finite values")
    return PresetCache(kv=kv, hidden=hidden[0])


def _archive_prefix(archive: zipfile.ZipFile) -> str:
    """The one top-level folder holding data.pkl (torch.save names it after the file it first wrote)."""
    pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise PresetError("not a torch.save archive (no single <name>/data.pkl)")
    prefix = pickles[0][: -len("/data.pkl")]
    byteorder = f"{prefix}/byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
        raise PresetError("big-endian archive (only little-endian presets are read)")
    return prefix


def read_preset(path: str | Path) -> Preset:
    """Read a released voice preset without executing anything; PresetError in one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PresetError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive)
            content = PresetUnpickler(archive, prefix).load()
    except RefusedGlobal as exc:
        raise PresetError(f"{path}: refused: the pickle names {exc.qualified_name}; a voice preset holds only "
                          f"{ALLOWED_GLOBALS_TEXT} (nothing was run or written)") from None
    except PresetError as exc:
        raise PresetError(f"{path}: {exc}") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise PresetError(f"{path}: corrupt or not a torch.save archive ({one_line(exc)})") from None
    except OSError as exc:
        raise PresetError(f"{path}: cannot read ({one_line(exc)})") from None
    except Exception as exc:  # anything a corrupt or hostile pickle makes the unpickler raise
        raise PresetError(f"{path}: corrupt preset ({one_line(exc)})") from None
    if not isinstance(content, dict):
        raise PresetError(f"{path}: not a voice preset (the pickle holds {_describe(content)}, "
                          f"expected a dict of {', '.join(PRESET_CACHES)})")
    missing = [key for key in PRESET_CACHES if key not in content]
    if missing:
        raise PresetError(f"{path}: not a voice preset (missing {', '.join(missing)})")
    try:
        caches = {name: _cache_of(content[key], key) for key, (name, _) in PRESET_CACHES.items()}
    except PresetError as exc:
        raise PresetError(f"{path}: not a voice preset ({exc})") from None
    preset = Preset(name=path.stem, source=path.name, caches=caches)
    _check_consistent(preset, path)
    return preset


def _check_consistent(preset: Preset, path: Path) -> None:
    """The four caches of a preset belong to one model: same widths, paired layer counts."""
    reference = preset.dims()
    for key, (name, layers_dim) in PRESET_CACHES.items():
        cache = preset.caches[name]
        found = {layers_dim: cache.kv.shape[0], "num_kv_heads": cache.kv.shape[3], "head_dim": cache.kv.shape[5],
                 "hidden_size": cache.hidden.shape[1]}
        for dim, value in found.items():
            if value != reference[dim]:
                raise PresetError(f"{path}: not a voice preset ({key} has {PRESET_DIMS[dim]} {value}, the "
                                  f"others {reference[dim]})")


def check_preset_dims(preset: Preset, dims: dict) -> None:
    """Refuse (PresetError, one line naming every mismatch) a preset made for other model dimensions.

    dims: the PRESET_DIMS fields of the model (an engine's manifest["model"], or derived from a config).
    """
    absent = [d for d in PRESET_DIMS if not _is_int(dims.get(d))]
    if absent:
        raise PresetError(f"the model dimensions lack {', '.join(absent)}")
    found = preset.dims()
    mismatches = [f"{label} {found[d]} (engine: {dims[d]})" for d, label in PRESET_DIMS.items() if found[d] != dims[d]]
    if mismatches:
        raise PresetError(f"{preset.source} was made for another model: {', '.join(mismatches)}")


# ---- the ENGINE_DIR ----------------------------------------------------------------------------------------

def engine_voice_dims(manifest: dict, engine_dir: Path) -> dict[str, int]:
    """The PRESET_DIMS of a streaming ENGINE_DIR's manifest; PresetError for another family or a missing field."""
    family = manifest.get("model_family", "vibevoice")
    if family != STREAMING_FAMILY:
        raise PresetError(f"{engine_dir} holds a {family} model; voice presets are for {STREAMING_FAMILY} "
                          f"(VibeVoice-Realtime) ENGINE_DIRs")
    model = manifest.get("model")
    absent = [d for d in PRESET_DIMS if not (isinstance(model, dict) and _is_int(model.get(d)))]
    if absent:
        raise PresetError(f"{Path(engine_dir) / MANIFEST}: model section lacks {', '.join(absent)}")
    return {d: model[d] for d in PRESET_DIMS}


def voice_entry(preset: Preset, sha256: str) -> dict:
    """The manifest["voices"][name] record of a converted preset."""
    return {"file": f"{VOICES_DIR}/{preset.name}.safetensors",
            "positions": {name: cache.positions for name, cache in preset.caches.items()},
            "sha256": sha256, "source": preset.source}


def _check_names(presets: list[Preset]) -> None:
    seen = set()
    for preset in presets:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", preset.name):
            raise PresetError(f"{preset.source}: the voice name {preset.name!r} (the file stem) may hold only "
                              f"letters, digits, '.', '_' and '-' and must start with a letter or digit")
        if preset.name in seen:
            raise PresetError(f"two presets named {preset.name!r}: give each file its own stem")
        seen.add(preset.name)


def convert_voices(engine_dir: str | Path, files: Iterable[str | Path],
                   progress: Callable[[str], None] | None = None) -> list[Path]:
    """Convert presets into ENGINE_DIR/voices/<stem>.safetensors and record them in manifest["voices"].

    Every file is read and checked against the engine before anything is written; the voice files are
    staged, then moved in place, and the manifest updated once, all under the manifest's lock. A voice of
    the same name is replaced.
    """
    from safetensors.numpy import save

    engine_dir = Path(engine_dir)
    dims = engine_voice_dims(read_manifest(engine_dir), engine_dir)
    presets = [read_preset(f) for f in files]
    if not presets:
        raise PresetError("no preset files given")
    _check_names(presets)
    for preset in presets:
        check_preset_dims(preset, dims)
    voices_dir = engine_dir / VOICES_DIR

    def record(manifest: dict) -> None:
        if engine_voice_dims(manifest, engine_dir) != dims:
            raise PresetError(f"{engine_dir / MANIFEST} changed during the conversion: run it again")
        dtype = VOICE_DTYPES.get(manifest.get("dtype"), np.float32)
        # one metadata entry: safetensors writes several in varying order, and the same preset should give the
        # same bytes (the source file is named in the manifest)
        blobs = {p.name: save(p.tensors(dtype), metadata={"format": VOICE_FORMAT}) for p in presets}
        voices_dir.mkdir(exist_ok=True)
        # all files are staged first: a failure on any leaves the voices as they were
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=voices_dir))
        try:
            for name, blob in blobs.items():
                atomic_write(staging / f"{name}.safetensors", blob)
            for name in blobs:
                os.replace(staging / f"{name}.safetensors", voices_dir / f"{name}.safetensors")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        voices = manifest.setdefault("voices", {})
        for preset in presets:
            voices[preset.name] = voice_entry(preset, hashlib.sha256(blobs[preset.name]).hexdigest())

    update_manifest(engine_dir, record)
    written = [voices_dir / f"{preset.name}.safetensors" for preset in presets]
    if progress is not None:
        for preset, path in zip(presets, written):
            progress(f"wrote {path} (voice {preset.name!r}, {preset.caches['tts_lm'].positions} TTS LM positions)")
    return written
