"""The voices a service offers: presets (`--voices DIR`: shared by every principal, read-only) and
uploads, each owned by the principal (API key) that made it.

An owner sees, uses and deletes its own uploads only; another owner's are unknown to it (400 unknown
voice, 404 on delete), whatever id it guesses. Ids are per owner: two owners may both upload a voice
named `alice`; in the engine's `VoiceStore` each upload is stored under an id derived from its owner and
its name, so they cannot collide (nor with a preset). An upload's memory (its audio, its embeddings, the
LM cache of its prompt prefix) counts against its owner's budget (`Limits.voice_memory_budget`), and
an owner holds at most `Limits.max_voices` uploads: one owner filling its share leaves the others'
intact. Without API keys every request is one owner (`security.LOCAL`), as on a trusted machine.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from ..errors import RuntimeInputError
from ..service_engine import VOICE_ID
from .errors import PERMISSION, ApiError

MIB = 2 ** 20


@dataclass(frozen=True)
class Upload:
    store_id: str      # the id in the engine's VoiceStore
    digest: str        # sha256 of the uploaded file: the same file again is the same voice
    nbytes: int        # memory it holds (VoiceStore.nbytes)


class OwnedVoices:
    """Presets and per-owner uploads over a `VoiceStore` (see the module docstring); thread-safe."""

    def __init__(self, store, limits):
        self.store = store
        self.limits = limits
        self.presets = frozenset(v["id"] for v in store.list())
        self._uploads: dict[str, dict[str, Upload]] = {}       # owner -> its voice id -> upload
        self._guard = threading.Lock()     # the dict (held briefly: requests resolve their voices under it)
        self._changing = threading.Lock()  # an upload's checks, encode and add, or a delete, one at a time

    def resolve(self, owner: str, voice_id: str, param: str):
        """The stored Voice that `voice_id` names for `owner` (400 naming `param` when none)."""
        with self._guard:
            upload = self._uploads.get(owner, {}).get(voice_id)
        store_id = voice_id if voice_id in self.presets else upload.store_id if upload else None
        try:
            if store_id is None:
                raise RuntimeInputError("unknown")
            return self.store.get(store_id)
        except RuntimeInputError:
            raise ApiError(400, f"{param}: unknown voice {voice_id[:64]!r} (GET /v1/voices lists the voices "
                                f"this key can use)", param=param) from None

    def list(self, owner: str) -> list[dict]:
        """The presets and `owner`'s uploads: {"id", "name", "preset"} and what the engine's voice store says of
        each ("seconds" of a voice audio; a realtime preset's "source" and "prompt_positions"), + "bytes" for
        uploads."""
        stored = {v["id"]: v for v in self.store.list()}
        with self._guard:
            own = dict(self._uploads.get(owner, {}))
        out = [{**stored[vid], "id": vid, "name": vid, "preset": True} for vid in sorted(self.presets) if vid in stored]
        out += [{**stored[u.store_id], "id": vid, "name": vid, "preset": False, "bytes": u.nbytes}
                for vid, u in own.items() if u.store_id in stored]
        return out

    def entry(self, owner: str, voice_id: str) -> dict | None:
        """`voice_id` as `list` shows it to `owner` (None once deleted)."""
        return next((v for v in self.list(owner) if v["id"] == voice_id), None)

    def held(self, owner: str) -> int:
        with self._guard:
            return sum(u.nbytes for u in self._uploads.get(owner, {}).values())

    def held_total(self) -> int:
        with self._guard:
            return sum(u.nbytes for own in self._uploads.values() for u in own.values())

    def __len__(self) -> int:
        with self._guard:
            return len(self.presets) + sum(len(own) for own in self._uploads.values())

    def add(self, owner: str, data: bytes, name: str | None) -> tuple[str, bool]:
        """(voice id, created) of an upload by `owner`: the same file again (without a name, or under
        the name it has) is its voice as it is, not encoded again."""
        if name is not None and not VOICE_ID.match(name):
            raise ApiError(400, f"voice name {name[:40]!r}: use 1-64 letters, digits, '_', '.', '-'", param="name")
        digest = hashlib.sha256(data).hexdigest()
        limits = self.limits
        with self._changing:
            with self._guard:
                own = dict(self._uploads.get(owner, {}))
            existing = next((vid for vid, u in own.items() if u.digest == digest), None)
            if existing is not None and (name is None or name == existing):
                return existing, False
            voice_id = name if name is not None else "v" + digest[:12]
            if voice_id in self.presets or voice_id in own:
                raise ApiError(409, f"voice {voice_id!r} exists already: choose another name", "conflict", "name")
            if len(own) >= limits.max_voices:
                raise ApiError(409, f"this key holds {len(own)} uploaded voices, the limit: delete one first "
                                    f"(DELETE /v1/voices/ID)", "voice_limit")
            held = sum(u.nbytes for u in own.values())
            budget = limits.voice_memory_budget
            if held >= budget:
                raise ApiError(409, _over_budget(held, 0, budget), "voice_budget")
            store_id = "up-" + hashlib.sha256(f"{owner}\0{voice_id}".encode()).hexdigest()[:40]
            try:
                self.store.add(data, name=store_id, label="file")
            except RuntimeInputError as exc:   # a file soundfile reads but that is no usable voice
                raise ApiError(400, str(exc), param="file") from None
            nbytes = self.store.nbytes(self.store.get(store_id))
            if held + nbytes > budget:
                self.store.remove(store_id)
                raise ApiError(409, _over_budget(held, nbytes, budget), "voice_budget")
            with self._guard:
                self._uploads.setdefault(owner, {})[voice_id] = Upload(store_id, digest, nbytes)
            return voice_id, True

    def delete(self, owner: str, voice_id: str) -> None:
        """Forget one of `owner`'s uploads (requests already admitted with it go on)."""
        if voice_id in self.presets:
            raise ApiError(403, f"voice {voice_id!r} is a preset: presets are read-only", PERMISSION, "id")
        with self._changing:
            with self._guard:
                upload = self._uploads.get(owner, {}).pop(voice_id, None)
            if upload is None:
                raise ApiError(404, f"no voice {voice_id[:64]!r} among the voices this key uploaded", "not_found",
                               "id")
            self.store.remove(upload.store_id)


def _over_budget(held: int, adding: int, budget: int) -> str:
    wanted = f"; this voice needs {adding / MIB:.2f} MiB more" if adding else ""
    return (f"the uploaded voices of this key hold {held / MIB:.2f} MiB{wanted}: beyond the voice memory "
            f"budget of {budget / MIB:g} MiB per key (--voice-memory-budget): delete a voice first "
            f"(DELETE /v1/voices/ID)")
