"""The orders robustness split: requests that share nothing with training.

    lorafleet data demo --out data/orders        # writes robust.jsonl beside the other splits

The test split of ``training.demo_data`` holds out some templates and names,
but it is still the generator's own kind of sentence. This split is what a
client app sends: phrasings, names, email and order-id shapes the training
generator never uses, from a seed and pools of its own, kept in this module
and nowhere else (a test checks that no template fragment or name of it occurs
in the training rows):

- templates written apart from the training ones, values often at the end of a
  sentence with its punctuation right after them (``... write to a@b.example.``);
- names from many languages, with diacritics, apostrophes, hyphens and
  multi-word surnames;
- emails with plus-addressing, four-label domains, the surname first;
- order ids with slashes, dots, a country code or lower-case hex.

Only the schema and its status values are the training task's own.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

from contract.examples import jsonl_text
from training.demo_data import STATUSES, email_local, order_row, unique_rows

ROBUST_SEED = "orders-robust"
ROBUST_ROWS = 200

TEMPLATES = [
    "New order just came in: {order_id} ({status}). Whoever bought it, {name}, reads mail at {email}.",
    "Could you give me the JSON for {name}'s purchase? It's {order_id}, currently {status}, and their "
    "address is {email}.",
    "ticket about {order_id} from {name}, who is waiting on it ({status}); reply-to {email}!",
    "From the CRM export -> {order_id} | {status} | {name} | {email}",
    "Dear team, please log purchase {order_id} under {name}. It is {status} as of this morning. "
    "Mailbox on the account: {email}.",
    "{status}, that's where purchase {order_id} stands. Owner: {name}, contact {email}.",
    "Put this in JSON for me: the person is {name}, the mailbox is {email}, the reference is {order_id}, "
    "and it's {status}.",
    "ref={order_id}; who={name}; mail=<{email}>; state={status}",
    "Quick one. {name} ({email}) asked about {order_id}. Mark it {status}.",
    "Serialize the following purchase as JSON. Purchaser: {name}. Reference: {order_id}. Current state: "
    "{status}. Notify {email}.",
    'Our records show {name} owns purchase {order_id}, which is {status}; the address we have is "{email}".',
    "Got a message from {name} regarding {order_id}. Current state is {status}. They asked us to reply to {email}.",
    "Support note: '{order_id}' has moved to {status}. Requester {name}. Contact at {email}?",
    "{name} is the buyer. Reference {order_id}. State {status}. Reachable via {email}.",
]
FIRST_NAMES = [
    "Åsa",
    "Chloé",
    "Dóra",
    "Fionnuala",
    "Gráinne",
    "Hafsa",
    "Ikaika",
    "Jüri",
    "Kåre",
    "Leilani",
    "Mirela",
    "Nnamdi",
    "Oksana",
    "Pilar",
    "Radhika",
    "Saoirse",
    "Teodora",
    "Uchenna",
    "Vuk",
    "Wiremu",
    "Ximena",
    "Yerlan",
    "Zdeněk",
    "Anaïs",
    "Bérénice",
    "Cătălina",
    "Émile",
    "Hüseyin",
    "Ioana",
    "Jean-Baptiste",
    "Mary-Kate",
    "D'Arcy",
    "Ljubica",
    "Mónica",
    "Rūta",
    "Sigríður",
    "Tamar",
    "Ulla",
    "Valentijn",
    "Witold",
]
LAST_NAMES = [
    "de los Ángeles",
    "van den Broek",
    "O'Sullivan",
    "Al Mansouri",
    "Fitz-Gerald",
    "Nakagawa-Smith",
    "Lê Văn",
    "Ekström",
    "Þórsdóttir",
    "Wójcik",
    "Kılıç",
    "Mwangi-Otieno",
    "Albuquerque Neto",
    "Ndlovu",
    "Uwimana",
    "Bergström",
    "Kristiansen",
    "Achterberg",
    "Delacroix",
    "Saint-Just",
    "de Vries",
    "Mbatha",
    "Oyelaran",
    "Vukašinović",
    "Čapek",
    "ter Horst",
    "Ó Faoláin",
    "El Idrissi",
    "Zúñiga",
    "Bălănescu",
]
DOMAINS = [
    "dept.eu.example.org",
    "mx1.mail.example.co.nz",
    "team.acme-store.example.net",
    "users.example.ac.za",
    "inbox.example.museum",
    "alumni.uni-example.edu",
]
TAGS = ["orders", "shop", "2026", "receipts", "billing"]


def _record(rng: random.Random) -> tuple[str, dict]:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    name = f"{first} {last}"
    given, family = email_local(first), email_local(last).replace(".", "")
    local = rng.choice(
        [
            f"{given}+{rng.choice(TAGS)}",
            f"{family}.{given}",
            f"{given}.{family[0]}",
            f"{given[0]}{family[0]}+{rng.choice(TAGS)}",
        ]
    )
    email = f"{local}@{rng.choice(DOMAINS)}"
    order_id = rng.choice(
        [
            f"PO/{rng.randint(2019, 2026)}/{rng.randint(0, 99999):05d}",
            f"{rng.randint(2019, 2026)}-{rng.choice(['DE', 'FR', 'NZ', 'ZA', 'BR'])}-{rng.randint(0, 99999):05d}",
            f"{rng.getrandbits(16):04x}-{rng.getrandbits(16):04x}",
            f"K{rng.randint(10, 99)}.{rng.randint(1000, 9999)}",
        ]
    )
    status = rng.choice(STATUSES)
    return order_row(rng.choice(TEMPLATES), name, email, order_id, status)


def generate(seed: int = 0) -> list[dict]:
    """The robustness split as ``{"instruction", "output"}`` rows, from its own seed."""
    return unique_rows(partial(_record, random.Random(f"{ROBUST_SEED}:{seed}")), ROBUST_ROWS, set())


def write(out_dir: Path, seed: int = 0) -> Path:
    """Write ``robust.jsonl`` under ``out_dir`` (beside the orders splits); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "robust.jsonl"
    path.write_text(jsonl_text(generate(seed)), "utf-8")
    return path
