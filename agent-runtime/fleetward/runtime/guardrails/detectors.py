"""Built-in PII detectors: email, credit_card, ip (v4 and v6), phone, us_ssn, iban, api_key, jwt.

`PIIScanner.scan(text)` finds every built-in type in a few combined passes and resolves
overlaps; `detector_for(type)` gives a per-type function returning LangChain `PIIMatch`
dicts, so the same detection plugs into `langchain.agents.middleware.PIIMiddleware`.

Why our own passes and not LangChain's `detect_email`/`detect_credit_card`/`detect_ip`:
they cover only part of what a Guardrail promises (cards only as 4x4 digit groups, IPv4
only, version strings like 1.2.3.4 reported as addresses) and each is a separate full
regex pass (~65 us per kilobyte for those three alone, see docs/bench/guardrail.md). Our
detection covers everything theirs finds except where we decided otherwise on purpose (below;
tests/unit/test_guardrail_detectors.py checks that on the corpus), finds six more types, and
costs less than their three: the passes below start with a literal or a single character
class so the regex engine skips most positions at C speed, and checksums (Luhn, mod-97, SSN
ranges, JWT header) run only on the few candidates.

Decisions (documented in docs/bench/guardrail.md and the tests):
- credit_card: 13-19 digits, Luhn-valid, first digit 2-6 (the issuer ranges of Visa,
  Mastercard, Amex, Discover, Diners, JCB, UnionPay, Maestro); groups separated by one
  space, dash or dot used consistently (4-4-4-4[-1..3], 4-6-5, 4-6-4) or none.
- ip: IPv4 dotted quads with octets <= 255 and no leading zeros; not when part of a longer
  dotted or dashed token: 1.2.3.4.5, v1.2.3.4, 1.2.3.4-beta, 1.2.3.4+build are version strings.
  IPv6 in every RFC 4291/5952 form (full, "::"-compressed, IPv4-embedded), checked by the
  standard library; at least four hex digits, so "::1" and "a::b" in code are not reported.
- phone: international "+CC ..." or "00CC ..." (8-15 digits, E.164), US/NANP 3-3-4 with
  separators or parentheses (area code 2-9xx, any exchange: 555-123-4567 is what people type),
  bare NANP ten-digit runs starting 2-9 (not part of a longer digit or alphanumeric run),
  national numbers with a trunk 0 (10-12 digits, e.g. UK/DE/FR). Other bare digit runs are not
  phones (order numbers, timestamps such as 1714557600). A number followed by further digit
  groups ends where its country's length says (NATIONAL_MAX_DIGITS) or before a group joined
  to what follows by another separator: "+44 20 7946 0958 123-45-6789" is a phone and an SSN.
- us_ssn: AAA-GG-SSSS or with spaces; area not 000/666/9xx, group not 00, serial not 0000;
  nine bare digits only right after "SSN" or "social security (number)".
- iban: country code, check digits and BBAN (spaces every 4 allowed), exact length for
  the country, mod-97 == 1.
- api_key: OpenAI (sk-, sk-proj-, sk-svcacct-, sk-admin-), Anthropic (sk-ant-api03-...),
  AWS access key ids (AKIA/ASIA/ABIA/ACCA + 16), GitHub (ghp_/gho_/ghu_/ghs_/ghr_,
  github_pat_), Slack (xoxb-/xoxp-/xoxa-/xoxr-/xoxs-/xoxo-, xapp-), Stripe secret and
  restricted keys (sk_live_/rk_live_/sk_test_/rk_test_), Google (AIza + 35), GitLab
  (glpat-), Hugging Face (hf_). AWS secret access keys have no recognisable shape and are
  not detected.
- jwt: three base64url segments whose first decodes to a JSON object with "alg".
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

from fleetward.runtime.guardrails import core
from fleetward.runtime.guardrails.normalize import View, pii_view, token_view
from fleetward.runtime.guardrails.userregex import GuardrailRegex
from langchain.agents.middleware import PIIMatch

BUILTIN_TYPES = ("email", "credit_card", "ip", "phone", "us_ssn", "iban", "api_key", "jwt")

# Overlaps: the longest match wins; between equally long ones the more specific type.
# A user-supplied regex (custom entity or a replaced built-in detector) ranks above all.
# What a losing match covers beyond the winners is still reported (resolve_overlaps).
SPECIFICITY = {
    "jwt": 90,
    "api_key": 85,
    "iban": 80,
    "email": 75,
    "credit_card": 70,
    "us_ssn": 65,
    "ip": 60,
    "phone": 50,
}
USER_REGEX_SPECIFICITY = 100


# Not frozen: a frozen dataclass costs ~4x more to create, and scans create many.
@dataclass(slots=True)
class Candidate:
    """A detected value: type label, input span and the value as seen by the detector."""

    type: str
    start: int
    end: int
    value: str
    specificity: int


# --------------------------------------------------------------------------- validators


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# IBAN lengths per country (SWIFT IBAN registry), as "CCnn" pairs.
_IBAN_REGISTRY = (
    "AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BI27 BR29 BY28 CH21 CR22 CY28 CZ24 DE22 DJ27 DK18 DO28 "
    "EE20 EG29 ES24 FI18 FK18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HR21 HU28 IE22 IL23 IQ23 IS26 IT27 "
    "JO30 KW30 KZ20 LB28 LC32 LI21 LT20 LU20 LV21 LY25 MC27 MD24 ME22 MK19 MN20 MR27 MT31 MU30 NI28 NL18 "
    "NO15 OM23 PK24 PL28 PS29 PT25 QA29 RO24 RS22 RU33 SA24 SC31 SD18 SE24 SI19 SK24 SM27 SO23 ST25 SV28 "
    "TL23 TN24 TR26 UA29 VA22 VG24 XK20 YE30 "
)
IBAN_LENGTHS = {pair[:2]: int(pair[2:]) for pair in _IBAN_REGISTRY.split()}


def iban_valid(compact: str) -> bool:
    """`compact`: upper-case IBAN without spaces."""
    if IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = (compact[4:] + compact[:4]).translate(_IBAN_LETTERS)
    if not rearranged.isdigit():
        return False
    return int(rearranged) % 97 == 1


# A=10 ... Z=35, as the IBAN check-digit algorithm (ISO 13616) wants.
_IBAN_LETTERS = {ord(ch): str(10 + i) for i, ch in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ")}


_SSN_INVALID = {"078051120", "219099999"}  # numbers published in advertising, never issued


def ssn_valid(digits: str) -> bool:
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return (
        area != "000"
        and area != "666"
        and area[0] != "9"
        and group != "00"
        and serial != "0000"
        and digits not in _SSN_INVALID
    )


def ipv4_valid(value: str) -> bool:
    parts = value.split(".")
    if len(parts) != 4:
        return False
    for part in parts:
        if not (part.isascii() and part.isdigit()) or len(part) > 3 or (len(part) > 1 and part[0] == "0"):
            return False
        if int(part) > 255:
            return False
    return True


def jwt_header_valid(token: str) -> bool:
    return _jwt_header_valid(token.split(".", 1)[0])


@lru_cache(maxsize=256)  # headers repeat ({"alg":"HS256","typ":"JWT"}), payloads do not
def _jwt_header_valid(header: str) -> bool:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, binascii.Error):
        return False
    return isinstance(decoded, dict) and "alg" in decoded


_HEX = frozenset("0123456789abcdefABCDEF")


def ipv6_valid(value: str) -> bool:
    """RFC 4291 text forms, IPv4-embedded included. Own code rather than `ipaddress`:
    the standard library's parser costs ~8 us per address, this ~1 us."""
    if value.count("::") > 1 or ":::" in value:
        return False
    groups_needed = 8
    if "." in value:  # trailing embedded IPv4: ::ffff:192.0.2.1
        head, sep, v4 = value.rpartition(":")
        if not sep or not ipv4_valid(v4):
            return False
        value = head + ":" if head.endswith(":") else head  # "::1.2.3.4" -> head ":" -> "::"
        groups_needed = 6
    if "::" in value:
        left, _, right = value.partition("::")
        parts = (left.split(":") if left else []) + (right.split(":") if right else [])
        if len(parts) > groups_needed - 1:
            return False
    else:
        parts = value.split(":")
        if len(parts) != groups_needed:
            return False
    return all(0 < len(p) <= 4 for p in parts) and set("".join(parts)) <= _HEX


# --------------------------------------------------------------------------- passes

_END = r"(?![0-9A-Za-z_]|[.,/-][0-9])"  # not followed by more of a token or number
# IBAN: entered at the first check digit, with the two country letters just before it.
_IBAN_BRANCH = (
    r"(?<=[A-Za-z]{2}[0-9])(?<![0-9A-Za-z_][A-Za-z]{2}[0-9])"
    r"(?P<iban>[0-9](?:\x20?[0-9A-Za-z]{4}){2,7}(?:\x20?[0-9A-Za-z]{1,4})?)(?![0-9A-Za-z])"
)
# IPv4: not part of a version string (1.2.3.4-beta, 1.2.3.4+build, 1.2.3.4.5).
_IPV4_BRANCH = r"(?P<ipv4>[0-9]{0,2}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3})(?![0-9A-Za-z_]|\.[0-9]|[-+][0-9A-Za-z])"
# The rest, each written as what follows the first digit.
_AFTER_FIRST_DIGIT = (
    # cards, first digit 2-6: 4-4-4-4[-1..3] with one consistent separator, 4-6-5, 4-6-4, 13-19 digits;
    # a short last group that the same separator continues is the start of the next number
    r"(?<=[2-6])(?P<card>[0-9]{3}(?P<cs>[\x20.-]?)[0-9]{4}(?P=cs)[0-9]{4}(?P=cs)[0-9]{4}"
    r"(?:(?P=cs)[0-9]{1,3}(?!(?P=cs)[0-9]))?"
    r"|[0-9]{3}(?P<cs2>[\x20-])[0-9]{6}(?P=cs2)[0-9]{4,5}|[0-9]{12,18})" + _END,
    # SSN: 123-45-6789, 123 45 6789
    r"(?P<ssn>[0-9]{2}(?P<ss>[\x20-])[0-9]{2}(?P=ss)[0-9]{4})" + _END,
    # nine bare digits: an SSN only right after "SSN" (checked in Python)
    r"(?P<ssnbare>[0-9]{8})" + _END,
    # NANP with a leading 1: 1-800-555-0199, 1 (800) 555-0199; not the last group of an IPv6
    # address ("2001:db8::1 415-555-0132": the "1" is the address's)
    r"(?<=1)(?<!::1)(?<!:[0-9A-Fa-f]:1)(?<!:[0-9A-Fa-f]{2}:1)(?<!:[0-9A-Fa-f]{3}:1)(?<!:[0-9A-Fa-f]{4}:1)"
    r"(?P<us1>[\x20.-]?(?:\([2-9][0-9]{2}\)\x20?|[2-9][0-9]{2}[\x20.-])[0-9]{3}[\x20.-][0-9]{4})" + _END,
    # NANP: 415-555-0132, 415.555.0132, 415 555 0132. Any exchange: fictional numbers such as
    # 555-123-4567 are what people type in tests and examples (a missed phone costs more).
    r"(?<=[2-9])(?P<us>[0-9]{2}[\x20.-][0-9]{3}[\x20.-][0-9]{4})" + _END,
    # NANP without separators: 5551234567, ten digits and no more (1714557600 is a timestamp)
    r"(?<=[2-9])(?P<usbare>[0-9]{9})" + _END,
    # international with a 00 prefix: 0044 20 7946 0958
    r"(?<=0)(?P<intl00>0[1-9][0-9]{0,2}(?:[\x20.-]?\(?[0-9]{1,5}\)?){2,6})" + _END,
    # national with a trunk 0: 020 7946 0958, 07700 900123, 030/1234567, 01 23 45 67 89
    r"(?<=0)(?P<trunk>[1-9][0-9]{0,4}(?:[\x20./-]?[0-9]{2,5}){1,5})" + _END,
)
# Digit-led values in one combined pass. The pattern starts with a single character class, so
# the regex engine's character-set prefix scan skips every non-digit at C speed; the first
# digit is therefore consumed before the alternation and each branch continues after it (a
# lookbehind re-reads it where a branch needs to know which digit it was). Left boundary: not
# inside a word, number or dotted token; cards/SSNs/phones also not after "/" or "-" (path
# segments, UUID and ISBN parts).
_NUM = re.compile(
    r"[0-9](?:"
    + _IBAN_BRANCH
    + r"|(?<![0-9A-Za-z_.+][0-9])(?:"
    + _IPV4_BRANCH
    + r"|(?<![/-][0-9])(?:"
    + "|".join(_AFTER_FIRST_DIGIT)
    + ")))"
)
# "+" or "(" led phones: +1 (415) 555-0132, +44 20 7946 0958, (415) 555-0132, (020) 7946 0958
# Two patterns rather than one alternation: each starts with a literal ("+" or "("), which the
# regex engine finds with a fast substring search (an alternation falls back to a slower
# character-set test at every position).
_PLUS = re.compile(r"\+[1-9][0-9]{0,2}(?:[\x20.-]?\(?[0-9]{1,5}\)?){2,6}" + _END)
_PAREN = re.compile(
    r"\((?:[2-9][0-9]{2}\)\x20?[0-9]{3}[\x20.-]?[0-9]{4}|0[1-9][0-9]{1,4}\)\x20?[0-9]{3,4}[\x20.-]?[0-9]{3,4})" + _END
)
_SSN_CONTEXT = re.compile(r"(?i)(?:ssn|social\s+security(?:\s+(?:number|no\.?|#))?)\W{0,4}\Z")

# Email: found from its "@" (a literal, so the engine jumps between "@"s); the local part is
# then walked backwards in Python, which is cheaper than a regex that starts at every letter.
_EMAIL_DOMAIN = re.compile(r"@((?:[^\W_](?:[^\W_]|-){0,62}\.)+[^\W\d_]{2,63})(?![^\W_]|-[^\W_])")
_LOCAL_CHAR_STR = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-'"
_LOCAL_CHARS = frozenset(_LOCAL_CHAR_STR)

# Secrets and tokens: runs of key-ish characters at least 16 long, classified afterwards.
_TOKEN_RUN = re.compile(rb" [^ ]{16,}")  # on the token view, where every non-token byte is a space
_SECRET_HINT = re.compile(r"eyJ|sk-|[sr]k_|A[KSBC][IC]A|gh[pousr]_|github_pat_|xox|xapp-|AIza|glpat-|hf_")
_SECRET = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"(?P<jwt>eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*)"
    r"|(?P<key>sk-ant-(?:api|admin)[0-9]{2}-[A-Za-z0-9_-]{20,}"
    r"|sk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,}"
    r"|sk-[A-Za-z0-9]{20,}"
    r"|(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Za-z0-9])"
    r"|gh[pousr]_[A-Za-z0-9]{36,}"
    r"|github_pat_[A-Za-z0-9_]{22,}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"
    r"|xapp-[0-9]-[A-Za-z0-9-]{10,}"
    r"|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"
    r"|AIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])"
    r"|glpat-[A-Za-z0-9_-]{20,}"
    r"|hf_[A-Za-z0-9]{30,}))"
)
# IPv6 seeds: "::" or ":hex:" (literal ":" first); the candidate is grown around the seed.
_IPV6_SEED = re.compile(r":[0-9A-Fa-f]{0,4}:")
_HEX_COLON_DOT_CHARS = "0123456789abcdefABCDEF:."
_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


@dataclass(slots=True)
class TokenRun:
    """A run of >= 16 key-ish characters (view offsets) with the secrets found inside it."""

    start: int
    end: int
    text: str
    secret_spans: tuple[tuple[int, int], ...]


_NON_DIGITS = re.compile(r"[^0-9]+")


def _digits(value: str) -> str:
    return _NON_DIGITS.sub("", value)


def _card(value: str) -> str | None:
    digits = _digits(value)
    if 13 <= len(digits) <= 19 and luhn_valid(digits):
        return value
    return None


_LAST_GROUP = re.compile(r"[\x20.-]\(?[0-9]+\)?$")
# Longest national number (digits after the country code) of numbering plans whose numbers
# have a fixed or short maximum length (ITU-T E.164 national plans). Used only to tell where a
# number ends when further digit groups follow it ("+44 20 7946 0958 020 7946 0958"). Country
# codes are prefix-free, so looking up the leading digits is unambiguous.
NATIONAL_MAX_DIGITS = {
    "1": 10,  # NANP
    "7": 10,
    "27": 9,
    "31": 9,
    "32": 9,
    "33": 9,
    "34": 9,
    "41": 9,
    "44": 10,
    "45": 8,
    "47": 8,
    "48": 9,
    "52": 10,
    "61": 9,
    "65": 8,
    "91": 10,
    "351": 9,
    "852": 8,
}


def _fit_phone(value: str, lo: int, hi: int) -> str | None:
    """The phone pattern is greedy and may take digit groups that follow the number
    ("+4915112345678 01 23"): drop trailing groups until the digit count fits."""
    if value.endswith(")") and value.count(")") > value.count("("):
        value = value[:-1]  # "(..., +1 415 555 0188)": the parenthesis closes the sentence's
    while True:
        n = len(_digits(value))
        if n <= hi:
            return value if n >= lo else None
        m = _LAST_GROUP.search(value)
        if m is None:
            return None
        value = value[: m.start()]


_NEXT_GROUP = re.compile(r"[\x20.-]\(?[0-9]|:[0-9A-Za-z_]")


def _phone_end(text: str, start: int, value: str, lo: int, prefix: int, probe: bool = True) -> str:
    """Where the phone `value` (fitted, at `start`) ends when more digit groups follow it: the
    pattern cannot tell "+44 20 7946 0958 123" from "+44 20 7946 0958" + "123-45-6789", so the
    groups that more likely start the next value are dropped (as long as `lo` digits remain):
    - the country's longest number says where it ends (`prefix`, for an international number:
      how many digits precede the country code, "00": 2, "+": 0);
    - otherwise a last group joined to what follows by another separator than to the number
      ("+49 30 1234567 123-45-6789"), one in parentheses (an area code: "... (415) 555-0132"),
      one that starts a colon token ("... 2001:db8::1", "... 12:30"), or one where a value of
      its own starts that ends past the number ("+49 30 1234567 219 45 1234", an SSN)."""
    end = start + len(value)
    if _NEXT_GROUP.match(text, end) is None:
        return value  # nothing follows: the number ends where the pattern ended it
    if prefix >= 0:
        digits = _digits(value)
        for size in (1, 2, 3):
            national = NATIONAL_MAX_DIGITS.get(digits[prefix : prefix + size])
            if national is not None:
                shorter = value
                while len(_digits(shorter)) > prefix + size + national and (m := _LAST_GROUP.search(shorter)):
                    shorter = shorter[: m.start()]
                return shorter if len(_digits(shorter)) >= lo else value
    m = _LAST_GROUP.search(value)
    if m is None or len(_digits(value[: m.start()])) < lo:
        return value
    cut = m.start()
    if value[cut] != text[end] or value[cut + 1] == "(":
        return value[:cut]
    if probe and (other := _value_at(text, start + cut + 1)) is not None and other.end > end:
        return value[:cut]
    return value


def _value_at(text: str, pos: int) -> Candidate | None:
    """The value the digit-led pass finds starting exactly at `pos`, if it ends on its own (a
    phone cut short of further groups is no evidence of where anything ends)."""
    m = _NUM.match(text, pos)
    if m is None or m.lastgroup == "iban":
        return None
    found = _classify(m.lastgroup, text, pos, m.group(), probe=False)
    if found is None or (found.end < m.end() and m.lastgroup in ("intl00", "trunk")):
        return None
    return found


def scan_numbers(text: str, out: list[Candidate]) -> None:
    """Cards, SSNs, IPv4, IBANs and phones (digit-, "+"- and "("-led)."""
    pos = 0
    search = _NUM.search
    while (m := search(text, pos)) is not None:
        start, end = m.start(), m.end()
        kind = m.lastgroup  # the outermost named group closes last: the branch that matched
        if kind == "iban":
            # An IBAN-shaped run whose check fails ("DE89 3704 ... 01", a typo) is skipped as a
            # whole: its digit groups are not cards or phones either.
            pos = _accept_iban(text, start - 2, end, out)
            continue
        found = _classify(kind, text, start, text[start:end])
        if found is None:
            pos = start + 1
            continue
        out.append(found)
        # A phone cut short of the digit groups after it may have begun inside the value those
        # groups belong to ("... 0958 4111 1111" of "+44 20 7946 0958 4111 1111 1111 1111"):
        # look for that value from the phone's second character on (overlaps are resolved later).
        pos = start + 1 if found.end < end and kind in ("intl00", "trunk") else found.end
    for lead, pattern, lo, prefix in (("+", _PLUS, 8, 0), ("(", _PAREN, 10, -1)):
        if lead in text:
            for m in pattern.finditer(text):
                if (fitted := _fit_phone(m.group(), lo, 15)) is not None:
                    fitted = _phone_end(text, m.start(), fitted, lo, prefix)
                    out.append(Candidate("phone", m.start(), m.start() + len(fitted), fitted, SPECIFICITY["phone"]))


def _classify(kind: str | None, text: str, start: int, value: str, probe: bool = True) -> Candidate | None:
    pii_type, accepted = "phone", None
    if kind == "card":
        pii_type, accepted = "credit_card", _card_value(value)
    elif kind == "ssn":
        pii_type, accepted = "us_ssn", value if ssn_valid(_digits(value)) else None
    elif kind == "ssnbare":
        context = _SSN_CONTEXT.search(text, max(0, start - 32), start)
        pii_type, accepted = "us_ssn", value if ssn_valid(value) and context else None
    elif kind == "ipv4":
        pii_type, accepted = "ip", value if ipv4_valid(value) else None
    elif kind in ("us1", "us", "usbare"):
        accepted = value
    elif kind == "intl00":
        fitted = _fit_phone(value, 10, 17)
        accepted = None if fitted is None else _phone_end(text, start, fitted, 10, 2, probe)
    elif kind == "trunk":
        fitted = _fit_phone(value, 10, 12)
        if fitted is not None:
            fitted = _phone_end(text, start, fitted, 10, -1, probe)
        accepted = fitted if fitted is not None and _trunk_phone(fitted) else None
    if accepted is None:
        return None
    return Candidate(pii_type, start, start + len(accepted), accepted, SPECIFICITY[pii_type])


_DATE_LIKE = re.compile(r"[0-9]{2}[./-][0-9]{2}[./-][0-9]{2}")


def _trunk_phone(value: str) -> bool:
    """National number with trunk 0: 10-12 digits; contiguous only up to 11; never a date."""
    n = len(_digits(value))
    if value.isdigit():
        return 10 <= n <= 11
    return 10 <= n <= 12 and not _DATE_LIKE.match(value)


def _card_value(value: str) -> str | None:
    """The card number in `value` (Luhn-checked), or None."""
    if _card(value):
        return value
    # 4-4-4-4 followed by a short group that is not part of the number (e.g. a CVV).
    groups = re.split(r"[\x20.-]", value)
    if len(groups) == 5:
        head = value[: len(value) - len(groups[-1]) - 1]
        if _card(head):
            return head
    return None


def _accept_iban(text: str, start: int, end: int, out: list[Candidate]) -> int:
    """Adds the IBAN at `start` if valid; returns where the scan goes on: after the IBAN's own
    characters (a value right after it is scanned), or after the whole run when it has no
    IBAN's length."""
    raw = text[start:end]
    length = IBAN_LENGTHS.get(raw[:2].upper())
    if length is None:
        return end
    # Cut the candidate to the country's length (the BBAN pattern may run into the next word).
    m = _iban_cut(length).match(raw)
    if m is None:
        return end
    cut = m.end()
    if cut < len(raw) and raw[cut] != " ":
        return end  # the run goes on without a space: not this IBAN
    value = raw[:cut]
    if iban_valid(value.replace(" ", "").upper()):
        out.append(Candidate("iban", start, start + cut, value, SPECIFICITY["iban"]))
    return start + cut


@lru_cache(maxsize=64)
def _iban_cut(length: int) -> re.Pattern[str]:
    """Matches the first `length` IBAN characters, spaces between them allowed."""
    return re.compile(rf"[A-Za-z0-9](?:\x20?[A-Za-z0-9]){{{length - 1}}}")


def scan_emails(text: str, out: list[Candidate]) -> None:
    if "@" not in text:
        return
    for m in _EMAIL_DOMAIN.finditer(text):
        at = m.start()
        lo = max(0, at - 64)
        head = text[lo:at]
        i = at - (len(head) - len(head.rstrip(_LOCAL_CHAR_STR)))  # str.rstrip runs in C
        while i > lo and (text[i - 1] in _LOCAL_CHARS or text[i - 1].isalnum()):  # Unicode local parts too
            i -= 1
        while i < at and text[i] in ".-'":  # quotes around the address are not part of it
            i += 1
        if i == at or text[at - 1] == ".":
            continue
        out.append(Candidate("email", i, m.end(), text[i : m.end()], SPECIFICITY["email"]))


def scan_token_runs(text: str) -> list[TokenRun]:
    # On the token view every run follows a space, so the pattern starts with a literal space
    # (fast substring search) instead of a character class tested at every position.
    data = b" " + token_view(text)
    runs = []
    for m in _TOKEN_RUN.finditer(data):
        start, end = m.start(), m.end() - 1  # minus the leading space, plus the padding
        run = text[start:end]
        spans = tuple(s.span() for s in _SECRET.finditer(run)) if _SECRET_HINT.search(run) else ()
        runs.append(TokenRun(start, end, run, spans))
    return runs


def scan_secrets(runs: Iterable[TokenRun], out: list[Candidate]) -> None:
    for run in runs:
        for s, e in run.secret_spans:
            value = run.text[s:e]
            if value.startswith("eyJ"):
                if not jwt_header_valid(value):
                    continue
                kind = "jwt"
            else:
                kind = "api_key"
            out.append(Candidate(kind, run.start + s, run.start + e, value, SPECIFICITY[kind]))


def scan_ipv6(text: str, out: list[Candidate]) -> None:
    pos = 0
    n = len(text)
    while (m := _IPV6_SEED.search(text, pos)) is not None:
        # Grow the candidate around the seed; str.rstrip/lstrip with a character set run in C.
        head = text[max(0, m.start() - 45) : m.start()]
        start = m.start() - (len(head) - len(head.rstrip(_HEX_COLON_DOT_CHARS)))
        tail = text[m.end() : m.end() + 45]
        end = m.end() + len(tail) - len(tail.lstrip(_HEX_COLON_DOT_CHARS))
        pos = end
        # Trim label colons ("Address:2001:db8::1") and sentence punctuation ("... ::1.").
        while start < end and (text[start] == "." or (text[start] == ":" and text[start + 1 : start + 2] != ":")):
            start += 1
        while end > start and (text[end - 1] == "." or (text[end - 1] == ":" and text[end - 2 : end - 1] != ":")):
            end -= 1
        if (start > 0 and text[start - 1] in _WORD_CHARS) or (end < n and text[end] in _WORD_CHARS):
            continue  # part of a longer token: std::vector, a hash, a MAC-like id
        value = text[start:end]
        if len(value) - value.count(":") - value.count(".") < 4 or not ipv6_valid(value):
            continue
        out.append(Candidate("ip", start, end, value, SPECIFICITY["ip"]))


# --------------------------------------------------------------------------- scanner


def resolve_overlaps(candidates: list[Candidate]) -> list[Candidate]:
    """Deterministic: within each cluster of overlapping matches the longest wins, then the
    most specific type, then the leftmost; the rest of the cluster is then re-resolved. What
    the losing matches cover beyond the winners is kept as findings of their own types (no
    detected character is dropped); a loser entirely inside the winners is dropped."""
    if len(candidates) < 2:
        return candidates
    ordered = sorted(candidates, key=_by_position)
    if all(a.end <= b.start for a, b in pairwise(ordered)):
        return ordered  # the common case: nothing overlaps
    chosen: list[Candidate] = []
    cluster: list[Candidate] = [ordered[0]]
    cluster_end = ordered[0].end
    for c in ordered[1:]:
        if c.start < cluster_end:
            cluster.append(c)
            cluster_end = max(cluster_end, c.end)
            continue
        chosen.extend(_resolve_cluster(cluster))
        cluster = [c]
        cluster_end = c.end
    chosen.extend(_resolve_cluster(cluster))
    return chosen


def _by_position(c: Candidate) -> tuple[int, int]:
    return (c.start, c.end)


def _resolve_cluster(cluster: list[Candidate]) -> list[Candidate]:
    if len(cluster) == 1:
        return cluster
    kept: list[Candidate] = []
    losers: list[Candidate] = []
    for c in sorted(cluster, key=lambda c: (c.start - c.end, -c.specificity, c.start, c.type)):
        if all(c.end <= k.start or c.start >= k.end for k in kept):
            kept.append(c)
        else:
            losers.append(c)
    # What a losing match covers beyond the kept ones stays a finding of its own type: when two
    # values written side by side are matched with a wrong boundary ("+44 20 7946 0958 123" and
    # "123-45-6789"), dropping the loser would let its other characters ("-45-6789") through.
    for c in losers:
        for s, e in _uncovered(c.start, c.end, kept):
            piece = c.value[s - c.start : e - c.start]
            if _ALNUM.search(piece) is None:
                continue  # only a separator or a parenthesis
            stripped = piece.strip(_SPACES)  # the gap between the two values is not part of either
            s += len(piece) - len(piece.lstrip(_SPACES))
            kept.append(Candidate(c.type, s, s + len(stripped), stripped, c.specificity))
    kept.sort(key=lambda c: c.start)
    return kept


_ALNUM = re.compile(r"[^\W_]")
_SPACES = " \t\n\r\x0b\x0c"


def _uncovered(start: int, end: int, kept: list[Candidate]) -> list[tuple[int, int]]:
    """The parts of [start, end) that no kept candidate covers."""
    pieces = []
    pos = start
    for k in sorted(kept, key=_by_position):
        if k.end <= pos or k.start >= end:
            continue
        if k.start > pos:
            pieces.append((pos, k.start))
        pos = max(pos, k.end)
    if pos < end:
        pieces.append((pos, end))
    return pieces


@dataclass(frozen=True, slots=True)
class UserRegex:
    """A regular expression from a Guardrail (custom entity, or a built-in type's replacement),
    run with a match budget (userregex.py); a compiled `re` pattern is wrapped."""

    type: str
    pattern: GuardrailRegex

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, GuardrailRegex):
            object.__setattr__(self, "pattern", GuardrailRegex(self.pattern))


@dataclass(frozen=True, slots=True)
class ScanOutput:
    """Result of one PII scan: candidates in input offsets, plus the token runs found on the
    way (the injection detector reuses them to find base64 payloads without a second pass)."""

    candidates: list[Candidate]
    runs: list[TokenRun]
    view: View


class PIIScanner:
    """Finds PII in a text. `builtin` limits the built-in types searched; `user_regexes` add
    regexes (for custom entities or to replace a built-in type's detector)."""

    def __init__(self, builtin: Iterable[str] = BUILTIN_TYPES, user_regexes: Iterable[UserRegex] = ()) -> None:
        self.builtin = frozenset(builtin)
        unknown = self.builtin - set(BUILTIN_TYPES)
        if unknown:
            raise ValueError(f"unknown built-in PII types {sorted(unknown)}; allowed: {', '.join(BUILTIN_TYPES)}")
        self.user_regexes = tuple(user_regexes)
        b = self.builtin
        self._numbers = bool(b & {"credit_card", "us_ssn", "ip", "phone", "iban"})
        self._emails = "email" in b
        self._secrets = bool(b & {"api_key", "jwt"})
        self._ipv6 = "ip" in b
        self._builtin_list = sorted(b)

    def scan(self, text: str, *, want_runs: bool = False) -> ScanOutput:
        view = pii_view(text)
        vt = view.text
        assert isinstance(vt, str)
        found: list[Candidate] = []
        compiled = core.active()
        scanned = None
        if compiled is not None and vt.isascii():
            # The same passes in the compiled core (see core.py); with no Guardrail regex it
            # also resolves overlaps and keeps the asked types, as the code below does.
            try:
                scanned = compiled.scan_pii(
                    vt,
                    self._numbers,
                    self._emails,
                    self._secrets,
                    self._ipv6,
                    want_runs,
                    None if self.user_regexes else self._builtin_list,
                )
            except core.LimitError:
                pass  # pathological text: the Python passes below (see core.LimitError)
        if scanned is not None:
            raw, spans = scanned
            found = [Candidate(t, s, e, vt[s:e], SPECIFICITY[t]) for t, s, e in raw]
            runs = [TokenRun(s, e, vt[s:e], ()) for s, e in spans]
            if not self.user_regexes:
                return ScanOutput(self._mapped(found, view), runs, view)
        else:
            if self._numbers:
                scan_numbers(vt, found)
            if self._emails:
                scan_emails(vt, found)
            runs = scan_token_runs(vt) if (self._secrets or want_runs) else []
            if self._secrets:
                scan_secrets(runs, found)
            if self._ipv6:
                scan_ipv6(vt, found)
        for rx in self.user_regexes:
            spans = rx.pattern.spans(vt)
            if spans is None:  # over its match budget: fail closed, the whole text is this type
                spans = [(0, len(vt))] if vt else []
            for s, e in spans:
                found.append(Candidate(rx.type, s, e, vt[s:e], USER_REGEX_SPECIFICITY))
        # Types found but not asked for still take part in overlap resolution (a card number is
        # never reported as a phone number just because only phones are configured), but never
        # against a Guardrail's own regex: what a user asked for must not be dropped.
        if self.user_regexes:
            found = _drop_unasked_over_user_matches(found, self.builtin)
        found = [
            c for c in resolve_overlaps(found) if c.type in self.builtin or c.specificity == USER_REGEX_SPECIFICITY
        ]
        return ScanOutput(self._mapped(found, view), runs, view)

    @staticmethod
    def _mapped(found: list[Candidate], view: View) -> list[Candidate]:
        """Candidates in input offsets (the view's offsets differ for non-ASCII input)."""
        if view.index is None:
            return found
        mapped = []
        for c in found:
            s, e = view.span(c.start, c.end)
            mapped.append(Candidate(c.type, s, e, c.value, c.specificity))
        return mapped


def _drop_unasked_over_user_matches(found: list[Candidate], asked: frozenset[str]) -> list[Candidate]:
    user = [(c.start, c.end) for c in found if c.specificity == USER_REGEX_SPECIFICITY]
    return [
        c
        for c in found
        if c.type in asked
        or c.specificity == USER_REGEX_SPECIFICITY
        or not any(c.start < e and s < c.end for s, e in user)
    ]


_ALL = PIIScanner()


@lru_cache(maxsize=8)
def _cached_scan(text: str) -> tuple[Candidate, ...]:
    # PIIMiddleware runs one detector per type over the same message; scan it once.
    return tuple(_ALL.scan(text).candidates)


def detector_for(pii_type: str) -> Callable[[str], list[PIIMatch]]:
    """A LangChain detector (text -> [PIIMatch]) for one built-in type, with overlap
    resolution against every other built-in type, exactly as the scan engine does."""
    if pii_type not in BUILTIN_TYPES:
        raise ValueError(f"unknown built-in PII type {pii_type!r}; allowed: {', '.join(BUILTIN_TYPES)}")

    def detect(content: str) -> list[PIIMatch]:
        return [
            PIIMatch(type=pii_type, value=c.value, start=c.start, end=c.end)
            for c in _cached_scan(content)
            if c.type == pii_type
        ]

    detect.__name__ = f"detect_{pii_type}"
    return detect


def regex_detector(label: str, pattern: GuardrailRegex) -> Callable[[str], list[PIIMatch]]:
    def detect(content: str) -> list[PIIMatch]:
        spans = pattern.spans(content)
        if spans is None:  # over its match budget: fail closed, as the scan engine does
            spans = [(0, len(content))] if content else []
        return [PIIMatch(type=label, value=content[s:e], start=s, end=e) for s, e in spans]

    detect.__name__ = f"detect_{label}"
    return detect
