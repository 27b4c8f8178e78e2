"""Prompt datasets and the replay-buffer row schema.

- ``synthetic_math``: a built-in, seeded generator of grade-school math word problems with numeric
  answers (GSM8K-style solutions ending in ``#### N``), so the embedded default needs no download.
- ``read_prompts``: JSONL or Parquet files with configurable field names, TRL's conversational
  ``messages`` column (the last user turn is the prompt, an assistant turn after it the reference) or
  TRL's ``prompt``/``completion`` columns; every bad row stops with ``file:row: field: what is wrong``.
- ``BUFFER_SCHEMA``: the Arrow schema of a preference pair in the replay buffer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from kd.errors import UserInputError


class DataError(UserInputError):
    """Bad input data; the message names the file, the row (1-based) and the field."""


@dataclass(frozen=True)
class PromptRecord:
    prompt_id: str
    question: str
    answer: str | None = None  # the reference final answer (GSM8K: the text after '####')
    reference: str | None = None  # the whole reference text (evaluation: Rouge-L, KL)
    route: str | None = None  # the value of route.field (which teacher answers it; driver/router.py)


# ---------------------------------------------------------------------------------------------
# Built-in synthetic math problems
# ---------------------------------------------------------------------------------------------

# A varied lexicon and many templates, so that a model trained on these problems must copy names,
# items and numbers from the question (what carries over to real word problems) rather than memorise a
# handful of them: with 120 names and 96 items (11520 pairs), 256 problems repeat about 3 name-item pairs.
_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jamal", "Kira", "Leo",
          "Maya", "Noah", "Olivia", "Pedro", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor", "Wendy", "Xavier",
          "Yara", "Zane", "Amir", "Bella", "Carlos", "Dana", "Elijah", "Fatima", "George", "Hana", "Ivan",
          "Julia", "Kenji", "Lena", "Marco", "Nadia", "Oscar", "Priya", "Rahul", "Sofia", "Tomas", "Ursula",
          "Vera", "Wei", "Yusuf", "Zoe", "Aisha", "Brandon", "Camila", "Diego", "Elena", "Felix", "Gloria",
          "Hassan", "Ingrid", "Jack", "Keisha", "Luis", "Mei", "Nina", "Omar", "Paula", "Ravi", "Sara",
          "Theo", "Valentina", "Walter", "Ximena", "Yosef", "Zara", "Adam", "Beatriz", "Connor", "Daisy",
          "Ethan", "Freya", "Gabriel", "Heidi", "Isaac", "Jasmine", "Kai", "Lucia", "Mateo", "Naomi", "Owen",
          "Penny", "Reza", "Sienna", "Tyler", "Vivian", "William", "Aaliyah", "Boris", "Cameron", "Dmitri",
          "Esther", "Finn", "Gemma", "Henry", "Imani", "Jonah", "Kathy", "Liam", "Mila", "Nathan", "Ollie",
          "Pablo", "Rita", "Simon", "Tessa", "Uriel", "Violet", "Wanda", "Yvonne", "Zack", "Janet"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards", "oranges",
          "cupcakes", "balloons", "crayons", "stamps", "coins", "beads", "flowers", "eggs", "bottles",
          "candles", "muffins", "tomatoes", "postcards", "batteries", "notebooks", "buttons", "ribbons",
          "tickets", "pebbles", "seeds", "lemons", "bananas", "toy cars", "comic books", "paper cranes",
          "baseball cards", "jars of jam", "loaves of bread", "bags of rice", "boxes of tea", "potted plants",
          "pens", "erasers", "candy bars", "donuts", "pies", "sandwiches", "pizzas", "carrots", "potatoes",
          "peaches", "pears", "plums", "cherries", "strawberries", "grapes", "watermelons", "pumpkins",
          "socks", "shirts", "hats", "scarves", "gloves", "shoes", "towels", "blankets", "pillows", "cups",
          "plates", "bowls", "spoons", "chairs", "tables", "lamps", "puzzles", "dolls", "kites", "robots",
          "video games", "movies", "songs", "photos", "letters", "emails", "bricks", "nails", "screws",
          "planks", "tiles", "bags of flour", "cartons of milk", "bars of soap", "rolls of tape", "cans of paint",
          "packs of gum", "bunches of roses", "trees", "chickens", "goats", "cows", "fish"]
_VEHICLES = ["train", "bus", "truck", "car", "boat", "cyclist", "plane", "ferry", "runner", "horse"]
_PLACES = ["the store", "the market", "the bakery", "the fair", "the library", "the farm", "the school",
           "the park", "the zoo", "the museum", "the beach", "the mall"]
_JOBS = ["babysitting", "walking dogs", "mowing lawns", "tutoring", "washing cars", "delivering papers",
         "painting fences", "selling lemonade", "raking leaves", "cleaning windows"]


def _problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, worked solution, numeric answer) from one of 20 templates; the solution's first line
    ends with the answer and every ``a op b = c`` in it holds."""
    name, friend = rng.sample(_NAMES, 2)
    item, other = rng.sample(_ITEMS, 2)
    place, job = rng.choice(_PLACES), rng.choice(_JOBS)
    kind = rng.randrange(20)
    a, b, c = rng.randint(2, 40), rng.randint(2, 12), rng.randint(2, 9)
    if kind == 0:
        q = f"{name} has {a} {item}. {name} buys {b} more at {place}. How many {item} does {name} have now?"
        ans = a + b
        sol = f"{name} starts with {a} and adds {b}: {a} + {b} = {ans}."
    elif kind == 1:
        a = a + b
        q = f"{name} had {a} {item} and gave {b} of them to {friend}. How many {item} are left?"
        ans = a - b
        sol = f"{name} gives away {b} of {a}: {a} - {b} = {ans}."
    elif kind == 2:
        q = f"{name} buys {b} packs of {item} with {c} {item} in each pack. How many {item} is that?"
        ans = b * c
        sol = f"There are {b} packs of {c}: {b} * {c} = {ans}."
    elif kind == 3:
        total = b * c
        q = f"{name} shares {total} {item} equally among {b} friends. How many {item} does each friend get?"
        ans = c
        sol = f"Each friend gets {total} / {b} = {ans}."
    elif kind == 4:
        days = rng.randint(2, 6)
        q = (f"{name} earns ${c} per hour {job} and works {b} hours a day for {days} days. "
             f"How many dollars does {name} earn?")
        ans = c * b * days
        sol = f"Per day {name} earns {c} * {b} = {c * b}, so in {days} days {c * b} * {days} = {ans}."
    elif kind == 5:
        given = a % (b * c) + 1
        q = (f"A box holds {c} {item}. {name} fills {b} boxes and then gives {friend} {given} "
             f"{item}. How many {item} does {name} have left?")
        ans = b * c - given
        sol = f"{name} has {b} * {c} = {b * c}, then {b * c} - {given} = {ans}."
    elif kind == 6:
        q = f"{name} has {a} {item}. {friend} has {c} times as many. How many {item} do they have together?"
        ans = a + a * c
        sol = f"{friend} has {a} * {c} = {a * c}, so together {a} + {a * c} = {ans}."
    elif kind == 7:
        cost = b * c
        paid = (cost // 10 + 1) * 10
        q = f"{name} buys {b} {item} at ${c} each and pays with ${paid}. How much change does {name} get?"
        ans = paid - cost
        sol = f"The {item} cost {b} * {c} = {cost}, so the change is {paid} - {cost} = {ans}."
    elif kind == 8:
        vehicle, speed = rng.choice(_VEHICLES), c * 10
        q = f"A {vehicle} travels at {speed} miles per hour for {b} hours. How many miles does it travel?"
        ans = speed * b
        sol = f"It travels {speed} * {b} = {ans}."
    elif kind == 9:
        q = (f"{name} had {2 * a} {item}, gave half of them to {friend}, and then found {b} more. "
             f"How many {item} does {name} have now?")
        ans = a + b
        sol = f"Half of {2 * a} is {2 * a} / 2 = {a}, then {a} + {b} = {ans}."
    elif kind == 10:
        x, y = rng.randint(2, 9), rng.randint(2, 9)
        q = (f"At {place}, {item} cost ${x} each and {other} cost ${y} each. {name} buys {b} {item} and "
             f"{c} {other}. How much does {name} spend?")
        ans = b * x + c * y
        sol = f"The {item} cost {b} * {x} = {b * x} and the {other} {c} * {y} = {c * y}, so {b * x} + {c * y} = {ans}."
    elif kind == 11:
        weeks = rng.randint(3, 10)
        goal = c * 10 * weeks + a
        q = (f"{name} saves ${c * 10} every week for {weeks} weeks. {name} wants to buy a bike that costs "
             f"${goal}. How much more money does {name} need?")
        ans = goal - c * 10 * weeks
        sol = f"{name} saves {c * 10} * {weeks} = {c * 10 * weeks}, so {goal} - {c * 10 * weeks} = {ans}."
    elif kind == 12:
        age = rng.randint(5, 15)
        q = (f"{name} is {age} years old. {friend} is {b} years older than {name}. How old will {friend} be "
             f"in {c} years?")
        ans = age + b + c
        sol = f"{friend} is {age} + {b} = {age + b} now, so in {c} years {age + b} + {c} = {ans}."
    elif kind == 13:
        pct = rng.choice([10, 20, 25, 50])
        price = rng.randint(2, 20) * 20
        q = f"{name} wants a jacket that costs ${price}. It is on sale for {pct}% off. What is the sale price?"
        off = price * pct // 100
        ans = price - off
        sol = f"The discount is {price} * {pct} / 100 = {off}, so the price is {price} - {off} = {ans}."
    elif kind == 14:
        w, h = rng.randint(3, 20), rng.randint(3, 20)
        q = f"{name}'s garden is a rectangle {w} meters long and {h} meters wide. What is its perimeter in meters?"
        ans = 2 * (w + h)
        sol = f"Length plus width is {w} + {h} = {w + h}, so the perimeter is 2 * {w + h} = {ans}."
    elif kind == 15:
        per_day = rng.randint(10, 60)
        q = (f"{name} reads {per_day} pages every day. How many pages does {name} read in {b} weeks?")
        ans = per_day * 7 * b
        sol = f"{b} weeks is {b} * 7 = {7 * b} days, so {per_day} * {7 * b} = {ans}."
    elif kind == 16:
        rows_, seats = b, c + 3
        came = rng.randint(1, rows_ * seats - 1)
        q = (f"The hall at {place} has {rows_} rows of {seats} chairs. {came} people come to the show. "
             f"How many chairs are empty?")
        ans = rows_ * seats - came
        sol = f"There are {rows_} * {seats} = {rows_ * seats} chairs, so {rows_ * seats} - {came} = {ans}."
    elif kind == 17:
        first = a + 5
        q = (f"{name} picked {first} {item} on Monday and {b} fewer on Tuesday. How many {item} did {name} "
             f"pick on the two days?")
        ans = first + first - b
        sol = f"On Tuesday {first} - {b} = {first - b}, so in all {first} + {first - b} = {ans}."
    elif kind == 18:
        minutes = rng.randint(2, 9) * 5
        q = (f"{name} spends {minutes} minutes {job} each day. How many hours does {name} spend {job} "
             "in 12 days?")
        ans = minutes * 12 // 60  # whole: 12 days of a multiple of 5 minutes
        sol = f"{name} spends {minutes} * 12 = {minutes * 12} minutes, and {minutes * 12} / 60 = {ans}."
    else:
        groups = b
        q = (f"{name} has {a * groups} {item} and {friend} has {c * groups} {other}. They pack all of them "
             f"into {groups} equal bags. How many things are in each bag?")
        ans = a + c
        sol = f"Together {a * groups} + {c * groups} = {(a + c) * groups}, and {(a + c) * groups} / {groups} = {ans}."
    return q, sol, ans


def synthetic_math(num: int, seed: int = 0) -> list[dict]:
    """``num`` rows ``{"id", "question", "answer"}``; the same (num, seed) gives the same rows."""
    rng = random.Random(seed)
    rows = []
    for i in range(num):
        q, sol, ans = _problem(rng)
        rows.append({"id": f"synth-{seed}-{i}", "question": q, "answer": f"{sol}\n#### {ans}"})
    return rows


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def final_answer(text: str | None) -> str | None:
    """The reference final answer: GSM8K's text after ``####``, else the text itself, stripped."""
    if text is None:
        return None
    text = str(text)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return text.strip().replace(",", "") or None


def iter_rows(path: Path):
    """(row number, dict) pairs from JSONL or Parquet; rows are 1-based as an editor shows them."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        for i, row in enumerate(table.to_pylist(), 1):
            yield i, row
        return
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{i}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            yield i, row


def _content(msg, at: str, name: str) -> str:
    """A chat message's text: its ``content`` string, or the text parts of a list of parts.
    ``at``: 'file:row: field', ``name``: the message's place ('messages[2]')."""
    if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
        raise DataError(f"{at} '{name}' must be a {{role, content}} message, got {_short(msg)}")
    content = msg["content"]
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):  # [{type: text, text}]
        content = "".join(p.get("text") or "" for p in content if p.get("type", "text") == "text")
    if not isinstance(content, str):
        raise DataError(f"{at} '{name}.content' must be a string, got {type(content).__name__}")
    return content


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _conversation(conv, at: str, name: str) -> tuple[str, str | None]:
    """(the last user turn, the assistant turn after it or None) of a TRL conversational column."""
    if not isinstance(conv, list):
        raise DataError(f"{at} '{name}' must be a list of {{role, content}} messages, got {type(conv).__name__}")
    texts = [_content(m, at, f"{name}[{k}]") for k, m in enumerate(conv)]
    users = [k for k, m in enumerate(conv) if m["role"] == "user"]
    if not users:
        roles = ", ".join(str(m["role"]) for m in conv) or "none"
        raise DataError(f"{at} '{name}' has no user turn (roles: {roles})")
    last = users[-1]
    if not texts[last].strip():
        raise DataError(f"{at} '{name}[{last}].content' is empty")
    reply = next((texts[k] for k in range(last + 1, len(conv)) if conv[k]["role"] == "assistant"), None)
    return texts[last], reply


def _completion(value, at: str) -> str | None:
    """A TRL completion: a string, or a list of messages whose assistant turns are the answer."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise DataError(f"{at} 'completion' must be a string or a list of messages, got {type(value).__name__}")
    texts = [_content(m, at, f"completion[{k}]") for k, m in enumerate(value)]
    return "".join(t for t, m in zip(texts, value) if m["role"] == "assistant") or None


def row_shape(row: dict, prompt_field: str) -> str:
    """Which shape a dataset has, from its first row: the configured fields (``data.prompt_field`` /
    ``data.answer_field``), TRL's conversational ``messages``, or TRL's ``prompt``/``completion``."""
    if prompt_field in row:
        return "fields"
    if "messages" in row:
        return "messages"
    if "prompt" in row:
        return "prompt_completion"
    return "fields"


def _reference(raw, where: str) -> str | None:
    """The answer field's value as text (None when absent)."""
    if raw is None:
        return None
    if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
        raise DataError(f"{where} must be a string or number")
    if isinstance(raw, float) and raw != raw:
        raise DataError(f"{where} is NaN")
    return str(raw)


def rows_to_records(rows, prompt_field: str, answer_field: str | None, where: str,
                    route: tuple[str, list[str]] | None = None) -> list[PromptRecord]:
    """Validate (row number, dict) pairs into prompt records; ``where`` names the source. The
    dataset's shape (``row_shape``) is read from its first row; every row must then have it.
    ``route``: (field, teacher names): every row's field must name one of the teachers."""
    records, shape = [], None
    for i, row in rows:
        shape = shape or row_shape(row, prompt_field)
        at = f"{where}:{i}: field"
        field_name = {"fields": prompt_field, "messages": "messages", "prompt_completion": "prompt"}[shape]
        if field_name not in row:
            raise DataError(f"{at} '{field_name}' is missing (row has: "
                            f"{', '.join(sorted(map(str, row))) or 'no fields'})")
        q, ref = row[field_name], None
        if shape == "messages" or isinstance(q, list):  # a conversation: its last user turn
            q, ref = _conversation(q, at, field_name)
        elif not isinstance(q, str):
            raise DataError(f"{at} '{field_name}' must be a string, got {type(q).__name__}")
        if not q.strip():
            raise DataError(f"{at} '{field_name}' is empty")
        if shape == "prompt_completion" and row.get("completion") is not None:
            ref = _completion(row["completion"], at)
        if ref is None and answer_field is not None:
            ref = _reference(row.get(answer_field), f"{at} '{answer_field}'")
        pid = str(row.get("id", f"{Path(where).stem}-{i}"))
        routed = None
        if route is not None:
            routed = row.get(route[0])
            if routed is None or str(routed) not in route[1]:
                got = "is missing" if routed is None else f"is {routed!r}"
                raise DataError(f"{where}:{i}: field '{route[0]}' (route.field) {got}; it must name a teacher "
                                f"({', '.join(route[1])})")
            routed = str(routed)
        records.append(PromptRecord(pid, q, final_answer(ref), ref, routed))
    if not records:
        raise DataError(f"{where}: no rows (empty dataset)")
    return records


def read_prompts(path: str | Path, prompt_field: str = "question", answer_field: str | None = "answer",
                 route: tuple[str, list[str]] | None = None):
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    return rows_to_records(iter_rows(path), prompt_field, answer_field, str(path), route)


def read_hf_dataset(spec: str, prompt_field: str, answer_field: str | None,
                    route: tuple[str, list[str]] | None = None) -> list[PromptRecord]:
    """``hf:NAME[:CONFIG]:SPLIT`` through the ``datasets`` library: a hub dataset (needs network),
    or ``hf:DIR`` / ``hf:DIR:SPLIT`` for a dataset (dict) saved with ``save_to_disk``."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.source={spec!r} needs the 'datasets' package: pip install datasets") from None
    parts = spec[len("hf:"):].split(":")
    local = Path(parts[0]).expanduser()
    try:
        if local.is_dir():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                split = parts[1] if len(parts) > 1 else "train"
                if split not in ds:
                    raise DataError(f"{spec}: no split '{split}' (has: {', '.join(ds)})")
                ds = ds[split]
        else:
            if len(parts) < 2:
                raise DataError(f"data.source={spec!r}: expected hf:NAME[:CONFIG]:SPLIT")
            name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]
            ds = datasets.load_dataset(name, config, split=split)
    except DataError:
        raise
    except Exception as e:  # the library's own errors (not found, offline, ...) in one line
        raise DataError(f"{spec}: cannot load: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return rows_to_records(enumerate(ds, 1), prompt_field, answer_field, spec, route)


def load_prompts(source: str, prompt_field: str, answer_field: str | None, num: int, seed: int,
                 route: tuple[str, list[str]] | None = None):
    """``route``: (field, teacher names) when prompts are routed to teachers by a field of the row."""
    if source == "synthetic_math":
        rows = enumerate(synthetic_math(num, seed), 1)
        return rows_to_records(rows, "question", "answer", "synthetic_math", route)
    if source.startswith("hf:"):
        return read_hf_dataset(source, prompt_field, answer_field, route)
    return read_prompts(source, prompt_field, answer_field, route)


# ---------------------------------------------------------------------------------------------
# Replay-buffer rows
# ---------------------------------------------------------------------------------------------

_ids = pa.list_(pa.int32())
_lps = pa.list_(pa.float32())

BUFFER_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt_ids", _ids, nullable=False),  # student-side prompt
        pa.field("teacher_prompt_ids", _ids, nullable=False),  # after priming
        pa.field("chosen_ids", _ids, nullable=False),  # y_t, the teacher's response
        pa.field("rejected_ids", _ids, nullable=False),  # y_s, the student's response
        pa.field("chosen_teacher_logps", _lps, nullable=False),
        pa.field("rejected_teacher_logps", _lps, nullable=False),
        pa.field("chosen_topk_ids", pa.list_(_ids)),  # teacher top-k at y_t's positions
        pa.field("chosen_topk_logps", pa.list_(_lps)),
        pa.field("rejected_topk_ids", pa.list_(_ids)),  # teacher top-k at the student's positions
        pa.field("rejected_topk_logps", pa.list_(_lps)),
        pa.field("rejected_behaviour_logps", _lps),  # the sampler's log-probs of y_s
        pa.field("policy_version", pa.int64(), nullable=False),
        pa.field("priming", pa.string()),
        pa.field("created_at", pa.float64()),
        pa.field("reference_answer", pa.string()),
        pa.field("teacher_name", pa.string()),  # which teacher pool made the row (null: before it was kept)
        # the text path (a teacher with another tokenizer, docs/teachers.md): the teacher's log-prob of
        # each response's TEXT under its own tokenizer, one sum per sequence (the per-token columns are
        # empty then); null on the same-tokenizer path and in rows written before these columns
        pa.field("chosen_teacher_logp_sum", pa.float64()),
        pa.field("rejected_teacher_logp_sum", pa.float64()),
    ]
)

# Columns added after the first release: rows written before them load with nulls there.
_LATER_COLUMNS = ("teacher_name", "chosen_teacher_logp_sum", "rejected_teacher_logp_sum")


def with_teacher_name(table: pa.Table) -> pa.Table:
    """Rows written before ``teacher_name`` existed (old datasets, checkpoints) get a null one."""
    if "teacher_name" in table.column_names:
        return table
    return table.append_column("teacher_name", pa.nulls(table.num_rows, pa.string()))


def with_optional_columns(table: pa.Table) -> pa.Table:
    """Rows written before a later column existed (old datasets, checkpoints) get nulls in it."""
    for name in _LATER_COLUMNS:
        if name not in table.column_names:
            field = BUFFER_SCHEMA.field(name)
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table
