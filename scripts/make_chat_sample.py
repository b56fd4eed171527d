"""Build `alpagasus_ray/sample/chat_sample.jsonl`, the conversation sample shipped in the package,
from the Alpaca sample beside it (CC BY-NC 4.0, as that sample).

    python scripts/make_chat_sample.py

Each conversation chains one to three consecutive Alpaca rows as its user and assistant turns (an
input, when a row has one, follows its instruction in the user turn); most open with a system
turn; every tenth ends with a user turn that has no reply (a fixed line), as real chat logs do.
The rows keep their text as released. The same sample file always comes out.
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(HERE, "..", "alpagasus_ray", "sample")
SYSTEMS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer accurately.",
    None,  # no system turn
]


def user_turn(row: dict) -> dict:
    text = row["instruction"] + (f"\n\n{row['input']}" if row["input"].strip() else "")
    return {"role": "user", "content": text}


def main() -> None:
    with open(os.path.join(SAMPLE, "alpaca_sample.json"), encoding="utf-8") as f:
        rows = json.load(f)
    conversations, at, number = [], 0, 0
    while at < len(rows):
        size = 1 + number % 3
        chained = rows[at:at + size]
        at += size
        system = SYSTEMS[number % len(SYSTEMS)]
        turns = [{"role": "system", "content": system}] if system else []
        for row in chained:
            turns += [user_turn(row), {"role": "assistant", "content": row["output"]}]
        if number % 10 == 9:
            turns.append({"role": "user", "content": "Thank you. Can you say more?"})
        conversations.append({"id": f"chat-{number:03d}", "messages": turns})
        number += 1
    with open(os.path.join(SAMPLE, "chat_sample.jsonl"), "w", encoding="utf-8") as out:
        out.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations)
    print(f"wrote {len(conversations)} conversations, {sum(len(c['messages']) for c in conversations)} turns")


if __name__ == "__main__":
    main()
