"""Script parsing, exactly like the original VibeVoice processor.

A script is a `.txt` file path or a literal string. In a `.txt` file every non-empty line is either
`Speaker N: text` (kept when text is non-empty) or plain text, which becomes `Speaker 1: <line>`.
A literal string must be `Speaker N: text` lines only. Speaker ids are renumbered from 0 when they
all start at 1 or above (the original subtracts 1 from each). The realtime model speaks plain text with one
voice: `load_text` gives the text of a `.txt` file, or the string itself.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import RuntimeInputError

SPEAKER_LINE = re.compile(r"^Speaker\s+(\d+)\s*:\s*(.*)$", re.IGNORECASE)


def script_file(script: str) -> Path | None:
    """The file a script argument names (a value ending in `.txt`; RuntimeInputError when there is no such
    file), or None: the value is the text itself."""
    if not script.endswith(".txt"):
        return None
    path = Path(script)
    if not path.is_file():
        raise RuntimeInputError(f"script {script}: file not found")
    return path


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuntimeInputError(f"script {path}: unreadable ({exc.__class__.__name__})") from exc


def load_text(script: str) -> str:
    """Plain text to speak (the realtime model: one voice, no `Speaker N:` lines): a `.txt` file's text, or the
    value itself."""
    path = script_file(script)
    if path is None:
        return script
    text = read_text_file(path)
    if not text.strip():
        raise RuntimeInputError(f"script {path}: empty (no text to speak)")
    return text


def text_file_to_script(path: str | Path) -> str:
    """The original `_convert_text_to_script`: plain lines are assigned to Speaker 1."""
    path = Path(path)
    lines = read_text_file(path).splitlines()
    out = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        match = SPEAKER_LINE.match(line)
        if match:
            text = match.group(2).strip()
            if text:
                out.append(f"Speaker {int(match.group(1))}: {text}")
        else:
            out.append(f"Speaker 1: {line}")
    if not out:
        raise RuntimeInputError(f"script {path}: empty (no text to speak)")
    return "\n".join(out)


def load_script(script: str) -> str:
    """A `.txt` file path -> script text; anything else is taken as the script itself."""
    path = script_file(script)
    return script if path is None else text_file_to_script(path)


def parse_script(script: str) -> list[tuple[int, str]]:
    """Script text -> [(speaker_id, ' ' + text)], ids renumbered from 0 if all are > 0."""
    parsed = []
    for number, line in enumerate(script.strip().split("\n"), start=1):
        if not line.strip():
            continue
        match = SPEAKER_LINE.match(line.strip())
        if not match:
            shown = line.strip()
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise RuntimeInputError(f"script line {number} has no 'Speaker N:' prefix: {shown!r}")
        parsed.append((int(match.group(1)), " " + match.group(2).strip()))
    if not parsed:
        raise RuntimeInputError("script is empty (no 'Speaker N: text' lines)")
    if min(sid for sid, _ in parsed) > 0:
        parsed = [(sid - 1, text) for sid, text in parsed]
    return parsed


def read_script(script: str) -> list[tuple[int, str]]:
    return parse_script(load_script(script))


def speakers(parsed: list[tuple[int, str]]) -> list[int]:
    """Distinct speaker ids in order of first appearance (the original counts `set(ids)`)."""
    return list(dict.fromkeys(sid for sid, _ in parsed))
