"""Training data for measured jobs: a small built-in question/answer set, synthetic tokens, or a
local text file.

No tokenizer can be downloaded offline, so text is tokenised byte by byte: id = byte + 1, with 0
marking the end of a text. Any model with a vocabulary of at least 257 ids can learn from it;
GPT-2's 50,257 leaves most of its vocabulary unused, which costs memory exactly as real text does
(the logits are vocabulary-wide either way).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from ..errors import PlanError

END_OF_TEXT = 0
BYTE_OFFSET = 1
BYTE_VOCAB = 256 + BYTE_OFFSET

# Written for lora-plan: short facts with one clear answer each.
QA_PAIRS: tuple[tuple[str, str], ...] = (
    ("What is 2 + 2?", "4"),
    ("What is 7 times 6?", "42"),
    ("What is 10 minus 3?", "7"),
    ("What is 81 divided by 9?", "9"),
    ("What is 12 squared?", "144"),
    ("What is the square root of 49?", "7"),
    ("What is half of 50?", "25"),
    ("What is 3 cubed?", "27"),
    ("What is 15 plus 27?", "42"),
    ("What is 100 divided by 4?", "25"),
    ("How many sides has a hexagon?", "Six."),
    ("How many degrees are in a right angle?", "90."),
    ("How many degrees do the angles of a triangle sum to?", "180."),
    ("Is 17 a prime number?", "Yes."),
    ("Is 21 a prime number?", "No, 21 is 3 times 7."),
    ("How many metres are in a kilometre?", "1000."),
    ("How many grams are in a kilogram?", "1000."),
    ("How many seconds are in an hour?", "3600."),
    ("How many minutes are in a day?", "1440."),
    ("How many bytes are in a kibibyte?", "1024."),
    ("How many bits are in a byte?", "8."),
    ("How many centimetres are in an inch?", "2.54."),
    ("At what Celsius temperature does water freeze?", "0 degrees."),
    ("At what Celsius temperature does water boil at sea level?", "100 degrees."),
    ("How many days are in a leap year?", "366."),
    ("How many months have 31 days?", "Seven."),
    ("What is the capital of France?", "Paris."),
    ("What is the capital of Japan?", "Tokyo."),
    ("What is the capital of Kenya?", "Nairobi."),
    ("What is the capital of Canada?", "Ottawa."),
    ("What is the capital of Australia?", "Canberra."),
    ("What is the capital of Brazil?", "Brasilia."),
    ("What is the capital of Egypt?", "Cairo."),
    ("What is the capital of Norway?", "Oslo."),
    ("Which is the largest ocean?", "The Pacific."),
    ("Which is the longest river in Africa?", "The Nile."),
    ("On which continent is Peru?", "South America."),
    ("Which planet is closest to the Sun?", "Mercury."),
    ("Which planet is the largest?", "Jupiter."),
    ("How many planets orbit the Sun?", "Eight."),
    ("What gas do plants take in to make sugar?", "Carbon dioxide."),
    ("What is the chemical symbol of gold?", "Au."),
    ("What is the chemical symbol of sodium?", "Na."),
    ("How many legs has a spider?", "Eight."),
    ("How many legs has an insect?", "Six."),
    ("What colour do blue and yellow make?", "Green."),
    ("How many hours are in a week?", "168."),
    ("How many zeros has one million?", "Six."),
)


def qa_text() -> list[str]:
    return [f"Q: {q}\nA: {a}\n" for q, a in QA_PAIRS]


def encode_bytes(text: str) -> list[int]:
    """Byte-level ids: each UTF-8 byte b becomes b + 1, then the end-of-text id."""
    return [b + BYTE_OFFSET for b in text.encode("utf-8")] + [END_OF_TEXT]


def decode_bytes(ids: list[int]) -> str:
    return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode("utf-8", errors="replace")


def token_stream(data: str) -> list[int]:
    """All ids of a data source: `qa` (built in) or the path of a local text file."""
    if data == "qa":
        return [i for text in qa_text() for i in encode_bytes(text)]
    path = Path(data)
    if not path.is_file():
        raise PlanError(f"data must be qa, synthetic or a local text file; no file at {data}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise PlanError(f"{data} holds no text")
    return encode_bytes(text)


def batches(data: str, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> Iterator:
    """Endless (input_ids,) batches of shape (batch_size, seq_len) as torch long tensors.

    Text sources are cut into windows that walk round the token stream, so a short set repeats
    (a fine-tune that sees the same facts again and again: its loss must fall). `synthetic` draws
    uniform random ids over the whole vocabulary.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    if data == "synthetic":
        return (torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
                for _ in itertools.count())
    if vocab_size < BYTE_VOCAB:
        raise PlanError(f"byte-level data needs a vocabulary of at least {BYTE_VOCAB} ids; "
                        f"the model has {vocab_size}")
    # Read now, not at the first batch: a memory reader running by then must not count the text.
    stream = torch.tensor(token_stream(data), dtype=torch.long)
    while stream.numel() < seq_len:
        stream = torch.cat([stream, stream])
    return _windows(stream, batch_size, seq_len)


def _windows(stream, batch_size: int, seq_len: int) -> Iterator:
    import torch

    position = 0
    while True:
        rows = []
        for _ in range(batch_size):
            if position + seq_len > stream.numel():
                position = 0
            rows.append(stream[position:position + seq_len])
            position += seq_len
        yield torch.stack(rows)  # (B, T)
