"""Stream text into the WebSocket of `vv-serve` on a VibeVoice-Realtime ENGINE_DIR, as an LLM would (a few words at
a time), and write the speech it sends back, frame by frame, to a wav file.

    vv-serve --engine-dir engines/realtime --port 8000
    python examples/stream_client.py --voice en-Carter_man --out streamed.wav \\
        --text "Hello there! This sentence is spoken while it is still being written."

Needs the `websockets` package (in the `serve` extra). The protocol is in docs/SERVE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import wave

import websockets


def pieces(text: str, words: int) -> list[str]:
    """The text in chunks of `words` words, spaces kept (joined again they give the text exactly)."""
    parts = text.split(" ")
    return [" ".join(parts[i:i + words]) + (" " if i + words < len(parts) else "") for i in range(0, len(parts), words)]


async def speak(url: str, voice: str, text: str, words: int, every: float, seed: int | None,
                max_frames: int | None, out: str) -> dict:
    async with websockets.connect(url) as ws:
        start = {"type": "start", "voice": voice, "format": "pcm"}
        if seed is not None:
            start["seed"] = seed
        if max_frames is not None:
            start["max_new_frames"] = max_frames
        await ws.send(json.dumps(start))
        started = json.loads(await ws.recv())
        if started["type"] != "started":
            raise SystemExit(f"refused: {started['error']['message']}")
        print(f"request {started['request_id']}: seed {started['seed']}, {started['sample_rate']} Hz", file=sys.stderr)

        async def produce():
            try:
                for chunk in pieces(text, words):
                    await ws.send(json.dumps({"type": "text", "text": chunk}))
                    await asyncio.sleep(every)   # the next few tokens of the "LLM"
                await ws.send(json.dumps({"type": "close"}))
            except websockets.ConnectionClosed:
                pass   # the request ended before the text did (max_new_frames, or an error below)

        sent = time.monotonic()
        producer = asyncio.create_task(produce())
        frames, final, first = [], None, None
        async for message in ws:
            if isinstance(message, bytes):
                if first is None:
                    first = time.monotonic() - sent
                    print(f"first audio {first * 1000:.0f} ms after the first text was sent", file=sys.stderr)
                frames.append(message)
            else:
                final = json.loads(message)
        await producer
    if final is None or final["type"] != "done":
        raise SystemExit(f"failed: {final['error']['message'] if final else 'connection closed'}")
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(started["sample_rate"])
        wav.writeframes(b"".join(frames))
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/v1/audio/speech/stream")
    parser.add_argument("--voice", required=True, help="a voice preset of the server (GET /v1/voices)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to speak")
    source.add_argument("--file", help="a text file to speak")
    parser.add_argument("--words", type=int, default=3, help="words per text message [3]")
    parser.add_argument("--every", type=float, default=0.05, help="seconds between text messages [0.05]")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-frames", type=int, default=None, help="most audio frames (133 ms each)")
    parser.add_argument("--out", default="streamed.wav")
    args = parser.parse_args()
    text = args.text if args.text is not None else open(args.file, encoding="utf-8").read()
    final = asyncio.run(speak(args.url, args.voice, text, max(1, args.words), args.every, args.seed, args.max_frames,
                              args.out))
    print(f"wrote {args.out}: {final['frames']} frames, {final['audio_seconds']} s; server: first audio "
          f"{final['first_audio_s']} s after start, {final['first_audio_after_text_s']} s after the first text "
          f"window, waited {final['stalled_s']} s for text, {final['text_tokens']} text tokens", file=sys.stderr)


if __name__ == "__main__":
    main()
