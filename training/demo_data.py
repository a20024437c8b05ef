"""The seed task, "orders": a deterministic generator of instruction → JSON examples.

    lorafleet data demo --out data/orders

writes ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` and ``schema.json``.
The same seed always gives the same bytes (a test checks the bundled copy
against the generator).

The test split measures generalisation, not memorisation: it uses phrasing
templates and first/last names that the train and validation splits never
contain.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
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
    instruction = rng.choice(tpl_pool).format(name=name, email=email, order_id=order_id, status=status)
    output = {"customer": {"name": name, "email": email}, "order_id": order_id, "status": status}
    return instruction, output


def generate(seed: int = 0) -> dict[str, list[dict]]:
    """Every split of the orders task as lists of ``{"instruction", "output"}`` rows."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split in SPLITS:
        rows: list[dict] = []
        while len(rows) < split.size:
            instruction, output = _record(rng, split.held_out)
            if instruction in seen:
                continue
            seen.add(instruction)
            rows.append({"instruction": instruction, "output": json.dumps(output, ensure_ascii=False)})
        splits[split.name] = rows
    return splits


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
