"""Deterministic fake ServiceTitan data: people and companies with US addresses, tags, custom fields.

Pure functions of their arguments (a ``random.Random`` or a seed): the same call gives the same records on
every machine. Records are in ServiceTitan's API shape (``CustomerResponse`` / ``LocationResponse``) with
``externalData: []``; timestamps are integer microseconds since the epoch, formatted by :func:`iso_from_us`.

Seeded history lies between 2018-01-01 and 2025-06-01, so any edit made through the sandbox afterwards is
newer than every seeded record.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

T = TypeVar("T")

FIRST_CUSTOMER_ID = 10_000_001
"""Customer ids count up from here; location ids from FIRST_LOCATION_ID. Distinct ranges make a client that
mixes up a customer id and a location id fail loudly instead of patching the wrong record."""
FIRST_LOCATION_ID = 20_000_001
FIRST_CONTACT_ID = 30_000_001
"""Contact ids (customers' and locations' alike, one sequence) count up from here."""

TAG_TYPES: dict[int, str] = {
    101: "VIP",
    102: "Maintenance Member",
    103: "Commercial Account",
    104: "Warranty",
    105: "Do Not Call",
    106: "New Construction",
    107: "Priority",
    108: "Pet On Site",
    109: "Senior Discount",
    110: "Referral Partner",
}
TAX_ZONES: dict[int, str] = {1: "Default", 11: "City", 12: "County", 13: "Unincorporated", 14: "Exempt District"}
SERVICE_ZONES: tuple[int, ...] = (501, 502, 503, 504, 505)
USERS: tuple[int, ...] = (9001, 9002, 9003, 9004, 9005, 9006)
CUSTOMER_CUSTOM_FIELDS: dict[int, str] = {201: "Referral Source", 202: "Preferred Contact Method", 203: "Gate Code"}
LOCATION_CUSTOM_FIELDS: dict[int, str] = {
    301: "Gate Code",
    302: "Pets",
    303: "Access Notes",
    304: "Filter Size",
}
_TAG_IDS = tuple(sorted(TAG_TYPES))
_TAX_ZONE_IDS = tuple(sorted(TAX_ZONES))
OTHER_APP_GUID = "0c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f"
"""Some seeded records carry external data written by another application under this guid: a client using
its own guid must never see it."""

_CUSTOM_VALUES: dict[int, tuple[str, ...]] = {
    201: ("Google", "Yelp", "Referral", "Facebook", "Repeat Customer", "Yard Sign", "Nextdoor"),
    202: ("Phone", "Email", "Text"),
    302: ("Dog", "Cat", "None", "Dog - friendly", "Dog - keep gate closed"),
    303: ("Side gate", "Call before arrival", "Lockbox on front door", "Use back door", "Check in at front desk"),
    304: ("16x25x1", "20x25x1", "16x20x1", "20x20x1", "14x24x1"),
}

# (city, state, first zip, latitude, longitude)
CITIES: tuple[tuple[str, str, int, float, float], ...] = (
    ("Austin", "TX", 78701, 30.2672, -97.7431),
    ("Dallas", "TX", 75201, 32.7767, -96.7970),
    ("Houston", "TX", 77002, 29.7604, -95.3698),
    ("San Antonio", "TX", 78205, 29.4241, -98.4936),
    ("Phoenix", "AZ", 85004, 33.4484, -112.0740),
    ("Tucson", "AZ", 85701, 32.2226, -110.9747),
    ("Denver", "CO", 80202, 39.7392, -104.9903),
    ("Atlanta", "GA", 30303, 33.7490, -84.3880),
    ("Orlando", "FL", 32801, 28.5383, -81.3792),
    ("Tampa", "FL", 33602, 27.9506, -82.4572),
    ("Miami", "FL", 33130, 25.7617, -80.1918),
    ("Charlotte", "NC", 28202, 35.2271, -80.8431),
    ("Raleigh", "NC", 27601, 35.7796, -78.6382),
    ("Nashville", "TN", 37203, 36.1627, -86.7816),
    ("Columbus", "OH", 43215, 39.9612, -82.9988),
    ("Indianapolis", "IN", 46204, 39.7684, -86.1581),
    ("Chicago", "IL", 60601, 41.8781, -87.6298),
    ("Minneapolis", "MN", 55401, 44.9778, -93.2650),
    ("Kansas City", "MO", 64106, 39.0997, -94.5786),
    ("Las Vegas", "NV", 89101, 36.1699, -115.1398),
    ("Sacramento", "CA", 95814, 38.5816, -121.4944),
    ("San Diego", "CA", 92101, 32.7157, -117.1611),
    ("Fresno", "CA", 93721, 36.7378, -119.7871),
    ("Portland", "OR", 97204, 45.5152, -122.6784),
    ("Seattle", "WA", 98101, 47.6062, -122.3321),
    ("Salt Lake City", "UT", 84101, 40.7608, -111.8910),
    ("Boise", "ID", 83702, 43.6150, -116.2023),
    ("Albuquerque", "NM", 87102, 35.0844, -106.6504),
    ("Oklahoma City", "OK", 73102, 35.4676, -97.5164),
    ("Richmond", "VA", 23219, 37.5407, -77.4360),
)
FIRST_NAMES: tuple[str, ...] = (
    "James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda", "David", "Elizabeth",
    "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah", "Carlos", "Karen",
    "Daniel", "Lisa", "Matthew", "Nancy", "Anthony", "Sandra", "Mark", "Ashley", "Luis", "Emily",
    "Steven", "Michelle", "Andrew", "Amanda", "Kevin", "Melissa", "Brian", "Stephanie", "Jose", "Rebecca",
    "Mei", "Priya", "Ahmed", "Olga", "Kenji", "Fatima", "Diego", "Ngozi", "Siobhan", "Zoë",
)  # fmt: skip
LAST_NAMES: tuple[str, ...] = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
    "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin",
    "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson",
    "Walker", "Young", "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores",
    "O'Brien", "Kowalski", "Patel", "Kim", "Chen", "Okafor", "Müller", "St. James", "Van der Berg", "Johansson",
)  # fmt: skip
COMPANY_WORDS: tuple[str, ...] = (
    "Oakridge", "Summit", "Riverside", "Pioneer", "Evergreen", "Lakeside", "Keystone", "Heritage", "Sunbelt",
    "Bluebonnet", "Granite", "Harbor", "Cypress", "Prairie", "Mesa", "Liberty", "Redwood", "Magnolia",
)  # fmt: skip
COMPANY_KINDS: tuple[str, ...] = (
    "Property Management", "Dental Group", "Apartments", "Family Church", "Elementary School", "Auto Repair",
    "Restaurant Group", "Medical Plaza", "Storage", "Hotel", "Office Park", "Veterinary Clinic", "HOA",
)  # fmt: skip
COMPANY_SUFFIXES: tuple[str, ...] = ("", "", " LLC", " Inc.", " Co.", ", LLC")
STREET_NAMES: tuple[str, ...] = (
    "Oak", "Maple", "Cedar", "Pine", "Elm", "Main", "Park", "Lake", "Hill", "Washington", "Lincoln", "Sunset",
    "Ridge", "Meadow", "Willow", "Highland", "River", "Spring", "Forest", "Church", "Mill", "Cherry", "Walnut",
    "Chestnut", "Magnolia", "Pecan", "Juniper", "Aspen", "Sycamore", "Birch", "Martin Luther King Jr",
)  # fmt: skip
STREET_SUFFIXES: tuple[str, ...] = ("St", "Ave", "Rd", "Dr", "Ln", "Blvd", "Ct", "Way", "Pl", "Cir", "Trl", "Pkwy")
DIRECTIONS: tuple[str, ...] = ("N ", "S ", "E ", "W ")
RESIDENTIAL_SITE_NAMES: tuple[str, ...] = ("Home", "Rental Property", "Lake House", "Mother-in-law's House")
COMMERCIAL_SITE_NAMES: tuple[str, ...] = ("Main Office", "Warehouse", "Store #", "Building ", "Clinic", "Annex")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
HISTORY_START_US = int((datetime(2018, 1, 1, tzinfo=UTC) - _EPOCH).total_seconds()) * 1_000_000
HISTORY_CREATED_END_US = int((datetime(2025, 1, 1, tzinfo=UTC) - _EPOCH).total_seconds()) * 1_000_000
HISTORY_END_US = int((datetime(2025, 6, 1, tzinfo=UTC) - _EPOCH).total_seconds()) * 1_000_000


_DAY_PREFIX: dict[int, str] = {}


def iso_from_us(us: int) -> str:
    """Microseconds since the epoch as ServiceTitan-style ISO 8601 UTC: ``2024-05-01T12:34:56.123456Z``."""
    seconds, micro = divmod(us, 1_000_000)
    day, second_of_day = divmod(seconds, 86_400)
    prefix = _DAY_PREFIX.get(day)
    if prefix is None:
        prefix = time.strftime("%Y-%m-%dT", time.gmtime(day * 86_400))
        if len(_DAY_PREFIX) < 100_000:
            _DAY_PREFIX[day] = prefix
    hour, rest = divmod(second_of_day, 3600)
    minute, second = divmod(rest, 60)
    return f"{prefix}{hour:02d}:{minute:02d}:{second:02d}.{micro:06d}Z"


def _pick(rng: random.Random, seq: Sequence[T]) -> T:
    # rng.choice is several times slower (rejection sampling); the tiny bias does not matter for fake data
    return seq[int(rng.random() * len(seq))]


def _sample(rng: random.Random, seq: Sequence[T], k: int) -> list[T]:
    """``k`` distinct items of ``seq`` (k much smaller than len(seq))."""
    out: list[T] = []
    while len(out) < k:
        item = _pick(rng, seq)
        if item not in out:
            out.append(item)
    return out


def _int(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform in [lo, hi], like randint."""
    return lo + int(rng.random() * (hi - lo + 1))


@dataclass
class SeedData:
    customers: list[dict[str, Any]] = field(default_factory=list)
    customer_modified_us: list[int] = field(default_factory=list)
    locations: list[dict[str, Any]] = field(default_factory=list)
    location_modified_us: list[int] = field(default_factory=list)
    customer_external: dict[int, dict[str, dict[str, str]]] = field(default_factory=dict)
    """record id -> application guid -> key -> value"""
    location_external: dict[int, dict[str, dict[str, str]]] = field(default_factory=dict)
    customer_created_us: list[int] = field(default_factory=list)
    location_created_us: list[int] = field(default_factory=list)
    contacts: list[SeedContact] = field(default_factory=list)
    """Contacts of the records (:func:`add_contacts`), in id order; empty when seeded without contacts."""


@dataclass(frozen=True, slots=True)
class SeedContact:
    """One seeded contact: its owner (``customer`` / ``location`` and id), its export-shaped record
    (``ExportCustomerContactResponse`` / ``ExportLocationContactResponse``) and its modifiedOn in µs."""

    entity: str
    owner_id: int
    record: dict[str, Any]
    modified_us: int


def fake_street(rng: random.Random) -> str:
    direction = _pick(rng, DIRECTIONS) if rng.random() < 0.12 else ""
    return f"{_int(rng, 100, 19999)} {direction}{_pick(rng, STREET_NAMES)} {_pick(rng, STREET_SUFFIXES)}"


def fake_address(rng: random.Random, *, coordinates_probability: float = 0.97) -> dict[str, Any]:
    """A plausible US address: real city, state and zip area, coordinates near the city centre (6 decimals)."""
    city, state, zip0, lat, lon = _pick(rng, CITIES)
    zip_code = f"{zip0 + _int(rng, 0, 40):05d}"
    if rng.random() < 0.05:
        zip_code += f"-{_int(rng, 1000, 9999)}"
    r = rng.random()
    unit: str | None = None
    if r < 0.12:
        unit = f"Apt {_int(rng, 1, 40)}{_pick(rng, 'ABCD')}"
    elif r < 0.18:
        unit = f"Suite {_int(rng, 100, 900)}"
    elif r < 0.22:
        unit = ""
    has_coords = rng.random() < coordinates_probability
    return {
        "street": fake_street(rng),
        "unit": unit,
        "city": city,
        "state": state,
        "zip": zip_code,
        "country": "USA",
        "latitude": round(lat + (rng.random() - 0.5) * 0.3, 6) if has_coords else None,
        "longitude": round(lon + (rng.random() - 0.5) * 0.3, 6) if has_coords else None,
    }


def fake_customer_name(rng: random.Random, commercial: bool) -> str:
    if commercial:
        first = _pick(rng, COMPANY_WORDS) if rng.random() < 0.6 else _pick(rng, LAST_NAMES)
        return f"{first} {_pick(rng, COMPANY_KINDS)}{_pick(rng, COMPANY_SUFFIXES)}"
    if rng.random() < 0.08:
        return f"{_pick(rng, FIRST_NAMES)} & {_pick(rng, FIRST_NAMES)} {_pick(rng, LAST_NAMES)}"
    return f"{_pick(rng, FIRST_NAMES)} {_pick(rng, LAST_NAMES)}"


def _custom_value(rng: random.Random, type_id: int) -> str:
    choices = _CUSTOM_VALUES.get(type_id)
    if choices is not None:
        return _pick(rng, choices)
    return f"#{_int(rng, 1000, 9999)}"  # gate codes


def fake_custom_fields(rng: random.Random, types: dict[int, str], probability: float) -> list[dict[str, Any]]:
    if rng.random() >= probability:
        return []
    chosen = sorted(_sample(rng, tuple(types), _int(rng, 1, min(2, len(types)))))
    return [{"typeId": t, "name": types[t], "value": _custom_value(rng, t)} for t in chosen]


def fake_tags(rng: random.Random, probability: float = 0.3) -> list[int]:
    if rng.random() >= probability:
        return []
    return sorted(_sample(rng, _TAG_IDS, _int(rng, 1, 2)))


def _modified(rng: random.Random, created: int) -> int:
    if rng.random() < 0.4:
        return created  # never edited since creation
    return created + int(rng.random() * (HISTORY_END_US - created))


def customer_record(
    rng: random.Random, cid: int, created_us: int, modified_us: int, *, commercial: bool | None = None
) -> dict[str, Any]:
    """One customer in CustomerResponse shape (``externalData: []``)."""
    if commercial is None:
        commercial = rng.random() < 0.18
    active = rng.random() >= 0.04
    created_on = iso_from_us(created_us)
    balance = 0.0 if rng.random() < 0.75 else round(rng.uniform(-200.0, 2500.0), 2)
    return {
        "id": cid,
        "active": active,
        "name": fake_customer_name(rng, commercial),
        "type": "Commercial" if commercial else "Residential",
        "address": fake_address(rng),
        "customFields": fake_custom_fields(rng, CUSTOMER_CUSTOM_FIELDS, 0.4),
        "balance": balance,
        "taxExempt": rng.random() < 0.03,
        "tagTypeIds": fake_tags(rng),
        "doNotMail": rng.random() < 0.06,
        "doNotService": rng.random() < 0.01,
        "nationalAccount": commercial and rng.random() < 0.05,
        "createdOn": created_on,
        "createdById": _pick(rng, USERS),
        "modifiedOn": created_on if modified_us == created_us else iso_from_us(modified_us),
        "mergedToId": None,
        "paymentTermId": None,
        "creditLimit": None,
        "creditLimitBalance": None,
        "externalData": [],
    }


def location_record(
    rng: random.Random,
    lid: int,
    customer: dict[str, Any],
    created_us: int,
    modified_us: int,
    *,
    first: bool = False,
) -> dict[str, Any]:
    """One location of ``customer`` in LocationResponse shape (``externalData: []``)."""
    commercial = customer["type"] == "Commercial"
    if first and rng.random() < 0.85:
        address = dict(customer["address"])  # most customers are billed where they are served
        name = customer["name"]
    else:
        address = fake_address(rng)
        if commercial:
            site = _pick(rng, COMMERCIAL_SITE_NAMES)
            name = f"{customer['name']} - {site}{_int(rng, 1, 60) if site.endswith(('#', ' ')) else ''}"
        else:
            name = _pick(rng, RESIDENTIAL_SITE_NAMES) if rng.random() < 0.5 else customer["name"]
    active = customer["active"] and rng.random() >= 0.02
    created_on = iso_from_us(created_us)
    return {
        "taxZoneId": _pick(rng, _TAX_ZONE_IDS) if rng.random() < 0.7 else None,
        "id": lid,
        "customerId": customer["id"],
        "active": active,
        "name": name,
        "address": address,
        "customFields": fake_custom_fields(rng, LOCATION_CUSTOM_FIELDS, 0.45),
        "createdOn": created_on,
        "createdById": _pick(rng, USERS),
        "modifiedOn": created_on if modified_us == created_us else iso_from_us(modified_us),
        "mergedToId": None,
        "zoneId": _pick(rng, SERVICE_ZONES) if rng.random() < 0.8 else None,
        "taxExempt": rng.random() < 0.03,
        "tagTypeIds": fake_tags(rng, 0.25),
        "externalData": [],
    }


def generate(
    customers: int,
    locations: int,
    seed: int = 0,
    *,
    first_customer_id: int = FIRST_CUSTOMER_ID,
    first_location_id: int = FIRST_LOCATION_ID,
    contacts: bool = True,
    first_contact_id: int = FIRST_CONTACT_ID,
) -> SeedData:
    """``customers`` customers and ``locations`` locations, the same for the same arguments.

    Ids grow with ``createdOn``. Every customer gets one location while there are enough; the rest go to
    random customers (commercial ones get more). About 4% of customers are inactive (half of them merged into
    another customer) and their locations with them; about 8% of records carry another application's
    external data. With ``contacts``, each record also gets 0 to 2 contacts (:func:`add_contacts`), drawn from
    a generator of their own: the records are the same with contacts or without.
    """
    if customers < 0 or locations < 0:
        raise ValueError("customers and locations must be >= 0")
    if locations and not customers:
        raise ValueError("locations need at least one customer")
    # hundreds of thousands of small dicts: cyclic GC passes over them would more than double the time
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        out = _generate(customers, locations, seed, first_customer_id, first_location_id)
        if contacts:
            add_contacts(out, seed, first_contact_id)
        return out
    finally:
        if gc_was_enabled:
            gc.enable()


def _generate(customers: int, locations: int, seed: int, first_customer_id: int, first_location_id: int) -> SeedData:
    rng = random.Random(seed)
    out = SeedData()
    span = HISTORY_CREATED_END_US - HISTORY_START_US
    created = sorted(HISTORY_START_US + int(rng.random() * span) for _ in range(customers))
    for i, c_us in enumerate(created):
        cid = first_customer_id + i
        m_us = _modified(rng, c_us)
        out.customers.append(customer_record(rng, cid, c_us, m_us))
        out.customer_modified_us.append(m_us)
        out.customer_created_us.append(c_us)
        if rng.random() < 0.08:
            out.customer_external[cid] = {OTHER_APP_GUID: {"crmId": f"C-{_int(rng, 10_000, 99_999)}"}}
    # merge a share of the inactive customers into an earlier active one
    for cust in out.customers:
        if not cust["active"] and rng.random() < 0.5 and cust["id"] > first_customer_id:
            target = out.customers[rng.randrange(0, cust["id"] - first_customer_id)]
            if target["active"]:
                cust["mergedToId"] = target["id"]

    # (created, owner index, first?) for every location, then ids in order of creation
    plan: list[tuple[int, int, bool]] = []
    for i in range(min(customers, locations)):
        c_us = created[i]
        plan.append((c_us + int(rng.random() * 30 * 86_400_000_000), i, True))
    commercial_idx = [i for i, c in enumerate(out.customers) if c["type"] == "Commercial"]
    for _ in range(locations - len(plan)):
        i = _pick(rng, commercial_idx) if commercial_idx and rng.random() < 0.6 else rng.randrange(customers)
        c_us = created[i]
        plan.append((c_us + int(rng.random() * (HISTORY_CREATED_END_US - c_us)), i, False))
    plan.sort()
    for n, (l_us, i, first) in enumerate(plan):
        lid = first_location_id + n
        m_us = _modified(rng, l_us)
        out.locations.append(location_record(rng, lid, out.customers[i], l_us, m_us, first=first))
        out.location_modified_us.append(m_us)
        out.location_created_us.append(l_us)
        if rng.random() < 0.08:
            out.location_external[lid] = {OTHER_APP_GUID: {"crmId": f"L-{_int(rng, 10_000, 99_999)}"}}
    return out


# ------------------------------------------------------------------------------------------------- contacts

# Area codes of the seeded cities (by state: near enough for fake data).
_AREA_CODES: dict[str, tuple[str, ...]] = {
    "TX": ("512", "214", "713", "210", "737", "469"), "AZ": ("602", "520", "480"), "CO": ("303", "720"),
    "GA": ("404", "678"), "FL": ("407", "813", "305", "786"), "NC": ("704", "919", "980"), "TN": ("615",),
    "OH": ("614",), "IN": ("317",), "IL": ("312", "773"), "MN": ("612",), "MO": ("816",), "NV": ("702",),
    "CA": ("916", "619", "559"), "OR": ("503", "971"), "WA": ("206",), "UT": ("801", "385"), "ID": ("208",),
    "NM": ("505",), "OK": ("405",), "VA": ("804",),
}
_ALL_AREA_CODES: tuple[str, ...] = tuple(code for codes in _AREA_CODES.values() for code in codes)
_EMAIL_DOMAINS: tuple[str, ...] = ("example.com", "example.net", "example.org", "mail.example.com")
_PHONE_MEMOS: tuple[str, ...] = ("Cell", "Home", "Work", "Office", "Spouse", "After hours", "Owner's daughter - Kelly")
_EMAIL_MEMOS: tuple[str, ...] = ("Invoices", "Work", "Personal", "Billing")
_PHONE_TYPES: tuple[str, ...] = ("MobilePhone",) * 11 + ("Phone",) * 8 + ("Fax",)
CONTACT_COUNT_WEIGHTS: dict[str, tuple[float, float]] = {"customer": (0.2, 0.7), "location": (0.5, 0.85)}
"""Per entity, the cumulative probabilities of 0 and of at most 1 contact (else 2): customers 20% none, 50% one,
30% two; locations 50% none, 35% one, 15% two."""


def _contact_rng(seed: int) -> random.Random:
    # a generator of its own (a str seed is hashed with SHA-512: the same on every machine and run), so the
    # records' generator draws exactly what it drew before contacts existed
    return random.Random(f"stsync-sandbox-contacts:{seed}")


def fake_phone(rng: random.Random, state: str | None) -> str:
    """Ten digits as ServiceTitan stores them: an area code of ``state`` and a 555-01xx line (fictional)."""
    codes = _AREA_CODES.get(state or "", _ALL_AREA_CODES)
    return f"{_pick(rng, codes)}5550{_int(rng, 100, 199)}"


def fake_email(rng: random.Random, name: str, commercial: bool) -> str:
    words = ["".join(ch for ch in w.lower() if ch.isascii() and ch.isalnum()) for w in name.split()]
    words = [w for w in words if w and w not in ("llc", "inc", "co")] or ["customer"]
    if commercial:
        local = _pick(rng, ("office", "billing", "info", "manager"))
        return f"{local}@{''.join(words[:2])}.{_pick(rng, _EMAIL_DOMAINS)}"
    local = ".".join(words[:1] + words[-1:]) if len(words) > 1 else words[0]
    if rng.random() < 0.4:
        local += str(_int(rng, 1, 99))
    return f"{local}@{_pick(rng, _EMAIL_DOMAINS)}"


def contact_record(
    cid: int, contact_type: str, value: str, memo: str | None, created_us: int, modified_us: int,
    owner_key: str, owner_id: int, *, do_not_text: bool = False, preferences: dict[str, bool] | None = None,
    active: bool = True,
) -> dict[str, Any]:
    """A contact in export shape (``ExportCustomerContactResponse`` with ``owner_key`` ``customerId``,
    ``ExportLocationContactResponse`` with ``locationId``)."""
    return {
        "id": cid,
        "type": contact_type,
        "value": value,
        "memo": memo,
        "phoneSettings": {"phoneNumber": value, "doNotText": do_not_text},
        "modifiedOn": iso_from_us(modified_us),
        "createdOn": iso_from_us(created_us),
        "preferences": preferences,
        owner_key: owner_id,
        "active": active,
    }


def add_contacts(data: SeedData, seed: int, first_contact_id: int = FIRST_CONTACT_ID) -> None:
    """Give every record of ``data`` 0 to 2 contacts (:data:`CONTACT_COUNT_WEIGHTS`), from a generator of their
    own seeded by ``seed``: customers first, then locations, each in id order, draw how many; the first is a
    phone (mostly mobile, some landlines, a few faxes), a second is an email 75% of the time. Values are stored
    as ServiceTitan stores them (phones: 10 digits); memos on about a third; about 5% of phones opted out of
    texts; 15% carry preferences. 70% of contacts were entered with their record (same ``createdOn``), the rest
    later; 30% were modified since, up to the end of the seeded history; ids grow with ``createdOn``. All are
    active."""
    rng = _contact_rng(seed)
    rand = rng.random
    drafts: list[tuple[int, int, str, int, dict[str, Any]]] = []  # (created, n, entity, modified, record)
    owners = (
        ("customer", "customerId", data.customers, data.customer_created_us),
        ("location", "locationId", data.locations, data.location_created_us),
    )
    for entity, owner_key, records, created_list in owners:
        none, one = CONTACT_COUNT_WEIGHTS[entity]
        for record, created_us in zip(records, created_list, strict=True):
            r = rand()
            if r < none:
                continue
            state = (record.get("address") or {}).get("state")
            commercial = record.get("type") == "Commercial" or " - " in record["name"]
            for k in range(1 if r < one else 2):
                if k == 1 and rand() < 0.75:
                    contact_type = "Email"
                    value = fake_email(rng, record["name"].split(" - ")[0], commercial)
                    memo = _pick(rng, _EMAIL_MEMOS) if rand() < 0.3 else None
                else:
                    contact_type = _pick(rng, _PHONE_TYPES)
                    value = fake_phone(rng, state)
                    memo = _pick(rng, _PHONE_MEMOS) if rand() < 0.35 else None
                if rand() < 0.7:  # entered with the record
                    c_us, created_on = created_us, record["createdOn"]
                else:
                    c_us = created_us + int(rand() * (HISTORY_END_US - created_us))
                    created_on = iso_from_us(c_us)
                if rand() < 0.7:
                    m_us, modified_on = c_us, created_on
                else:
                    m_us = c_us + int(rand() * (HISTORY_END_US - c_us))
                    modified_on = iso_from_us(m_us)
                do_not_text = contact_type != "Email" and rand() < 0.05
                preferences = None
                if rand() < 0.15:
                    preferences = {"jobRemindersEnabled": rand() < 0.9, "marketingUpdatesEnabled": rand() < 0.4,
                                   "invoiceStatementNotification": rand() < 0.6}
                contact = {
                    "id": 0,  # numbered below, in order of creation
                    "type": contact_type,
                    "value": value,
                    "memo": memo,
                    "phoneSettings": {"phoneNumber": value, "doNotText": do_not_text},
                    "modifiedOn": modified_on,
                    "createdOn": created_on,
                    "preferences": preferences,
                    owner_key: record["id"],
                    "active": True,
                }
                drafts.append((c_us, len(drafts), entity, m_us, contact))
    drafts.sort(key=lambda d: (d[0], d[1]))
    out = data.contacts
    for n, (_, _, entity, m_us, contact) in enumerate(drafts):
        contact["id"] = first_contact_id + n
        out.append(SeedContact(entity, contact["customerId" if entity == "customer" else "locationId"], contact, m_us))
