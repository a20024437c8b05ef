"""The seed task, "orders": a deterministic generator of instruction → JSON examples.

    lorafleet data demo --out data/orders

writes ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` and ``schema.json``.
The same seed always gives the same bytes (a test checks the bundled copy
against the generator).

The test split measures generalisation, not memorisation: it uses phrasing
templates and first/last names that the train and validation splits never
contain. It is still the generator's own kind of sentence; the robustness split
(``training.orders_robust``, ``robust.jsonl``) shares nothing with training.

The train split is the base rows (the first 1600 draws, unchanged since the
first release, as are the validation and test splits) followed by the *wide*
rows: their own templates, names from many languages (diacritics, apostrophes,
hyphens, multi-word surnames), more email and order-id shapes, punctuation
right after a value ("... email: a@b.example.") and noise in spacing and case
around the values, so an adapter learns to copy a value exactly wherever it
stands, not the base rows' sentences.
"""

from __future__ import annotations

import json
import random
import re
import string
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from contract.examples import jsonl_text

STATUSES = ["pending", "processing", "shipped", "delivered", "cancelled", "refunded", "on_hold"]

ORDERS_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Order",
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "email": {"type": "string", "format": "email"},
            },
            "required": ["name", "email"],
            "additionalProperties": False,
        },
        "order_id": {"type": "string", "minLength": 1},
        "status": {"type": "string", "enum": STATUSES},
    },
    "required": ["customer", "order_id", "status"],
    "additionalProperties": False,
}

# Placeholders: {name} {email} {order_id} {status}. Each template orders the
# fields differently; the last TEST_TEMPLATES are held out for the test split.
TEMPLATES = [
    "Generate a JSON object for a customer named {name}, email {email}, and an order ID of "
    "{order_id}. Mark the order status as '{status}'.",
    "Create a JSON record: customer {name} ({email}), order {order_id}, status {status}.",
    "Order {order_id} belongs to {name}, who can be reached at {email}. Its status is {status}. Return this as JSON.",
    "Please output JSON for the following order. Status: {status}. Order number: {order_id}. "
    "Customer: {name}. Email: {email}.",
    "{name} <{email}> placed order #{order_id}; it is currently {status}. Produce the JSON object.",
    "Build the order JSON. The customer's email is {email} and their name is {name}; the order "
    "ID is {order_id} and the status should be '{status}'.",
    'I need a JSON object describing order {order_id} with status "{status}" for customer '
    "{name}, email address {email}.",
    "Convert to JSON -> name: {name}; email: {email}; order id: {order_id}; status: {status}",
    "Set the status of order {order_id} to {status}. The customer is {name} and the email on "
    "file is {email}. Respond with JSON only.",
    "Write a JSON object for an order with ID {order_id}. Customer name {name}, customer email "
    "{email}, order status {status}.",
    "Order ID: {order_id}\nCustomer: {name}\nEmail: {email}\nStatus: {status}\nReturn the JSON.",
    "Hi! Can you turn this into JSON? {name} ordered something (order {order_id}), email is {email}, "
    "and the order is {status}.",
    "JSON please: the {status} order {order_id} from {email} ({name}).",
    "Record the order for {name}. Order reference {order_id}; status={status}; e-mail {email}.",
    "Encode as a JSON order: customer_email={email} customer_name={name} status={status} id={order_id}",
    "The order {order_id} placed by {name} is {status}. Contact email: {email}. Output only the JSON object.",
    "Make an order object in JSON. Email {email}. Status {status}. Name {name}. ID {order_id}.",
    "We have an order ({order_id}) with status {status}; the buyer is {name} and their email address "
    "is {email}. JSON output, please.",
    "Fill in the order JSON from this note: '{name}, {email}, #{order_id}, {status}'.",
    "Customer name is {name}. Order {order_id} has the status {status}. Their email: {email}. Give the JSON.",
    "Order {order_id} for {name} ({email}) was marked {status} today. I need it as JSON.",
    "Heads up: {email} ({name}) says order {order_id} is now {status}. JSON, please.",
    # held out for the test split
    "Customer {name} (contact: {email}) has an order, ID {order_id}, that is now marked {status}. Give me the JSON.",
    "Status '{status}' applies to order {order_id}. Please encode it as JSON together with the "
    "buyer's details: {name}, {email}.",
    "Return a JSON order object. order_id={order_id}, customer name={name}, customer email={email}, status={status}.",
]
TEST_TEMPLATES = 3

FIRST_NAMES = [
    "John",
    "Maria",
    "Wei",
    "Aisha",
    "Carlos",
    "Emma",
    "Liam",
    "Sofia",
    "Noah",
    "Yuki",
    "Olga",
    "Mateo",
    "Chloe",
    "Arjun",
    "Fatima",
    "Lucas",
    "Ingrid",
    "Kwame",
    "Hana",
    "Diego",
    "Priya",
    "Elena",
    "Omar",
    "Grace",
    "Tomás",
    "Zoe",
    "Ivan",
    "Leila",
    "Mikael",
    "Nora",
    "Ahmed",
    "Beatriz",
    "Chen",
    "Daniel",
    "Eun-ji",
    "Felix",
    "Gabriela",
    "Hassan",
    "Ines",
    "Jakub",
    "Kofi",
    "Lena",
    "Marco",
    "Nadia",
    "Oscar",
    "Paula",
    "Rafael",
    "Sara",
    "Tariq",
    "Ursula",
    "Victor",
    "Wanjiru",
    "Xavier",
    "Yusuf",
    "Zara",
    "Anna",
    "Ben",
    "Clara",
    "David",
    "Eva",
    "Frank",
    "Gita",
    "Henrik",
    "Irina",
    "Jamal",
    "Kaito",
    "Lucia",
    "Mohammed",
    "Nina",
    "Pedro",
    # held out for the test split
    "Amara",
    "Bjorn",
    "Camille",
    "Dmitri",
    "Esther",
    "Farid",
    "Gianna",
    "Hiro",
    "Isla",
    "Jonas",
]
LAST_NAMES = [
    "Doe",
    "Garcia",
    "Zhang",
    "Khan",
    "Silva",
    "Smith",
    "Müller",
    "Rossi",
    "Kim",
    "Tanaka",
    "Novak",
    "Lopez",
    "Dubois",
    "Patel",
    "Haddad",
    "Costa",
    "Larsen",
    "Mensah",
    "Sato",
    "Ruiz",
    "Iyer",
    "Petrova",
    "Farouk",
    "Walsh",
    "Fernández",
    "Clark",
    "Volkov",
    "Nasser",
    "Berg",
    "Quinn",
    "Alvarez",
    "Brown",
    "Chowdhury",
    "Dimitrov",
    "Eriksen",
    "Fischer",
    "Gonzalez",
    "Hoffmann",
    "Ivanova",
    "Jensen",
    "Kowalski",
    "Lee",
    "Martin",
    "Nakamura",
    "Okafor",
    "Park",
    "Reyes",
    "Schmidt",
    "Torres",
    "Usman",
    "Vargas",
    "Wong",
    "Yilmaz",
    "Zielinski",
    "Andersson",
    "Baker",
    "Cohen",
    "Diallo",
    "Evans",
    "Ferreira",
    "Gupta",
    "Hughes",
    "Ito",
    "Johansson",
    "Kaur",
    "Lambert",
    "Moreno",
    "Nguyen",
    "O'Brien",
    "Pereira",
    # held out for the test split
    "Abara",
    "Lindqvist",
    "Moreau",
    "Sokolov",
    "Adler",
    "Rahimi",
    "Bianchi",
    "Watanabe",
    "McLeod",
    "Weber",
]
TEST_NAMES = 10
# 60% of the training names are invented from these syllables: names the model
# cannot have memorised teach it to copy names and emails exactly, which is
# what the held-out names (never seen in training) then need.
SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ren",
    "to",
    "sha",
    "vik",
    "el",
    "dra",
    "nu",
    "bo",
    "zel",
    "ta",
    "mar",
    "quin",
    "ise",
    "ro",
    "fen",
    "ga",
    "lu",
    "tor",
    "wen",
    "ya",
    "xi",
    "pe",
    "dor",
    "an",
    "sol",
    "bri",
    "che",
]
INVENTED_SHARE = 0.6
# A third of the training emails are handles unrelated to the name: otherwise the
# model learns to derive the email from the name instead of copying it, and
# derives it wrongly for a surname it has never seen.
HANDLE_SHARE = 0.35
DOMAINS = ["example.com", "mail.com", "shop.io", "corp.net", "inbox.org", "example.co.uk"]

# The wide rows (training only). Every value is followed somewhere by punctuation that is not part of it.
WIDE_TEMPLATES = [
    "Please create the order JSON. Name: {name}. Email: {email}. Order: {order_id}. Status: {status}.",
    "The customer {name} can be contacted at {email}. Their order {order_id} is {status}.",
    "order {order_id} is {status}, customer is {name}, email: {email}.",
    "JSON for this, please: {name}, {email}, {order_id}, {status}.",
    "{name} just emailed from {email}! Order {order_id}, status {status}!",
    "Status of {order_id}? {status}. Customer? {name}. Email? {email}.",
    "Add order {order_id} ({status}) for {name}; send updates to {email}.",
    'Customer: "{name}", email: "{email}", order: "{order_id}", status: "{status}". Convert to JSON.',
    "I'm writing about order {order_id}. It's {status}. My name is {name} and my email is {email}.",
    "{order_id} / {status} / {name} / {email} - make this a JSON order.",
    "Log this order as JSON: it was placed by {name} (email {email}), it has ID {order_id} and status {status}.",
    "need json. customer {name}. mail {email}. order {order_id}. it's {status}.",
    "Email {email}; name {name}; order {order_id}; status {status}.",
    "Please record that {name}'s order {order_id} is {status}. Their email address is {email}.",
    "Turn this into the order JSON:\n- customer: {name}\n- email: {email}\n- id: {order_id}\n- status: {status}\n",
    "Order {order_id} ({status}) belongs to {name}, whose email is {email}.",
    "{status}: order {order_id}. Customer {name} <{email}>.",
    "Hello, this is {name}. My order is {order_id} and it shows {status}. Write back to {email}.",
    "[{order_id}] {name} - {email} - {status}",
    "Can you JSON-ify this order? {name}, {order_id}, {status}, and the email is {email}!",
]
WIDE_FIRST_NAMES = [
    "Zoë",
    "José",
    "Søren",
    "Ólafur",
    "Łukasz",
    "Çağla",
    "Thảo",
    "Chiamaka",
    "Oluwaseun",
    "Siobhán",
    "Jean-Luc",
    "Marie-Claire",
    "Anne-Sophie",
    "D'Andre",
    "Björk",
    "Małgorzata",
    "Žofia",
    "Ştefan",
    "Iñaki",
    "Aoife",
    "Ngozi",
    "Tendai",
    "Xóchitl",
    "Giorgos",
    "Nikolaj",
    "Eleftheria",
    "Rania",
    "Parvati",
    "Sunil",
    "Mei-Ling",
    "Hye-jin",
    "Thandiwe",
    "Kalani",
    "Ayşe",
    "Gökhan",
    "Dagný",
    "Ebru",
    "Renée",
    "François",
    "Agnieszka",
    "Bogdan",
    "Vasilisa",
    "Lindiwe",
    "Sione",
    "Tahu",
    "Keanu",
    "Amaru",
    "Inti",
    "Ruslan",
    "Zhanna",
    "Aigerim",
    "Nurlan",
    "Dilnoza",
    "Shirin",
    "Kourosh",
    "Yael",
    "Avraham",
    "Miriam",
    "Esperanza",
    "Joaquín",
    "Maël",
    "Noémie",
    "Lorenzo",
    "Chiara",
    "Wojciech",
    "Jiří",
    "Dáire",
    "Pádraig",
    "Kaja",
    "Tuğba",
]
WIDE_LAST_NAMES = [
    "van der Berg",
    "de la Cruz",
    "Al-Amin",
    "O'Connor",
    "D'Souza",
    "Smith-Jones",
    "García Márquez",
    "Nguyễn",
    "Trần",
    "Øvergaard",
    "Łęcki",
    "Çelik",
    "Şahin",
    "Adeyemi",
    "Okonkwo",
    "Mbeki",
    "Ní Bhriain",
    "Mac Giolla",
    "Van Dyke",
    "dos Santos",
    "Papadopoulos",
    "Kovačević",
    "Horváth",
    "Szabó",
    "Dvořák",
    "Jóhannsdóttir",
    "Guðmundsson",
    "Kealoha",
    "Tupou",
    "Ramírez-Ortiz",
    "Le Roux",
    "St. Clair",
    "bin Rashid",
    "Abu Bakr",
    "Kuznetsova",
    "Bekov",
    "Tehrani",
    "Ben-David",
    "Levi",
    "Hernández",
    "Quispe",
    "Mamani",
    "Schäfer",
    "Großmann",
    "Lefèvre",
    "Wiśniewska",
    "Nowakowski",
    "Håkansson",
    "Yıldız",
    "Ōta",
]
# Invented names from syllables with diacritics and joins: names no pretrained model has seen, spelt exactly.
WIDE_SYLLABLES = ["ño", "zé", "øy", "lü", "ša", "ğa", "ká", "mé", "ði", "ło", "va", "ren", "tï", "bå", "ju", "ko"]
WIDE_DOMAINS = [
    "post.example.de",
    "correo.example.es",
    "example.fr",
    "mail.example.jp",
    "web-shop.example",
    "example.com.br",
    "example.pl",
    "example.ie",
    "sales.example.net",
    "example.travel",
]
WIDE_ROWS = 1400
WIDE_INVENTED_SHARE = 0.5
# Order-id shapes the robustness split keeps for itself (it never shares a shape with training, so it measures
# copying, not recall): a random id of one of these shapes is drawn again.
RESERVED_ID_SHAPES = re.compile(r"[A-Z]{2}/\d{4}/\d{5}|\d{4}-[A-Z]{2}-\d{5}|[0-9a-f]{4}-[0-9a-f]{4}|[A-Z]\d\d\.\d{4}")
# Noise in the sentence around the values (never in a value): lower case, upper case, doubled spaces, a space
# before punctuation.
NOISE = {"lower": 0.2, "upper": 0.05, "double_space": 0.15, "space_before_punct": 0.1}


@dataclass(frozen=True)
class Split:
    name: str
    size: int
    held_out: bool  # draw from the held-out templates and names


SPLITS = [Split("train", 1600, False), Split("validation", 100, False), Split("test", 200, True)]


def _ascii(s: str) -> str:
    table = str.maketrans("áéíóúüöäñç", "aeiouuoanc", "' ")
    return s.lower().translate(table)


def _invented(rng: random.Random, low: int, high: int, avoid: list[str]) -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(low, high))).capitalize()
        if name not in avoid:
            return name


def _record(rng: random.Random, held_out: bool) -> tuple[str, dict]:
    tpl_pool = TEMPLATES[-TEST_TEMPLATES:] if held_out else TEMPLATES[:-TEST_TEMPLATES]
    first_pool = FIRST_NAMES[-TEST_NAMES:] if held_out else FIRST_NAMES[:-TEST_NAMES]
    last_pool = LAST_NAMES[-TEST_NAMES:] if held_out else LAST_NAMES[:-TEST_NAMES]
    first, last = rng.choice(first_pool), rng.choice(last_pool)
    if not held_out and rng.random() < INVENTED_SHARE:
        first, last = _invented(rng, 2, 3, FIRST_NAMES), _invented(rng, 2, 4, LAST_NAMES)
    name = f"{first} {last}"
    local = rng.choice(
        [
            f"{_ascii(first)}",
            f"{_ascii(first)}.{_ascii(last)}",
            f"{_ascii(first)[0]}{_ascii(last)}",
            f"{_ascii(last)}{rng.randint(1, 99)}",
        ]
    )
    if not held_out and rng.random() < HANDLE_SHARE:
        local = _invented(rng, 1, 3, []).lower() + rng.choice(["", ".", "_"]) + str(rng.randint(1, 999))
    email = f"{local}@{rng.choice(DOMAINS)}"
    order_id = rng.choice(
        [
            str(rng.randint(10000, 99999)),
            f"ORD-{rng.randint(1000, 999999)}",
            f"{rng.choice('ABCDEFGHJK')}{rng.randint(100, 9999)}",
        ]
    )
    status = rng.choice(STATUSES)
    return order_row(rng.choice(tpl_pool), name, email, order_id, status)


def order_row(template: str, name: str, email: str, order_id: str, status: str) -> tuple[str, dict]:
    """An example of the task: the template filled with the values, and the order they make."""
    instruction = template.format(name=name, email=email, order_id=order_id, status=status)
    return instruction, {"customer": {"name": name, "email": email}, "order_id": order_id, "status": status}


# Letters NFKD does not take apart into an ASCII letter and a mark.
FOLD = str.maketrans(
    {"ł": "l", "Ł": "L", "ø": "o", "Ø": "O", "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "Th"}
    | {"æ": "ae", "Æ": "Ae", "ß": "ss", "ı": "i"}
)


def email_local(text: str) -> str:
    """A name as an email's local part: ASCII, lower case, no spaces or apostrophes (``Łęcki`` -> ``lecki``)."""
    decomposed = unicodedata.normalize("NFKD", text.translate(FOLD))
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return "".join(c for c in plain.lower() if c.isascii() and (c.isalnum() or c in "-."))


def noisy(template: str, rng: random.Random) -> str:
    """The template with noise in its own words (case, spacing), never in the ``{placeholders}`` it fills."""
    pieces = []
    lower, upper = rng.random() < NOISE["lower"], rng.random() < NOISE["upper"]
    double, before = rng.random() < NOISE["double_space"], rng.random() < NOISE["space_before_punct"]
    for literal, field, _, _ in string.Formatter().parse(template):
        text = literal.lower() if lower else literal.upper() if upper else literal
        if double:
            text = text.replace(" ", "  ")
        if before:
            text = "".join(" " + c if c in ",;:!?" else c for c in text)
        pieces.append(text + ("{" + field + "}" if field else ""))
    return "".join(pieces)


def _invented_name(rng: random.Random) -> tuple[str, str]:
    first = "".join(rng.choice(WIDE_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()
    last = "".join(rng.choice(WIDE_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()
    joined = rng.choice(["", "", "", "van ", "O'", "Al-", "de ", "Mc", "di "]) + last
    if rng.random() < 0.15:
        joined += rng.choice(["-", " "]) + "".join(rng.choice(WIDE_SYLLABLES) for _ in range(2)).capitalize()
    return first, joined


def _segment(rng: random.Random) -> str:
    kind = rng.choice(["digits", "upper", "lower", "hex", "alnum"])
    size = rng.randint(1, 6)
    alphabet = {
        "digits": string.digits,
        "upper": string.ascii_uppercase,
        "lower": string.ascii_lowercase,
        "hex": "0123456789abcdef",
        "alnum": string.ascii_uppercase + string.digits,
    }[kind]
    return "".join(rng.choice(alphabet) for _ in range(size))


def _wide_order_id(rng: random.Random) -> str:
    """An id of 1-4 random segments (digits, letters, hex) joined by any of - / . _ : or nothing: copying it
    whole, whatever its shape, is what is learnt. Shapes in ``RESERVED_ID_SHAPES`` are drawn again."""
    while True:
        parts = [_segment(rng) for _ in range(rng.randint(1, 4))]
        order_id = parts[0] + "".join(rng.choice(["-", "/", ".", "_", ":", ""]) + p for p in parts[1:])
        if len(order_id) >= 3 and not RESERVED_ID_SHAPES.fullmatch(order_id):
            return order_id


def _wide_domain(rng: random.Random) -> str:
    """2-3 labels: a pool domain, or invented labels (some two letters, like a country) and a top-level one."""
    if rng.random() < 0.4:
        return rng.choice(WIDE_DOMAINS)
    labels = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.3:
        labels.insert(rng.randrange(len(labels) + 1), rng.choice(["de", "eu", "us", "fr", "jp", "mx", "in"]))
    top = rng.choice(["com", "net", "org", "io", "dev", "app", "shop", "de", "nl", "se"])
    return ".".join([*labels[:2], top])


def _wide_record(rng: random.Random) -> tuple[str, dict]:
    if rng.random() < WIDE_INVENTED_SHARE:
        first, last = _invented_name(rng)
    else:
        first, last = rng.choice(WIDE_FIRST_NAMES), rng.choice(WIDE_LAST_NAMES)
    name = f"{first} {last}"
    given, family = email_local(first), email_local(last)
    local = rng.choice(
        [
            f"{given}.{family}",
            f"{given}_{family}",
            f"{given}-{family}",
            f"{given[0]}.{family}",
            f"{family}{rng.randint(1, 2026)}",
            f"{given}{family[:3]}",
            f"{family}_{given[0]}{rng.randint(1, 99)}",
        ]
    ).strip("-.")
    if rng.random() < HANDLE_SHARE:
        local = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) + rng.choice(["", "_", "-", "."])
        local += str(rng.randint(1, 99999))
    email = f"{local}@{_wide_domain(rng)}"
    order_id = _wide_order_id(rng)
    status = rng.choice(STATUSES)
    return order_row(noisy(rng.choice(WIDE_TEMPLATES), rng), name, email, order_id, status)


def generate(seed: int = 0) -> dict[str, list[dict]]:
    """Every split of the orders task as lists of ``{"instruction", "output"}`` rows.

    The base rows come first from one stream (as they always did); the wide rows are drawn from a stream of
    their own and added to the train split."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split in SPLITS:
        splits[split.name] = unique_rows(partial(_record, rng, split.held_out), split.size, seen)
    wide = random.Random(f"orders-wide:{seed}")
    splits["train"] += unique_rows(partial(_wide_record, wide), WIDE_ROWS, seen)
    return splits


def unique_rows(draw: Callable[[], tuple[str, dict]], size: int, seen: set[str]) -> list[dict]:
    """``size`` rows from ``draw``, none with an instruction in ``seen`` (which grows)."""
    rows: list[dict] = []
    while len(rows) < size:
        instruction, output = draw()
        if instruction in seen:
            continue
        seen.add(instruction)
        rows.append({"instruction": instruction, "output": json.dumps(output, ensure_ascii=False)})
    return rows


def write(out_dir: Path, seed: int = 0) -> list[Path]:
    """Write the splits and the schema under ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in generate(seed).items():
        path = out_dir / f"{name}.jsonl"
        path.write_text(jsonl_text(rows), "utf-8")
        written.append(path)
    schema_path = out_dir / "schema.json"
    schema_path.write_text(json.dumps(ORDERS_SCHEMA, indent=2) + "\n", "utf-8")
    written.append(schema_path)
    return written
