"""The recorded Asterisk 20 dialogues in tests/recorded/, as bytes."""
import ast
from pathlib import Path

# Facts recorded from a real Asterisk 20 (tests/recorded/README.md says how),
# kept in the project so that the suite reads nothing outside it.
TRANSCRIPTS = Path(__file__).resolve().parent / "recorded"


def dialogue(name):
    """[(direction, bytes)] of one recording: 'AST>' from Asterisk, 'AGI<' to it."""
    lines = []
    for line in (TRANSCRIPTS / f"{name}.txt").read_text().splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[1] in ("AST>", "AGI<"):
            lines.append((parts[1], ast.literal_eval(parts[2])))
        if line.startswith("== Asterisk log"):
            break
    return lines


def sent_by_asterisk(name):
    return [data for direction, data in dialogue(name) if direction == "AST>"]


def reply_to(name, command):
    """Asterisk's reply to the last ``command`` line (bytes, with newline)."""
    lines = dialogue(name)
    replies = [lines[i + 1][1] for i, (direction, data) in enumerate(lines)
               if direction == "AGI<" and data == command]
    assert replies, f"{command!r} not in {name}"
    return replies[-1]
