"""Deterministic fake data for the example CRM: fictional people, reserved phone numbers and domains.

Phone numbers use Ofcom's drama range (07700 900xxx), e-mail addresses the reserved ``example.*``
domains. ``generate()`` returns the records; ``seed(conn)`` writes them to a CRM database.
"""

# ruff: noqa: S608  (table and column names are fixed constants, values are always bound parameters)

from __future__ import annotations

import random
import sqlite3
from datetime import date, datetime, time, timedelta
from typing import Any

from examples.crm.app import RESOURCES, init_schema, to_db

SEED = 20261122
TODAY = date(2026, 11, 22)
SERVICE = "Northgate Counselling Service"
N_CLIENTS = 200

Record = dict[str, Any]

STAFF: list[Record] = [
    {"username": "alice", "name": "Alice Morgan", "role": "counsellor", "supervisor": "carol"},
    {"username": "bob", "name": "Bob Fletcher", "role": "counsellor", "supervisor": "carol"},
    {"username": "chen", "name": "Chen Liu", "role": "counsellor", "supervisor": "carol"},
    {"username": "dev", "name": "Dev Raman", "role": "counsellor", "supervisor": "carol"},
    {"username": "fatima", "name": "Fatima Qureshi", "role": "counsellor", "supervisor": "sam"},
    {"username": "george", "name": "George Pellow", "role": "counsellor", "supervisor": "sam"},
    {"username": "hana", "name": "Hana Novak", "role": "counsellor", "supervisor": "sam"},
    {"username": "ivan", "name": "Ivan Marsh", "role": "counsellor", "supervisor": "sam"},
    {"username": "carol", "name": "Carol Whitfield", "role": "supervisor", "supervisor": None},
    {"username": "sam", "name": "Sam Adeyemi", "role": "supervisor", "supervisor": None},
    {"username": "erin", "name": "Erin Calloway", "role": "admin", "supervisor": None},
    {"username": "dana", "name": "Dana Holloway", "role": "service_manager", "supervisor": None},
]
COUNSELLORS = [s["username"] for s in STAFF if s["role"] == "counsellor"]
STAFF_NAMES = {s["username"]: s["name"] for s in STAFF}

FEMALE_NAMES = [
    "Olivia", "Amelia", "Isla", "Ava", "Mia", "Grace", "Freya", "Lily", "Sophie", "Evie", "Ruby",
    "Poppy", "Chloe", "Zara", "Aisha", "Niamh", "Megan", "Hannah", "Leah", "Jasmine", "Priya", "Maryam",
    "Ellie", "Karen", "Susan", "Julie", "Agnieszka", "Bethany", "Nadia", "Rachel",
]  # fmt: skip
MALE_NAMES = [
    "Oliver", "George", "Harry", "Noah", "Jack", "Leo", "Oscar", "Charlie", "Jacob", "Alfie", "Thomas",
    "James", "Callum", "Rhys", "Owen", "Kieran", "Ethan", "Mohammed", "Yusuf", "Arjun", "Tomasz",
    "Liam", "Daniel", "Samuel", "Connor", "Joel", "Nathan", "Paul", "Mark", "Stephen",
]  # fmt: skip
LAST_NAMES = [
    "Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Johnson", "Davies", "Robinson",
    "Wright", "Thompson", "Evans", "Walker", "White", "Roberts", "Green", "Hall", "Wood", "Jackson",
    "Clarke", "Patel", "Khan", "Hughes", "Edwards", "Lewis", "Turner", "Hill", "Harris", "Cooper",
    "Ward", "Morris", "Ali", "Kaur", "Begum", "Nowak", "Kelly", "Murphy", "Shaw", "Holmes", "Barker",
    "Atkinson", "Lister", "Dixon",
]  # fmt: skip
STREETS = [
    "Elm Grove", "Station Road", "Chapel Lane", "Victoria Street", "Moorland Avenue", "Mill Close",
    "Beech Crescent", "Park View", "Church Walk", "Hollin Drive", "Quarry Hill", "Kings Road", "Alder Way",
    "Westfield Terrace", "Canal Side", "Oak Bank", "Greenhow Street", "Lidgett Lane",
]  # fmt: skip
TOWNS = [
    ("Leeds", "LS"), ("Bradford", "BD"), ("Wakefield", "WF"), ("Huddersfield", "HD"), ("Halifax", "HX"),
    ("Harrogate", "HG"), ("York", "YO"), ("Keighley", "BD"), ("Otley", "LS"), ("Dewsbury", "WF"),
]  # fmt: skip
SURGERIES = [
    "Riverside Medical Practice", "The Beeches Surgery", "Moorview Health Centre", "Hillside Family Practice",
    "Canal Street Surgery", "Parkside Medical Centre", "Oakwood Group Practice", "Northgate Health Centre",
]  # fmt: skip
REFERRAL_SOURCES = [
    "GP referral", "self-referral", "website", "friend or family", "school", "employer", "social services",
]  # fmt: skip
TLDS = ["com", "org", "net"]
STATUSES = ["attended", "cancelled", "did_not_attend"]
POSTCODE_LETTERS = "ABDEFGHJLNPQRSTUWXYZ"

# (session summary, what was talked about) by client category
TOPICS: dict[str, list[tuple[str, str]]] = {
    "adult": [
        ("Explored low mood and poor sleep", "low mood and poor sleep"),
        ("Reviewed anxiety coping strategies", "the breathing and grounding techniques for anxiety"),
        ("Discussed bereavement and family relationships", "the death of a parent last year"),
        ("Worked on work-related stress and boundaries", "pressure at work and saying no"),
        ("Explored the end of a long relationship", "the end of a twelve-year relationship"),
        ("Reviewed progress towards agreed goals", "progress towards the goals set at assessment"),
        ("Talked through panic attacks on public transport", "panic attacks on the bus to work"),
        ("Explored guilt and self-criticism", "a harsh inner critic"),
    ],
    "child": [
        ("Used drawing to talk about school worries", "worries about school"),
        ("Discussed friendships and falling out at school", "a falling-out with friends"),
        ("Explored feelings about parents' separation", "mum and dad living apart"),
        ("Worked on managing anger at home", "arguments at home"),
        ("Talked about exam pressure and sleep", "exam pressure"),
        ("Played a feelings card game to name emotions", "naming feelings"),
    ],
    "adult_services": [
        ("Discussed settling into supported housing", "the move into supported housing"),
        ("Explored loneliness since moving area", "loneliness since moving area"),
        ("Worked on managing frustration with carers", "frustration with changing carers"),
        ("Reviewed routine and day-centre attendance", "the weekly routine"),
    ],
    "coaching": [
        ("Set goals for a career change", "a possible career change"),
        ("Reviewed confidence when presenting at work", "presenting to senior colleagues"),
        ("Explored work-life balance", "long hours and family time"),
        ("Planned steps towards returning to study", "returning to study"),
    ],
}
OPENINGS = [
    "{first} arrived on time and engaged well.",
    "{first} was quieter than usual at the start of the session.",
    "{first} said the past week had been difficult.",
    "{first} reported a better week overall.",
    "{first} arrived a few minutes late and apologised.",
]
MIDDLES = [
    "We spent most of the session on {topic}.",
    "{first} talked at length about {topic} and became tearful at one point.",
    "We returned to {topic} from last time; {first} described it with more distance this week.",
    "{first} found it hard to stay with {topic} but was able to name what felt stuck.",
]
CLOSINGS = [
    "We agreed to continue with weekly sessions.",
    "Agreed homework: keep a short mood diary until next session.",
    "{first} said it helped to put things into words.",
    "We planned to review goals in two sessions' time.",
    "Next session booked; no concerns raised about attendance.",
]
RISK_FACTORS = [
    "self-harm history", "suicidal ideation", "substance use", "domestic abuse", "safeguarding concern",
    "social isolation", "recent bereavement",
]  # fmt: skip
PROCESS_NOTES = [
    "I noticed feeling protective of {first} when we talked about {topic}; worth taking to supervision.",
    "I felt bored and distracted for part of the session and wonder if that mirrors how {first} is treated.",
    "Strong pull to reassure {first} rather than stay with the distress. Keep an eye on this.",
    "The session left me feeling heavy. I think {first} is carrying more than they have said so far.",
    "I caught myself thinking about my own family while {first} spoke about {topic}.",
]
FEEDBACK = {
    5: ["Really helpful, I feel listened to.", "My counsellor was kind and patient. Thank you."],
    4: ["Helpful sessions, though the waiting time was long.", "Good experience overall."],
    3: ["Some sessions helped more than others.", "It was OK but the room was noisy."],
    2: ["Hard to get appointments that fit around work.", "I did not feel we got to the main issue."],
    1: ["Appointments were cancelled twice at short notice.", "Not what I expected from counselling."],
}
GP_PRESENTATIONS = [
    "low mood and anxiety over several months. {first} has been started on sertraline 50mg",
    "panic attacks and poor sleep since a car accident in the spring",
    "a prolonged grief reaction following the death of a partner",
    "low self-esteem and some disordered eating; there is a past history of self-harm",
]
LOCATIONS = [
    "Room 1, Northgate House", "Room 2, Northgate House", "Room 4, Hillside Centre", "Online (video)",
    "Telephone",
]  # fmt: skip
# relationship -> "f", "m" or "" (either) for the contact's first name
CONTACT_RELATIONSHIPS = {
    "partner": "", "mother": "f", "father": "m", "sister": "f", "brother": "m", "friend": "", "son": "m",
    "daughter": "f",
}  # fmt: skip
CHILD_CONTACT_RELATIONSHIPS = {
    "mother": "f",
    "father": "m",
    "grandmother": "f",
    "foster carer": "",
    "aunt": "f",
}
CLIENT_CONTACTS = {
    "Rearranged next appointment": "{first} asked to move next week's session to a later time.",
    "Confirmed appointment time": "Confirmed Thursday's appointment with {first}.",
    "Checked in after missed session": "Contacted {first} after a missed session; {first} had been unwell.",
}


class _Gen:
    """Builds all records from one random.Random, in a fixed order."""

    def __init__(self) -> None:
        self.rng = random.Random(SEED)
        self.data: dict[str, list[Record]] = {name: [] for name in RESOURCES}
        self.data["staff"] = [dict(s) for s in STAFF]

    def _add(self, resource: str, record: Record) -> None:
        rows = self.data[resource]
        rows.append({"id": len(rows) + 1, **record})

    def _phone(self) -> str:
        return f"07700 900{self.rng.randint(0, 999):03d}"

    def _first(self, sex: str = "") -> str:
        names = {"f": FEMALE_NAMES, "m": MALE_NAMES}.get(sex) or self.rng.choice([FEMALE_NAMES, MALE_NAMES])
        return self.rng.choice(names)

    def _contact(self, relationships: dict[str, str], last: str | None) -> Record:
        relationship = self.rng.choice(sorted(relationships))
        surname = last if last and relationship != "foster carer" else self.rng.choice(LAST_NAMES)
        name = f"{self._first(relationships[relationship])} {surname}"
        return {"name": name, "relationship": relationship, "phone": self._phone()}

    def _day_between(self, start: date, end: date) -> date:
        return start + timedelta(days=self.rng.randint(0, max(0, (end - start).days)))

    def _at(self, day: date) -> str:
        hour, minute = self.rng.randint(9, 17), self.rng.choice([0, 15, 30, 45])
        return datetime.combine(day, time(hour, minute)).isoformat()

    def client(self, cid: int) -> None:
        """Add client ``cid`` and all its sub-records (clients 1 and 2 get a full set for the demo)."""
        rng = self.rng
        category = rng.choices(["adult", "child", "adult_services", "coaching"], [65, 15, 10, 10])[0]
        status = rng.choices(["active", "waiting", "closed"], [75, 15, 10])[0]
        if cid <= 2:
            category, status = "adult", "active"
        first, last = self._first(), rng.choice(LAST_NAMES)
        low, high = {
            "adult": (18 * 365 + 10, 80 * 365),
            "child": (8 * 365, 18 * 365 - 10),
            "adult_services": (18 * 365 + 10, 70 * 365),
            "coaching": (22 * 365, 65 * 365),
        }[category]
        dob = TODAY - timedelta(days=rng.randint(low, high))
        opened = TODAY - timedelta(days=rng.randint(20, 900))
        yesterday = TODAY - timedelta(days=1)
        closed = self._day_between(min(opened + timedelta(days=30), yesterday), yesterday)
        town, area = rng.choice(TOWNS)
        postcode = f"{area}{rng.randint(1, 29)} {rng.randint(1, 9)}{''.join(rng.sample(POSTCODE_LETTERS, 2))}"
        if category == "child":
            referral = rng.choice(["school", "school", "GP referral", "social services", "friend or family"])
            contacts = [self._contact(CHILD_CONTACT_RELATIONSHIPS, last) for _ in range(rng.randint(1, 2))]
        else:
            sources = [
                "GP referral",
                "GP referral",
                "self-referral",
                "website",
                "friend or family",
                "employer",
            ]
            sources += {"coaching": ["employer"] * 3, "adult_services": ["social services"] * 3}.get(
                category, []
            )
            referral = rng.choice(sources)
            contacts = [self._contact(CONTACT_RELATIONSHIPS, None) for _ in range(rng.randint(0, 2))]
        record: Record = {
            "case_number": f"FG-{opened.year}-{cid:04d}",
            "name": {"first": first, "last": last},
            "date_of_birth": dob.isoformat(),
            "address": {"line1": f"{rng.randint(1, 180)} {rng.choice(STREETS)}", "town": town,
                        "postcode": postcode},
            "email": f"{first}.{last}{rng.randint(1, 99)}@example.{rng.choice(TLDS)}".lower(),
            "phone": self._phone(),
            "gp": {"name": f"Dr {self._first()} {rng.choice(LAST_NAMES)}", "surgery": rng.choice(SURGERIES)},
            "referral_source": referral,
            "counsellor": COUNSELLORS[(cid - 1) % len(COUNSELLORS)],
            "category": category,
            "status": status,
            "opened": opened.isoformat(),
            "closed": closed.isoformat() if status == "closed" else None,
            "emergency_contacts": contacts,
        }  # fmt: skip
        self._add("clients", record)
        self._records({"id": cid, **record}, demo=cid <= 2)

    def _records(self, client: Record, *, demo: bool) -> None:
        rng = self.rng
        cid, who, first = client["id"], client["counsellor"], client["name"]["first"]
        category = client["category"]
        opened = date.fromisoformat(client["opened"])
        end = date.fromisoformat(client["closed"]) if client["closed"] else TODAY
        topics = TOPICS[category]

        def count(low: int, high: int, demo_min: int) -> int:
            n = rng.randint(low, high)
            return max(n, demo_min) if demo else n

        for _ in range(count(1, 6, 2)):
            day = self._day_between(opened, end if client["closed"] else TODAY + timedelta(days=30))
            status = "booked" if day > TODAY else rng.choices(STATUSES, [80, 12, 8])[0]
            minutes = 60 if category == "coaching" else rng.choice([50, 50, 50, 30])
            self._add("appointments", {
                "client_id": cid, "counsellor": who, "starts_at": self._at(day), "duration_minutes": minutes,
                "location": rng.choice(LOCATIONS), "status": status,
            })  # fmt: skip
        for _ in range(count(0, 5, 2)):
            summary, topic = rng.choice(topics)
            level = rng.choices(["low", "medium", "high"], [75, 20, 5])[0]
            n_factors = rng.randint(*{"low": (0, 1), "medium": (1, 2), "high": (2, 3)}[level])
            pool = RISK_FACTORS[-2:] if level == "low" else RISK_FACTORS
            parts = [rng.choice(OPENINGS), rng.choice(MIDDLES), rng.choice(CLOSINGS)]
            if level == "high":
                parts.append("Risk assessment completed; safety plan reviewed and shared with supervisor.")
            self._add("session-notes", {
                "client_id": cid, "author": who, "session_date": self._day_between(opened, end).isoformat(),
                "summary": summary, "body": " ".join(parts).format(first=first, topic=topic),
                "risk": {"level": level, "factors": rng.sample(pool, n_factors)},
            })  # fmt: skip
        for _ in range(count(0, 2, 1)):
            written = self._day_between(opened, end)
            self._add("process-notes", {
                "client_id": cid, "author": who, "written_at": self._at(written),
                "body": rng.choice(PROCESS_NOTES).format(first=first, topic=rng.choice(topics)[1]),
                "supervision_due": (written + timedelta(days=rng.randint(7, 28))).isoformat(),
            })  # fmt: skip
        for _ in range(count(0, 2, 1)):
            rating = rng.choices([1, 2, 3, 4, 5], [4, 6, 15, 35, 40])[0]
            self._add("feedback", {
                "client_id": cid, "submitted_at": self._at(self._day_between(opened, end)), "rating": rating,
                "comments": rng.choice(FEEDBACK[rating]),
            })  # fmt: skip
        kinds = [True, False] if demo else [rng.random() < 1 / 3 for _ in range(rng.randint(0, 2))]
        for third_party in kinds:
            self._add(
                "letters", self._letter(client, self._day_between(opened, end), third_party=third_party)
            )
        for i in range(count(0, 3, 1)):
            day = self._day_between(opened, end)
            self._add("communications", self._communication(client, day, from_client=demo and i == 0))

    def _letter(self, client: Record, day: date, *, third_party: bool) -> Record:
        rng = self.rng
        first, last, dob = client["name"]["first"], client["name"]["last"], client["date_of_birth"]
        counsellor, gp = STAFF_NAMES[client["counsellor"]], client["gp"]
        if third_party and client["category"] == "child" and rng.random() < 0.6:
            sender, subject = "Pastoral lead, Moorside Academy", f"School update about {first} {last}"
            body = (
                f"Dear {counsellor},\n\nWe wanted to let you know that {first} has had a difficult few weeks "
                f"at school, with several absences and a falling-out in class. Staff have noticed {first} "
                "spending breaks alone.\n\nYours sincerely,\nPastoral lead"
            )
        elif third_party:
            sender, subject = f"{gp['name']}, {gp['surgery']}", f"Referral: {first} {last}"
            presentation = rng.choice(GP_PRESENTATIONS).format(first=first)
            body = (
                f"Dear colleague,\n\nThank you for seeing {first} {last} (DOB {dob}), who has presented with "
                f"{presentation}.\n\nYours sincerely,\n{gp['name']}"
            )
        elif rng.random() < 0.5:
            sender, subject = f"{gp['name']}, {gp['surgery']}", f"Counselling update: {first} {last}"
            body = (
                f"Dear {gp['name']},\n\n{first} {last} (DOB {dob}) has been attending counselling with "
                f"{SERVICE}. With {first}'s consent I am letting you know that sessions are continuing and "
                f"{first} is engaging well.\n\nYours sincerely,\n{counsellor}"
            )
        else:
            sender, subject = f"{first} {last}", "Your counselling appointments"
            body = (
                f"Dear {first},\n\nThis letter confirms your next appointments with {SERVICE}. If you need "
                f"to rearrange, please call us on 01632 960123.\n\nBest wishes,\n{counsellor}"
            )
        if third_party:  # received: the sender is the third party, the recipient is us
            sender, body = f"{counsellor}, {SERVICE}", f"[Received from {sender}]\n\n{body}"
        return {
            "client_id": client["id"], "sent_on": day.isoformat(), "recipient": sender, "subject": subject,
            "body": body, "third_party": third_party,
        }  # fmt: skip

    def _communication(self, client: Record, day: date, *, from_client: bool) -> Record:
        rng = self.rng
        first, contacts = client["name"]["first"], client["emergency_contacts"]
        kind = "client" if from_client else rng.choice(["client", "client", "gp", "contact", "school"])
        if kind == "contact" and not contacts:
            kind = "client"
        if kind == "school" and client["category"] != "child":
            kind = "gp"
        channel = rng.choice(["phone", "email", "sms", "in_person"])
        direction, third_party = "inbound", True
        if kind == "client":
            direction, third_party = rng.choice(["inbound", "outbound"]), False
            party = f"{first} {client['name']['last']}"
            summary = rng.choice(sorted(CLIENT_CONTACTS))
            body = CLIENT_CONTACTS[summary].format(first=first)
        elif kind == "gp":
            party, summary = f"{client['gp']['name']} (GP)", "GP shared medication change"
            body = (
                f"GP reports {first}'s antidepressant dose was increased last week; asked us to monitor mood."
            )
        elif kind == "contact":
            contact = rng.choice(contacts)
            party = f"{contact['name']} ({contact['relationship']})"
            summary = f"{contact['relationship'].capitalize()} raised a concern"
            body = f"{contact['name']} said {first} has not been eating or sleeping well and seems withdrawn."
        else:
            party, summary = "Moorside Academy (pastoral lead)", "School reported an incident"
            body = f"School reports {first} was upset after an argument in class and left the lesson early."
        return {
            "client_id": client["id"], "at": self._at(day), "channel": channel, "direction": direction,
            "party": party, "summary": summary, "body": body, "third_party": third_party,
        }  # fmt: skip


def generate() -> dict[str, list[Record]]:
    """All seed records by resource name (``staff``, ``clients``, ``session-notes``, ...), ids included."""
    gen = _Gen()
    for cid in range(1, N_CLIENTS + 1):
        gen.client(cid)
    return gen.data


def seed(conn: sqlite3.Connection, only: tuple[str, ...] | None = None) -> None:
    """Create the schema and insert the seed data (or only the named resources) in one transaction."""
    init_schema(conn)
    data = generate()
    if only is not None:
        data = {name: (rows if name in only else []) for name, rows in data.items()}
    if not conn.in_transaction:
        conn.execute("BEGIN")
    try:
        for name, res in RESOURCES.items():
            cols = res.columns
            names = ", ".join('"' + c + '"' for c in cols)
            sql = f'INSERT INTO "{res.table}" ({names}) VALUES ({", ".join("?" * len(cols))})'
            conn.executemany(sql, [[to_db(row.get(c)) for c in cols] for row in data[name]])
    except BaseException:
        conn.rollback()
        raise
    conn.commit()
