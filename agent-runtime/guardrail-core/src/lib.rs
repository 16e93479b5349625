//! Compiled hot path of `fleetward.runtime.guardrails`.
//!
//! The Python package stays the owner of what is detected: its regular expressions, tables
//! and rules are handed to [`Core`] at start-up (`fleetward/runtime/guardrails/core.py`), and
//! this crate runs the same passes over ASCII text, line for line as `detectors.py` and
//! `injection.py` do, without the interpreter's per-position and per-candidate costs.
//! PCRE2 runs the patterns: it has Python `re`'s match semantics for every construct they
//! use (lookbehind, backreferences, leftmost-first backtracking), so the patterns are reused
//! verbatim rather than rewritten. The callers only hand ASCII text to the scan functions
//! (the Python engine keeps the non-ASCII views); the two rare cases that need Python's
//! Unicode or JSON behaviour (a base64 payload that decodes to non-ASCII text, a JWT header
//! that `serde_json` refuses) are answered by calling back into the Python functions, so the
//! result is the same as the pure-Python engine's in every case.

use pcre2::bytes::{CaptureLocations, Regex, RegexBuilder};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};
use std::ffi::{c_int, c_void};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub mod validate;

use validate::{
    card_value, digit_count, fit_phone, ipv4_valid, ipv6_valid, is_word_byte, last_group,
    ssn_valid, trunk_phone,
};

/// Built-in PII types, in `detectors.BUILTIN_TYPES` order.
pub const PII_TYPES: [&str; 8] = [
    "email",
    "credit_card",
    "ip",
    "phone",
    "us_ssn",
    "iban",
    "api_key",
    "jwt",
];
const EMAIL: usize = 0;
const CREDIT_CARD: usize = 1;
const IP: usize = 2;
const PHONE: usize = 3;
const US_SSN: usize = 4;
const IBAN: usize = 5;
const API_KEY: usize = 6;
const JWT: usize = 7;

/// The named branches of `detectors._NUM` (the outermost group that took part tells which).
const NUM_BRANCHES: [&str; 10] = [
    "iban", "ipv4", "card", "ssn", "ssnbare", "us1", "us", "usbare", "intl00", "trunk",
];

/// The phone branches that take digit groups greedily and are then fitted (`_fit_phone`).
fn is_greedy_phone(branch: usize) -> bool {
    matches!(NUM_BRANCHES[branch], "intl00" | "trunk")
}

const MAX_BASE64_DEPTH: usize = 2; // injection._MAX_DEPTH

/// A detected value: type index into [`PII_TYPES`] and its span (byte = character offsets:
/// the text is ASCII).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub kind: usize,
    pub start: usize,
    pub end: usize,
}

/// An injection hit: family index into `Core::families` and its span.
type Hit = (usize, usize, usize);

fn regex_error(what: &str, pattern: &str, e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!(
        "guardrail core: pattern {what} ({pattern:?}) does not compile in PCRE2: {e}"
    ))
}

/// Python `re` syntax to PCRE2 for ASCII subjects. Only two constructs differ for the
/// patterns in use: `\Z` (Python: end of string; PCRE2's `\Z` also matches before a final
/// newline, its `\z` is Python's `\Z`) and `\s` (Python's str patterns also count
/// \x1c-\x1f as white space).
pub fn python_to_pcre2(pattern: &str) -> Result<String, String> {
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut in_class = false;
    let mut chars = pattern.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' => {
                let next = chars
                    .next()
                    .ok_or_else(|| "trailing backslash".to_string())?;
                match next {
                    'Z' => out.push_str("\\z"),
                    's' if in_class => out.push_str("\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f\\x20"),
                    's' => out.push_str("[\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f\\x20]"),
                    'S' => return Err("\\S is not supported".into()),
                    _ => {
                        out.push('\\');
                        out.push(next);
                    }
                }
            }
            '[' if !in_class => {
                in_class = true;
                out.push(ch);
                // A "]" right after "[" or "[^" is a literal, not the end of the class.
                let rest = chars.as_str();
                let lead = if rest.starts_with('^') { 1 } else { 0 };
                if rest[lead..].starts_with(']') {
                    out.push_str(&rest[..lead + 1]);
                    chars = rest[lead + 1..].chars();
                }
            }
            ']' if in_class => {
                in_class = false;
                out.push(ch);
            }
            _ => out.push(ch),
        }
    }
    Ok(out)
}

pub fn compile(what: &str, pattern: &str) -> PyResult<Regex> {
    let translated = python_to_pcre2(pattern).map_err(|e| regex_error(what, pattern, e))?;
    RegexBuilder::new()
        .jit_if_available(true)
        // Backtracking into long repetitions (a domain of thousands of labels) needs more
        // than the default 32 KiB; beyond 1 MiB the caller falls back (MatchLimitError).
        .max_jit_stack_size(Some(1 << 20))
        .build(&translated)
        .map_err(|e| regex_error(what, pattern, e))
}

/// `rx.match(data, pos)` of Python: a match that starts exactly at `pos`.
fn compile_anchored(what: &str, pattern: &str) -> PyResult<Regex> {
    compile(what, &format!("\\G(?:{pattern})"))
}

pyo3::create_exception!(
    fleetward_guardrail_core,
    MatchLimitError,
    pyo3::exceptions::PyRuntimeError,
    "A pattern hit a PCRE2 resource limit (JIT stack, match or depth limit) on this text; \
     Python's `re` has none, so the caller scans this text with the Python code instead."
);

fn pcre_err(e: pcre2::Error) -> PyErr {
    match e.kind() {
        pcre2::ErrorKind::Match => MatchLimitError::new_err(format!("guardrail core: {e}")),
        _ => PyValueError::new_err(format!("guardrail core: PCRE2 failed: {e}")),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Decoded base64 text, as `injection._decode_base64` classifies it.
enum Decoded {
    /// Not base64, not UTF-8, empty, no letter or not printable enough.
    Rejected,
    /// ASCII text that passed every check.
    Ascii(Vec<u8>),
    /// Valid UTF-8 with non-ASCII characters: Python's Unicode rules decide (callback).
    NonAscii,
}

fn base64_value(b: u8) -> Option<u32> {
    Some(match b {
        b'A'..=b'Z' => b - b'A',
        b'a'..=b'z' => b - b'a' + 26,
        b'0'..=b'9' => b - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    } as u32)
}

/// `base64.b64decode(padded, validate=True)` / `urlsafe_b64decode(padded)` for the chunks the
/// injection scan produces (alphabet characters, then at most a few trailing "="): unused
/// trailing bits are ignored as binascii does; a length of 4n+1 is an error.
pub fn decode_base64(chunk: &[u8]) -> Option<Vec<u8>> {
    let urlsafe = chunk.iter().any(|&b| b == b'-' || b == b'_');
    let end = chunk.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    let data = &chunk[..end];
    if data.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() / 4 * 3 + 2);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &b in data {
        let b = match (urlsafe, b) {
            (true, b'-') => b'+',
            (true, b'_') => b'/',
            // the urlsafe decoder maps "+" and "/" away first (they are discarded); the chunk
            // pattern never mixes them with "-"/"_", so this only guards the assumption
            (true, b'+' | b'/') => return None,
            _ => b,
        };
        let v = base64_value(b)?; // "=" inside the data, or a non-alphabet byte: an error
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn classify_decoded(raw: Option<Vec<u8>>) -> Decoded {
    let Some(raw) = raw else {
        return Decoded::Rejected;
    };
    if raw.is_empty() {
        return Decoded::Rejected;
    }
    if !raw.is_ascii() {
        return if std::str::from_utf8(&raw).is_ok() {
            Decoded::NonAscii
        } else {
            Decoded::Rejected
        };
    }
    if !raw.iter().any(u8::is_ascii_alphabetic) {
        return Decoded::Rejected;
    }
    let printable = raw
        .iter()
        .filter(|&&b| (0x20..0x7f).contains(&b) || matches!(b, b'\n' | b'\t' | b'\r'))
        .count();
    if printable == raw.len() || printable as f64 >= 0.95 * raw.len() as f64 {
        Decoded::Ascii(raw)
    } else {
        Decoded::Rejected
    }
}

/// Runs of at least 16 key-ish characters (`detectors.scan_token_runs` on ASCII text).
pub fn token_runs(text: &[u8], token_bytes: &[bool; 256]) -> Vec<(usize, usize)> {
    token_runs_sized(text, token_bytes, 16, usize::MAX)
}

/// Runs of `min..=max` key-ish characters.
pub fn token_runs_sized(
    text: &[u8],
    token_bytes: &[bool; 256],
    min: usize,
    max: usize,
) -> Vec<(usize, usize)> {
    let is_token = |b: u8| token_bytes[b as usize];
    let mut runs = Vec::new();
    let mut i = 0;
    while i < text.len() {
        if !is_token(text[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < text.len() && is_token(text[i]) {
            i += 1;
        }
        if (min..=max).contains(&(i - start)) {
            runs.push((start, i));
        }
    }
    runs
}

/// `injection._CAMEL` positions: offsets of upper-case letters that follow a lower-case one.
pub fn camel_positions(text: &[u8]) -> Vec<usize> {
    (1..text.len())
        .filter(|&i| text[i - 1].is_ascii_lowercase() && text[i].is_ascii_uppercase())
        .collect()
}

/// Where the camel-case positions of a view come from (`Core::scan_view`).
#[derive(Clone, Copy)]
pub enum Camel<'a> {
    /// Found by the caller (`injection._camel_positions`), in view offsets.
    Positions(&'a [usize]),
    /// The ASCII text the view is of (same offsets).
    Text(&'a [u8]),
}

/// `injection._joined_match_ok`.
fn joined_match_ok(data: &[u8], vs: usize, ve: usize, joined: &[(usize, usize)]) -> bool {
    let mut touches = false;
    let mut start_ok = vs == 0 || !data[vs - 1].is_ascii_lowercase();
    let mut end_ok = ve >= data.len() || !data[ve].is_ascii_lowercase();
    for &(s, e) in joined {
        touches = touches || (s < ve && vs < e);
        start_ok = start_ok || (s < vs && vs < e);
        end_ok = end_ok || (s < ve && ve < e);
    }
    touches && start_ok && end_ok
}

/// `detectors.resolve_overlaps`: the longest match of each overlapping cluster wins, then the
/// most specific type, then the leftmost; the rest of the cluster is re-resolved. What the
/// losing matches cover beyond the winners is kept as candidates of their own types.
pub fn resolve_overlaps(candidates: &mut Vec<Candidate>, specificity: &[i64; 8], t: &[u8]) {
    if candidates.len() < 2 {
        return;
    }
    candidates.sort_by_key(|c| (c.start, c.end)); // stable, as Python's sorted
    if candidates.windows(2).all(|w| w[0].end <= w[1].start) {
        return;
    }
    let mut chosen = Vec::with_capacity(candidates.len());
    let mut cluster: Vec<Candidate> = vec![candidates[0]];
    let mut cluster_end = candidates[0].end;
    for &c in &candidates[1..] {
        if c.start < cluster_end {
            cluster.push(c);
            cluster_end = cluster_end.max(c.end);
            continue;
        }
        resolve_cluster(&mut cluster, specificity, t, &mut chosen);
        cluster = vec![c];
        cluster_end = c.end;
    }
    resolve_cluster(&mut cluster, specificity, t, &mut chosen);
    *candidates = chosen;
}

/// `detectors._SPACES`: stripped from the ends of a losing match's leftover piece.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn resolve_cluster(
    cluster: &mut [Candidate],
    specificity: &[i64; 8],
    t: &[u8],
    out: &mut Vec<Candidate>,
) {
    if cluster.len() == 1 {
        out.push(cluster[0]);
        return;
    }
    cluster.sort_by(|a, b| {
        let ka = (a.start as i64 - a.end as i64, -specificity[a.kind], a.start);
        let kb = (b.start as i64 - b.end as i64, -specificity[b.kind], b.start);
        ka.cmp(&kb)
            .then_with(|| PII_TYPES[a.kind].cmp(PII_TYPES[b.kind]))
    });
    let mut kept: Vec<Candidate> = Vec::new();
    let mut losers: Vec<Candidate> = Vec::new();
    for &c in cluster.iter() {
        if kept.iter().all(|k| c.end <= k.start || c.start >= k.end) {
            kept.push(c);
        } else {
            losers.push(c);
        }
    }
    // What a losing match covers beyond the kept ones stays a candidate of its own type (two
    // values matched with a wrong boundary must not lose one's other characters).
    for c in losers {
        for (s, e) in uncovered(c.start, c.end, &kept) {
            let piece = &t[s..e];
            if !piece.iter().any(u8::is_ascii_alphanumeric) {
                continue; // only a separator or a parenthesis
            }
            let lead = piece.iter().take_while(|&&b| is_space(b)).count();
            let trail = piece.iter().rev().take_while(|&&b| is_space(b)).count();
            kept.push(Candidate {
                kind: c.kind,
                start: s + lead,
                end: e - trail,
            });
        }
    }
    kept.sort_by_key(|c| c.start);
    out.extend(kept);
}

/// `detectors._uncovered`: the parts of [start, end) that no kept candidate covers.
fn uncovered(start: usize, end: usize, kept: &[Candidate]) -> Vec<(usize, usize)> {
    let mut sorted: Vec<&Candidate> = kept.iter().collect();
    sorted.sort_by_key(|c| (c.start, c.end));
    let mut pieces = Vec::new();
    let mut pos = start;
    for k in sorted {
        if k.end <= pos || k.start >= end {
            continue;
        }
        if k.start > pos {
            pieces.push((pos, k.start));
        }
        pos = pos.max(k.end);
    }
    if pos < end {
        pieces.push((pos, end));
    }
    pieces
}

/// Which built-in passes a scan runs (`PIIScanner`'s flags).
#[derive(Clone, Copy)]
pub struct Passes {
    pub numbers: bool,
    pub emails: bool,
    pub secrets: bool,
    pub ipv6: bool,
}

/// The compiled plan: the Python detectors' patterns and tables, compiled once.
#[pyclass(frozen, module = "fleetward_guardrail_core")]
pub struct Core {
    num: Regex,
    /// `num` anchored at the start position (`_NUM.match(text, pos)`), for `value_at`.
    num_anchored: Regex,
    next_group: Regex,
    /// `detectors.NATIONAL_MAX_DIGITS`: country code digits -> longest national number.
    national_max: Vec<(Vec<u8>, usize)>,
    num_groups: Vec<usize>, // capture index of each NUM_BRANCHES entry
    /// Capture buffers for `num`, reused: creating one allocates a JIT stack.
    num_locations: Mutex<Vec<CaptureLocations>>,
    plus: Regex,
    paren: Regex,
    ssn_context: Regex,
    email_domain: Regex,
    local_chars: [bool; 256],
    secret_hint: Regex,
    secret: Regex,
    ipv6_seed: Regex,
    iban_lengths: [[u8; 26]; 26], // 0 = country not in the registry
    specificity: [i64; 8],
    spaced: Regex,
    squashed: Regex,
    spaced_by_family: Vec<Regex>,
    squashed_by_family: Vec<Regex>,
    families: Vec<Py<PyString>>,
    split_evidence: Regex,
    squash_stems: Vec<Vec<u8>>,
    /// Indices into `squash_stems` by their first letter (a-z).
    stems_by_letter: [Vec<usize>; 26],
    /// `injection.JOINED_TOKEN_BYTES`: a view token this long counts as run-together words.
    joined_token_bytes: usize,
    /// `injection.SHORT_TOKEN_RUN`: (min, max) characters of a short token run.
    short_token_run: (usize, usize),
    base64_run: Regex,
    nested_token_run: Regex,
    injection_bytes: [u8; 256],
    token_bytes: [bool; 256],
    type_names: Vec<Py<PyString>>,
    /// `detectors._jwt_header_valid(header) -> bool`, for headers serde_json refuses.
    jwt_header_fallback: Py<PyAny>,
    /// `injection._chunk_family(chunk, depth) -> str | None`, for non-ASCII payloads.
    chunk_fallback: Py<PyAny>,
}

fn get_str(d: &Bound<'_, PyDict>, key: &str) -> PyResult<String> {
    d.get_item(key)?
        .ok_or_else(|| PyValueError::new_err(format!("guardrail core: config has no {key:?}")))?
        .extract()
}

fn get_item<'py>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<Bound<'py, PyAny>> {
    d.get_item(key)?
        .ok_or_else(|| PyValueError::new_err(format!("guardrail core: config has no {key:?}")))
}

impl Core {
    fn family_of(
        &self,
        data: &[u8],
        start: usize,
        end: usize,
        by_family: &[Regex],
    ) -> PyResult<usize> {
        for (i, rx) in by_family.iter().enumerate() {
            if let Some(m) = rx.find_at(data, start).map_err(pcre_err)? {
                if m.end() == end {
                    return Ok(i);
                }
            }
        }
        for (i, rx) in by_family.iter().enumerate() {
            if rx.find_at(data, start).map_err(pcre_err)?.is_some() {
                return Ok(i);
            }
        }
        Err(PyValueError::new_err(
            "guardrail core: a combined match must match one family",
        ))
    }

    /// `injection._SHORT_TOKEN_RUN`: runs of key-ish characters too short for the PII pass's
    /// token runs but long enough to hold a base64 payload, with a capital or a digit.
    fn short_token_runs(&self, text: &[u8]) -> Vec<(usize, usize)> {
        let (min, max) = self.short_token_run;
        let mut runs = token_runs_sized(text, &self.token_bytes, min, max);
        runs.retain(|&(s, e)| {
            text[s..e]
                .iter()
                .any(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        });
        runs
    }

    /// Whether the letters of `token` (its other bytes skipped) hold a squash stem.
    fn holds_stem(&self, token: &[u8]) -> bool {
        let letters: Vec<u8> = token
            .iter()
            .copied()
            .filter(u8::is_ascii_lowercase)
            .collect();
        // Stems by first letter: one table look-up per letter instead of a search per stem.
        (0..letters.len()).any(|i| {
            self.stems_by_letter[(letters[i] - b'a') as usize]
                .iter()
                .any(|&k| letters[i..].starts_with(&self.squash_stems[k]))
        })
    }

    /// `injection._joined_tokens`: view spans of run-together tokens (`camel` sorted).
    fn joined_tokens(&self, data: &[u8], camel: &[usize]) -> Vec<(usize, usize)> {
        let mut joined = Vec::new();
        let mut next_camel = 0;
        let mut start = 0;
        for token in data.split(|&b| b == b' ') {
            let end = start + token.len();
            if !token.is_empty() {
                while next_camel < camel.len() && camel[next_camel] < start {
                    next_camel += 1;
                }
                let camel_inside = next_camel < camel.len() && camel[next_camel] < end;
                if (token.len() >= self.joined_token_bytes || camel_inside || token.contains(&b'_'))
                    && self.holds_stem(token)
                {
                    joined.push((start, end));
                }
            }
            start = end + 1;
        }
        joined
    }

    /// `injection._scan_view`: hits in view offsets. `camel`: `injection._camel_positions`, or
    /// the ASCII text the view is of, to find them in when needed.
    pub fn scan_view(&self, data: &[u8], camel: Camel<'_>) -> PyResult<Vec<Hit>> {
        let mut padded = Vec::with_capacity(data.len() + 1);
        padded.push(b' ');
        padded.extend_from_slice(data);
        let mut hits = Vec::new();
        for m in self.spaced.find_iter(&padded) {
            let m = m.map_err(pcre_err)?;
            let family = self.family_of(&padded, m.start(), m.end(), &self.spaced_by_family)?;
            hits.push((family, m.start(), m.end() - 1));
        }
        if !hits.is_empty() {
            return Ok(hits);
        }
        let split = self
            .split_evidence
            .find(&padded)
            .map_err(pcre_err)?
            .is_some();
        let joined = match camel {
            Camel::Positions(positions) => self.joined_tokens(data, positions),
            Camel::Text(text) => self.joined_tokens(data, &camel_positions(text)),
        };
        if !split && joined.is_empty() {
            return Ok(hits);
        }
        let letters: Vec<usize> = (0..data.len())
            .filter(|&i| data[i].is_ascii_lowercase())
            .collect();
        let squashed: Vec<u8> = letters.iter().map(|&i| data[i]).collect();
        if split
            && self
                .squash_stems
                .iter()
                .any(|stem| contains(&squashed, stem) && !contains(data, stem))
        {
            for m in self.squashed.find_iter(&squashed) {
                let m = m.map_err(pcre_err)?;
                let family =
                    self.family_of(&squashed, m.start(), m.end(), &self.squashed_by_family)?;
                hits.push((family, letters[m.start()], letters[m.end() - 1] + 1));
            }
            return Ok(hits);
        }
        let mut pos = 0;
        while let Some(m) = self.squashed.find_at(&squashed, pos).map_err(pcre_err)? {
            let (vs, ve) = (letters[m.start()], letters[m.end() - 1] + 1);
            if joined_match_ok(data, vs, ve, &joined) {
                let family =
                    self.family_of(&squashed, m.start(), m.end(), &self.squashed_by_family)?;
                hits.push((family, vs, ve));
                pos = m.end();
            } else {
                pos = m.start() + 1; // a later, overlapping match may still qualify
            }
        }
        Ok(hits)
    }

    /// `injection._scan_base64_run`.
    pub fn scan_base64_run(
        &self,
        py: Python<'_>,
        run: &[u8],
        offset: usize,
        depth: usize,
    ) -> PyResult<Vec<Hit>> {
        if depth >= MAX_BASE64_DEPTH {
            return Ok(Vec::new());
        }
        let mut chunks = Vec::new(); // collected first: the fallback may re-enter this regex
        for m in self.base64_run.find_iter(run) {
            let m = m.map_err(pcre_err)?;
            chunks.push((m.start(), m.end()));
        }
        let mut hits = Vec::new();
        for (s, e) in chunks {
            if let Some(family) = self.chunk_family(py, &run[s..e], depth)? {
                hits.push((family, offset + s, offset + e));
            }
        }
        Ok(hits)
    }

    fn chunk_family(&self, py: Python<'_>, chunk: &[u8], depth: usize) -> PyResult<Option<usize>> {
        let mut decoded = classify_decoded(decode_base64(chunk));
        if matches!(decoded, Decoded::Rejected) {
            // A key-style prefix ("sk-", "ghp_") shifts the alignment: retry after the last
            // "-"/"_" among the first 16 characters.
            let head = &chunk[..chunk.len().min(16)];
            if let Some(cut) = head.iter().rposition(|&b| b == b'-' || b == b'_') {
                if cut > 0 {
                    decoded = classify_decoded(decode_base64(&chunk[cut + 1..]));
                }
            }
        }
        match decoded {
            Decoded::Rejected => Ok(None),
            Decoded::Ascii(text) => self.first_family(py, &text, depth + 1),
            Decoded::NonAscii => {
                let chunk = std::str::from_utf8(chunk).expect("base64 chunks are ASCII");
                let family = self.chunk_fallback.call1(py, (chunk, depth))?;
                if family.is_none(py) {
                    return Ok(None);
                }
                let family: String = family.extract(py)?;
                let index = self
                    .families
                    .iter()
                    .position(|f| f.bind(py).to_str().map(|s| s == family).unwrap_or(false));
                index.map(Some).ok_or_else(|| {
                    PyValueError::new_err(format!("guardrail core: unknown family {family:?}"))
                })
            }
        }
    }

    /// The family of the first hit of `injection.detect_builtin(text, nested runs, depth)`.
    fn first_family(&self, py: Python<'_>, text: &[u8], depth: usize) -> PyResult<Option<usize>> {
        let view: Vec<u8> = text
            .iter()
            .map(|&b| self.injection_bytes[b as usize])
            .collect();
        if let Some(&(family, _, _)) = self.scan_view(&view, Camel::Text(text))?.first() {
            return Ok(Some(family));
        }
        let mut runs = Vec::new();
        for m in self.nested_token_run.find_iter(text) {
            let m = m.map_err(pcre_err)?;
            runs.push((m.start(), m.end()));
        }
        runs.extend(self.short_token_runs(text));
        for (s, e) in runs {
            if let Some(&(family, _, _)) = self.scan_base64_run(py, &text[s..e], s, depth)?.first()
            {
                return Ok(Some(family));
            }
        }
        Ok(None)
    }

    /// The built-in PII passes over ASCII text, candidates in the order Python appends them.
    pub fn scan_pii_raw(
        &self,
        py: Python<'_>,
        t: &[u8],
        passes: Passes,
        runs: &[(usize, usize)],
    ) -> PyResult<Vec<Candidate>> {
        let mut out = Vec::new();
        if passes.numbers {
            self.scan_numbers(t, &mut out)?;
        }
        if passes.emails {
            self.scan_emails(t, &mut out)?;
        }
        if passes.secrets {
            self.scan_secrets(py, t, runs, &mut out)?;
        }
        if passes.ipv6 {
            self.scan_ipv6(t, &mut out)?;
        }
        Ok(out)
    }

    fn scan_numbers(&self, t: &[u8], out: &mut Vec<Candidate>) -> PyResult<()> {
        let pooled = self
            .num_locations
            .lock()
            .ok()
            .and_then(|mut pool| pool.pop());
        let mut locs = pooled.unwrap_or_else(|| self.num.capture_locations());
        let result = self.scan_numbers_with(&mut locs, t, out);
        if let Ok(mut pool) = self.num_locations.lock() {
            pool.push(locs);
        }
        result
    }

    fn scan_numbers_with(
        &self,
        locs: &mut CaptureLocations,
        t: &[u8],
        out: &mut Vec<Candidate>,
    ) -> PyResult<()> {
        let mut pos = 0;
        while pos <= t.len() {
            let Some(m) = self.num.captures_read_at(locs, t, pos).map_err(pcre_err)? else {
                break;
            };
            let (start, end) = (m.start(), m.end());
            let branch = self.num_groups.iter().position(|&g| locs.get(g).is_some());
            if branch == Some(0) {
                // An IBAN-shaped run whose check fails is skipped as a whole.
                pos = self.accept_iban(t, start - 2, end, out);
                continue;
            }
            match branch.and_then(|b| self.classify(b, t, start, end, true).transpose()) {
                Some(found) => {
                    let found = found?;
                    out.push(found);
                    // A phone cut short of the digit groups after it may have begun inside the
                    // value those groups belong to: look for it from the phone's second character.
                    let cut = found.end < end && matches!(branch, Some(b) if is_greedy_phone(b));
                    pos = if cut { start + 1 } else { found.end };
                }
                None => pos = start + 1,
            }
        }
        for (lead, rx, lo, prefix) in [
            (b'+', &self.plus, 8, Some(0)),
            (b'(', &self.paren, 10, None),
        ] {
            if !t.contains(&lead) {
                continue;
            }
            for m in rx.find_iter(t) {
                let m = m.map_err(pcre_err)?;
                if let Some(n) = fit_phone(m.as_bytes(), lo, 15) {
                    let n = self.phone_end(t, m.start(), n, lo, prefix, true)?;
                    out.push(Candidate {
                        kind: PHONE,
                        start: m.start(),
                        end: m.start() + n,
                    });
                }
            }
        }
        Ok(())
    }

    /// `detectors._phone_end`: the length of the phone of fitted length `n` at `start` once the
    /// digit groups that more likely start the next value are dropped (`lo` digits remain).
    fn phone_end(
        &self,
        t: &[u8],
        start: usize,
        n: usize,
        lo: usize,
        prefix: Option<usize>,
        probe: bool,
    ) -> PyResult<usize> {
        let end = start + n;
        if self.next_group.find_at(t, end).map_err(pcre_err)?.is_none() {
            return Ok(n);
        }
        let value = &t[start..end];
        if let Some(prefix) = prefix {
            let digits: Vec<u8> = value.iter().copied().filter(u8::is_ascii_digit).collect();
            for size in 1..=3 {
                let cc = &digits[prefix.min(digits.len())..(prefix + size).min(digits.len())];
                let Some(&(_, national)) = self.national_max.iter().find(|(c, _)| c == cc) else {
                    continue;
                };
                let mut shorter = n;
                while digit_count(&value[..shorter]) > prefix + size + national {
                    match last_group(&value[..shorter]) {
                        Some(cut) => shorter = cut,
                        None => break,
                    }
                }
                return Ok(if digit_count(&value[..shorter]) >= lo {
                    shorter
                } else {
                    n
                });
            }
        }
        let Some(cut) = last_group(value) else {
            return Ok(n);
        };
        if digit_count(&value[..cut]) < lo {
            return Ok(n);
        }
        if value[cut] != t[end] || value[cut + 1] == b'(' {
            return Ok(cut);
        }
        if probe {
            if let Some(other) = self.value_at(t, start + cut + 1)? {
                if other.end > end {
                    return Ok(cut);
                }
            }
        }
        Ok(n)
    }

    /// `detectors._value_at`: the value the digit-led pass finds starting exactly at `pos`, if
    /// it ends on its own (not a phone cut short of further groups).
    fn value_at(&self, t: &[u8], pos: usize) -> PyResult<Option<Candidate>> {
        let mut locs = self.num_anchored.capture_locations();
        let Some(m) = self
            .num_anchored
            .captures_read_at(&mut locs, t, pos)
            .map_err(pcre_err)?
        else {
            return Ok(None);
        };
        let branch = self.num_groups.iter().position(|&g| locs.get(g).is_some());
        let Some(branch) = branch.filter(|&b| b != 0) else {
            return Ok(None); // no branch, or an IBAN
        };
        let found = self.classify(branch, t, pos, m.end(), false)?;
        Ok(found.filter(|f| !(f.end < m.end() && is_greedy_phone(branch))))
    }

    fn classify(
        &self,
        branch: usize,
        t: &[u8],
        start: usize,
        end: usize,
        probe: bool,
    ) -> PyResult<Option<Candidate>> {
        let v = &t[start..end];
        let (kind, accepted) = match NUM_BRANCHES[branch] {
            "card" => (CREDIT_CARD, card_value(v)),
            "ssn" => {
                let digits: Vec<u8> = v.iter().copied().filter(u8::is_ascii_digit).collect();
                (US_SSN, ssn_valid(&digits).then_some(v.len()))
            }
            "ssnbare" => {
                let lo = start.saturating_sub(32);
                let context = self
                    .ssn_context
                    .find_at(&t[..start], lo)
                    .map_err(pcre_err)?
                    .is_some();
                (US_SSN, (ssn_valid(v) && context).then_some(v.len()))
            }
            "ipv4" => (IP, ipv4_valid(v).then_some(v.len())),
            "us1" | "us" | "usbare" => (PHONE, Some(v.len())),
            "intl00" => match fit_phone(v, 10, 17) {
                Some(n) => (
                    PHONE,
                    Some(self.phone_end(t, start, n, 10, Some(2), probe)?),
                ),
                None => (PHONE, None),
            },
            "trunk" => match fit_phone(v, 10, 12) {
                Some(n) => {
                    let n = self.phone_end(t, start, n, 10, None, probe)?;
                    (PHONE, trunk_phone(&v[..n]).then_some(n))
                }
                None => (PHONE, None),
            },
            _ => (PHONE, None),
        };
        Ok(accepted.map(|n| Candidate {
            kind,
            start,
            end: start + n,
        }))
    }

    /// `detectors._accept_iban`: adds the IBAN at `start` if valid; returns where the scan goes on.
    fn accept_iban(&self, t: &[u8], start: usize, end: usize, out: &mut Vec<Candidate>) -> usize {
        let raw = &t[start..end];
        let (a, b) = (raw[0].to_ascii_uppercase(), raw[1].to_ascii_uppercase());
        if !a.is_ascii_uppercase() || !b.is_ascii_uppercase() {
            return end;
        }
        let length = self.iban_lengths[(a - b'A') as usize][(b - b'A') as usize] as usize;
        if length == 0 {
            return end;
        }
        // `_iban_cut(length).match(raw)`: the first `length` alphanumerics, single spaces
        // between them allowed (the optional space cannot be backtracked into usefully).
        if !raw[0].is_ascii_alphanumeric() {
            return end;
        }
        let (mut i, mut taken) = (1, 1);
        while taken < length {
            if i + 1 < raw.len() && raw[i] == b' ' && raw[i + 1].is_ascii_alphanumeric() {
                i += 2;
            } else if i < raw.len() && raw[i].is_ascii_alphanumeric() {
                i += 1;
            } else {
                return end;
            }
            taken += 1;
        }
        if i < raw.len() && raw[i] != b' ' {
            return end; // the run goes on without a space: not this IBAN
        }
        let compact: Vec<u8> = raw[..i]
            .iter()
            .filter(|&&b| b != b' ')
            .map(u8::to_ascii_uppercase)
            .collect();
        if validate::iban_valid(&compact, length) {
            out.push(Candidate {
                kind: IBAN,
                start,
                end: start + i,
            });
        }
        start + i
    }

    fn scan_emails(&self, t: &[u8], out: &mut Vec<Candidate>) -> PyResult<()> {
        if !t.contains(&b'@') {
            return Ok(());
        }
        for m in self.email_domain.find_iter(t) {
            let m = m.map_err(pcre_err)?;
            let at = m.start();
            let lo = at.saturating_sub(64);
            let mut i = at;
            while i > lo && self.local_chars[t[i - 1] as usize] {
                i -= 1;
            }
            while i < at && matches!(t[i], b'.' | b'-' | b'\'') {
                i += 1;
            }
            if i == at || t[at - 1] == b'.' {
                continue;
            }
            out.push(Candidate {
                kind: EMAIL,
                start: i,
                end: m.end(),
            });
        }
        Ok(())
    }

    fn scan_secrets(
        &self,
        py: Python<'_>,
        t: &[u8],
        runs: &[(usize, usize)],
        out: &mut Vec<Candidate>,
    ) -> PyResult<()> {
        for &(rs, re) in runs {
            let run = &t[rs..re];
            if self.secret_hint.find(run).map_err(pcre_err)?.is_none() {
                continue;
            }
            for m in self.secret.find_iter(run) {
                let m = m.map_err(pcre_err)?;
                let value = m.as_bytes();
                let kind = if value.starts_with(b"eyJ") {
                    if !self.jwt_header_valid(py, value)? {
                        continue;
                    }
                    JWT
                } else {
                    API_KEY
                };
                out.push(Candidate {
                    kind,
                    start: rs + m.start(),
                    end: rs + m.end(),
                });
            }
        }
        Ok(())
    }

    fn jwt_header_valid(&self, py: Python<'_>, token: &[u8]) -> PyResult<bool> {
        let header = token.split(|&b| b == b'.').next().unwrap_or(token);
        // `urlsafe_b64decode(header + "=" * (-len(header) % 4))`
        let Some(raw) = decode_base64(header) else {
            return Ok(false);
        };
        match serde_json::from_slice::<serde_json::Value>(&raw) {
            Ok(value) => Ok(value.as_object().is_some_and(|o| o.contains_key("alg"))),
            // Python's json is more lenient (NaN, encoded surrogates, deep nesting): ask it.
            Err(_) => {
                let header = std::str::from_utf8(header).expect("JWT headers are ASCII");
                self.jwt_header_fallback.call1(py, (header,))?.extract(py)
            }
        }
    }

    fn scan_ipv6(&self, t: &[u8], out: &mut Vec<Candidate>) -> PyResult<()> {
        let is_hcd = |b: u8| b.is_ascii_hexdigit() || b == b':' || b == b'.';
        let n = t.len();
        let mut pos = 0;
        while pos <= n {
            let Some(m) = self.ipv6_seed.find_at(t, pos).map_err(pcre_err)? else {
                break;
            };
            let mut start = m.start();
            let floor = m.start().saturating_sub(45);
            while start > floor && is_hcd(t[start - 1]) {
                start -= 1;
            }
            let mut end = m.end();
            let ceil = (m.end() + 45).min(n);
            while end < ceil && is_hcd(t[end]) {
                end += 1;
            }
            pos = end;
            // Trim label colons ("Address:2001:db8::1") and sentence punctuation ("... ::1.").
            while start < end
                && (t[start] == b'.' || (t[start] == b':' && t.get(start + 1) != Some(&b':')))
            {
                start += 1;
            }
            while end > start
                && (t[end - 1] == b'.' || (t[end - 1] == b':' && (end < 2 || t[end - 2] != b':')))
            {
                end -= 1;
            }
            if (start > 0 && is_word_byte(t[start - 1])) || (end < n && is_word_byte(t[end])) {
                continue;
            }
            let value = &t[start..end];
            let hexish = value.iter().filter(|&&b| b != b':' && b != b'.').count();
            if hexish < 4 || !ipv6_valid(value) {
                continue;
            }
            out.push(Candidate {
                kind: IP,
                start,
                end,
            });
        }
        Ok(())
    }

    fn injection_view(&self, t: &[u8]) -> Vec<u8> {
        t.iter()
            .map(|&b| self.injection_bytes[b as usize])
            .collect()
    }

    fn ascii<'a>(&self, text: &'a str) -> PyResult<&'a [u8]> {
        if !text.is_ascii() {
            return Err(PyValueError::new_err(
                "guardrail core: scan functions take ASCII text only",
            ));
        }
        Ok(text.as_bytes())
    }

    fn hits_to_py(&self, py: Python<'_>, hits: &[Hit]) -> Vec<(Py<PyString>, usize, usize)> {
        hits.iter()
            .map(|&(f, s, e)| (self.families[f].clone_ref(py), s, e))
            .collect()
    }
}

fn builtin_mask(py_types: &[String]) -> PyResult<[bool; 8]> {
    let mut mask = [false; 8];
    for t in py_types {
        let i = PII_TYPES.iter().position(|p| p == t).ok_or_else(|| {
            PyValueError::new_err(format!("guardrail core: unknown PII type {t:?}"))
        })?;
        mask[i] = true;
    }
    Ok(mask)
}

#[pymethods]
impl Core {
    /// `config`: the Python detectors' patterns and tables (built by `guardrails/core.py`).
    #[new]
    fn new(py: Python<'_>, config: &Bound<'_, PyDict>) -> PyResult<Self> {
        let p = |key: &str| -> PyResult<Regex> { compile(key, &get_str(config, key)?) };
        let num = p("num")?;
        let names = num.capture_names();
        let num_groups = NUM_BRANCHES
            .iter()
            .map(|b| {
                names
                    .iter()
                    .position(|n| n.as_deref() == Some(*b))
                    .ok_or_else(|| {
                        PyValueError::new_err(format!("guardrail core: num has no group {b:?}"))
                    })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let mut local_chars = [false; 256];
        for b in get_str(config, "local_chars")?.bytes() {
            local_chars[b as usize] = true;
        }
        let mut iban_lengths = [[0u8; 26]; 26];
        let lengths = get_item(config, "iban_lengths")?;
        for (country, length) in lengths.downcast::<PyDict>()?.iter() {
            let country: String = country.extract()?;
            let c = country.as_bytes();
            if c.len() != 2 || !c[0].is_ascii_uppercase() || !c[1].is_ascii_uppercase() {
                return Err(PyValueError::new_err(format!(
                    "guardrail core: bad IBAN country {country:?}"
                )));
            }
            iban_lengths[(c[0] - b'A') as usize][(c[1] - b'A') as usize] = length.extract()?;
        }
        let mut specificity = [0i64; 8];
        let spec = get_item(config, "specificity")?;
        for (i, name) in PII_TYPES.iter().enumerate() {
            specificity[i] = spec.get_item(*name)?.extract()?;
        }
        let table: Vec<u8> = get_item(config, "injection_bytes")?.extract()?;
        let injection_bytes: [u8; 256] = table.try_into().map_err(|_| {
            PyValueError::new_err("guardrail core: injection_bytes must be 256 bytes")
        })?;
        let mut families = Vec::new();
        let mut spaced_by_family = Vec::new();
        let mut squashed_by_family = Vec::new();
        for item in get_item(config, "families")?.try_iter()? {
            let (name, spaced, squashed): (String, String, String) = item?.extract()?;
            spaced_by_family.push(compile_anchored(&name, &spaced)?);
            squashed_by_family.push(compile_anchored(&name, &squashed)?);
            families.push(PyString::intern(py, &name).unbind());
        }
        let mut token_bytes = [false; 256];
        for b in get_item(config, "token_chars")?.extract::<Vec<u8>>()? {
            token_bytes[b as usize] = true;
        }
        let squash_stems = get_item(config, "squash_stems")?
            .try_iter()?
            .map(|s| s?.extract::<Vec<u8>>())
            .collect::<PyResult<Vec<_>>>()?;
        let mut stems_by_letter: [Vec<usize>; 26] = Default::default();
        for (k, stem) in squash_stems.iter().enumerate() {
            match stem.first() {
                Some(&b) if b.is_ascii_lowercase() => stems_by_letter[(b - b'a') as usize].push(k),
                _ => {
                    return Err(PyValueError::new_err(format!(
                        "guardrail core: squash stem {stem:?} must start with a-z"
                    )))
                }
            }
        }
        let mut national_max = Vec::new();
        for (cc, n) in get_item(config, "national_max_digits")?
            .downcast::<PyDict>()?
            .iter()
        {
            national_max.push((cc.extract::<String>()?.into_bytes(), n.extract()?));
        }
        Ok(Core {
            num_anchored: compile_anchored("num", &get_str(config, "num")?)?,
            next_group: compile_anchored("next_group", &get_str(config, "next_group")?)?,
            national_max,
            num,
            num_groups,
            num_locations: Mutex::new(Vec::new()),
            plus: p("plus")?,
            paren: p("paren")?,
            ssn_context: p("ssn_context")?,
            email_domain: p("email_domain")?,
            local_chars,
            secret_hint: p("secret_hint")?,
            secret: p("secret")?,
            ipv6_seed: p("ipv6_seed")?,
            iban_lengths,
            specificity,
            spaced: p("spaced")?,
            squashed: p("squashed")?,
            spaced_by_family,
            squashed_by_family,
            families,
            split_evidence: p("split_evidence")?,
            stems_by_letter,
            squash_stems,
            joined_token_bytes: get_item(config, "joined_token_bytes")?.extract()?,
            short_token_run: get_item(config, "short_token_run")?.extract()?,
            base64_run: p("base64_run")?,
            nested_token_run: p("nested_token_run")?,
            injection_bytes,
            token_bytes,
            type_names: PII_TYPES
                .iter()
                .map(|t| PyString::intern(py, t).unbind())
                .collect(),
            jwt_header_fallback: get_item(config, "jwt_header_fallback")?.unbind(),
            chunk_fallback: get_item(config, "chunk_fallback")?.unbind(),
        })
    }

    /// PII candidates of ASCII `text` as `(type, start, end)`, plus the token runs as
    /// `(start, end)`. With `builtin` (the asked types) the candidates are overlap-resolved
    /// and filtered as `PIIScanner.scan` does when no Guardrail regex takes part; without
    /// it they come raw, in the order the Python passes append them.
    #[pyo3(signature = (text, numbers, emails, secrets, ipv6, want_runs, builtin=None))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn scan_pii(
        &self,
        py: Python<'_>,
        text: &str,
        numbers: bool,
        emails: bool,
        secrets: bool,
        ipv6: bool,
        want_runs: bool,
        builtin: Option<Vec<String>>,
    ) -> PyResult<(Vec<(Py<PyString>, usize, usize)>, Vec<(usize, usize)>)> {
        let t = self.ascii(text)?;
        let runs = if secrets || want_runs {
            token_runs(t, &self.token_bytes)
        } else {
            Vec::new()
        };
        let passes = Passes {
            numbers,
            emails,
            secrets,
            ipv6,
        };
        let mut found = self.scan_pii_raw(py, t, passes, &runs)?;
        if let Some(builtin) = builtin {
            let mask = builtin_mask(&builtin)?;
            resolve_overlaps(&mut found, &self.specificity, t);
            found.retain(|c| mask[c.kind]);
        }
        let cands = found
            .iter()
            .map(|c| (self.type_names[c.kind].clone_ref(py), c.start, c.end))
            .collect();
        Ok((cands, runs))
    }

    /// Everything the engine needs from an ASCII text in one call: resolved PII candidates
    /// of the `builtin` types (none when `builtin` is empty) and, with `injection`, the
    /// built-in injection hits (`detect_builtin(text, runs)`), as `(family, start, end)`.
    #[allow(clippy::type_complexity)]
    fn scan_ascii(
        &self,
        py: Python<'_>,
        text: &str,
        builtin: Vec<String>,
        injection: bool,
    ) -> PyResult<(
        Vec<(Py<PyString>, usize, usize)>,
        Vec<(Py<PyString>, usize, usize)>,
    )> {
        let t = self.ascii(text)?;
        let mask = builtin_mask(&builtin)?;
        let passes = Passes {
            numbers: mask[CREDIT_CARD] || mask[US_SSN] || mask[IP] || mask[PHONE] || mask[IBAN],
            emails: mask[EMAIL],
            secrets: mask[API_KEY] || mask[JWT],
            ipv6: mask[IP],
        };
        let runs = if passes.secrets || injection {
            token_runs(t, &self.token_bytes)
        } else {
            Vec::new()
        };
        let mut found = Vec::new();
        if mask.iter().any(|&m| m) {
            found = self.scan_pii_raw(py, t, passes, &runs)?;
            resolve_overlaps(&mut found, &self.specificity, t);
            found.retain(|c| mask[c.kind]);
        }
        let mut hits = Vec::new();
        if injection {
            hits = self.scan_view(&self.injection_view(t), Camel::Text(t))?;
            for &(s, e) in runs.iter().chain(&self.short_token_runs(t)) {
                hits.extend(self.scan_base64_run(py, &t[s..e], s, 0)?);
            }
        }
        let cands = found
            .iter()
            .map(|c| (self.type_names[c.kind].clone_ref(py), c.start, c.end))
            .collect();
        Ok((cands, self.hits_to_py(py, &hits)))
    }

    /// `injection._scan_view` on an injection view (bytes) and its camel-case positions
    /// (`injection._camel_positions`, sorted; none when not given): `(family, start, end)` in
    /// view offsets.
    #[pyo3(signature = (data, camel=None))]
    fn scan_view_hits(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyBytes>,
        camel: Option<Vec<usize>>,
    ) -> PyResult<Vec<(Py<PyString>, usize, usize)>> {
        let camel = camel.unwrap_or_default();
        let hits = self.scan_view(data.as_bytes(), Camel::Positions(&camel))?;
        Ok(self.hits_to_py(py, &hits))
    }

    /// `injection._scan_base64_run` on one token run (ASCII by construction).
    fn scan_base64_run_hits(
        &self,
        py: Python<'_>,
        run: &str,
        offset: usize,
        depth: usize,
    ) -> PyResult<Vec<(Py<PyString>, usize, usize)>> {
        let t = self.ascii(run)?;
        let hits = self.scan_base64_run(py, t, offset, depth)?;
        Ok(self.hits_to_py(py, &hits))
    }
}

/// A Guardrail's own regular expression (`userregex.GuardrailRegex`), translated by the Python
/// side from `re`'s parse tree into PCRE2 syntax (UTF mode, every character set spelled out),
/// run with a budget. Unlike the built-in patterns, running out is never handed back to
/// Python's `re` (which cannot be stopped): it raises `MatchLimitError` and the caller fails
/// closed.
///
/// Through PCRE2's C API (`pcre2-sys`), which the `pcre2` crate does not expose for this: its
/// match limit restarts at every start position of a search (`pcre2_match.c` resets the
/// count), so a quadratic pattern (`(?s).*x$`) over a long text is not bounded by it; a
/// callout at the pattern's start, called at every start position, ends the search once the
/// time budget is spent. The match limit bounds the work at one position. No JIT: its limit
/// does not count the backtracking of a repeated character class.
#[pyclass(frozen, module = "fleetward_guardrail_core")]
pub struct UserRegex {
    code: UserCode,
    match_limit: u32,
}

/// A compiled pattern; PCRE2 code is read-only once compiled, so it may be shared by threads.
struct UserCode(*mut pcre2_sys::pcre2_code_8);
unsafe impl Send for UserCode {}
unsafe impl Sync for UserCode {}

impl Drop for UserCode {
    fn drop(&mut self) {
        // SAFETY: compiled by pcre2_compile_8 and freed once, here.
        unsafe { pcre2_sys::pcre2_code_free_8(self.0) }
    }
}

extern "C" {
    // In the bundled PCRE2 library; `pcre2-sys` has no binding for it.
    fn pcre2_set_callout_8(
        mcontext: *mut pcre2_sys::pcre2_match_context_8,
        callout: Option<unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int>,
        data: *mut c_void,
    ) -> c_int;
}

/// The callout at every start position: stop the search once past the deadline.
unsafe extern "C" fn user_regex_deadline(_block: *mut c_void, data: *mut c_void) -> c_int {
    // SAFETY: `data` is the `Instant` that `byte_spans` passes and keeps alive.
    let deadline = unsafe { &*(data as *const Instant) };
    if Instant::now() > *deadline {
        pcre2_sys::PCRE2_ERROR_CALLOUT
    } else {
        0
    }
}

/// Why `byte_spans` stopped early.
pub enum Exhausted {
    /// A search hit the match, depth or heap limit, or the time budget ran out.
    Budget,
    /// Any other PCRE2 error (its code).
    Error(c_int),
}

/// Match data and match context of one `byte_spans` call, freed on drop.
struct Matching {
    data: *mut pcre2_sys::pcre2_match_data_8,
    context: *mut pcre2_sys::pcre2_match_context_8,
}

impl Drop for Matching {
    fn drop(&mut self) {
        // SAFETY: created in `byte_spans` (null-checked) and freed once, here.
        unsafe {
            pcre2_sys::pcre2_match_data_free_8(self.data);
            pcre2_sys::pcre2_match_context_free_8(self.context);
        }
    }
}

impl UserRegex {
    pub fn compile(body: &str, match_limit: u32) -> Result<Self, String> {
        let pattern = format!("(?C)(?:{body})");
        let mut error: c_int = 0;
        let mut offset: usize = 0;
        // SAFETY: pattern pointer and length are valid; no compile context.
        let code = unsafe {
            pcre2_sys::pcre2_compile_8(
                pattern.as_ptr(),
                pattern.len(),
                pcre2_sys::PCRE2_UTF,
                &mut error,
                &mut offset,
                std::ptr::null_mut(),
            )
        };
        if code.is_null() {
            let mut message = [0u8; 256];
            // SAFETY: the buffer and its length are valid.
            let n = unsafe {
                pcre2_sys::pcre2_get_error_message_8(error, message.as_mut_ptr(), message.len())
            };
            let text = String::from_utf8_lossy(&message[..n.max(0) as usize]).into_owned();
            return Err(format!("{text} at offset {offset}"));
        }
        Ok(UserRegex {
            code: UserCode(code),
            match_limit,
        })
    }

    /// Non-empty match spans in byte offsets of `t` (valid UTF-8), as `re.finditer` finds
    /// them: after an empty match the next search may not be empty where it starts.
    pub fn byte_spans(&self, t: &[u8], budget: Duration) -> Result<Vec<(usize, usize)>, Exhausted> {
        static EMPTY: [u8; 1] = [0]; // a dereferenceable pointer for an empty subject
        let subject = if t.is_empty() { &EMPTY[..] } else { t };
        let deadline = Instant::now() + budget;
        // SAFETY: null general contexts are allowed; results are null-checked before use.
        let m = unsafe {
            Matching {
                data: pcre2_sys::pcre2_match_data_create_from_pattern_8(
                    self.code.0,
                    std::ptr::null_mut(),
                ),
                context: pcre2_sys::pcre2_match_context_create_8(std::ptr::null_mut()),
            }
        };
        if m.data.is_null() || m.context.is_null() {
            return Err(Exhausted::Error(pcre2_sys::PCRE2_ERROR_NOMEMORY));
        }
        // SAFETY: the context is valid; `deadline` outlives every pcre2_match_8 call below.
        unsafe {
            pcre2_sys::pcre2_set_match_limit_8(m.context, self.match_limit);
            pcre2_set_callout_8(
                m.context,
                Some(user_regex_deadline),
                &deadline as *const Instant as *mut c_void,
            );
        }
        let mut out = Vec::new();
        let (mut pos, mut must_advance) = (0, false);
        while pos <= t.len() {
            let mut options = pcre2_sys::PCRE2_NO_UTF_CHECK; // `t` comes from a &str
            if must_advance {
                options |= pcre2_sys::PCRE2_NOTEMPTY_ATSTART;
            }
            // SAFETY: code, subject, match data and context are valid; `pos` <= length.
            let rc = unsafe {
                pcre2_sys::pcre2_match_8(
                    self.code.0,
                    subject.as_ptr(),
                    t.len(),
                    pos,
                    options,
                    m.data,
                    m.context,
                )
            };
            if rc == pcre2_sys::PCRE2_ERROR_NOMATCH {
                break;
            }
            if rc < 0 {
                return Err(match rc {
                    pcre2_sys::PCRE2_ERROR_CALLOUT
                    | pcre2_sys::PCRE2_ERROR_MATCHLIMIT
                    | pcre2_sys::PCRE2_ERROR_DEPTHLIMIT
                    | pcre2_sys::PCRE2_ERROR_HEAPLIMIT => Exhausted::Budget,
                    other => Exhausted::Error(other),
                });
            }
            // SAFETY: after a match the ovector holds at least one pair.
            let (start, end) = unsafe {
                let ovector = pcre2_sys::pcre2_get_ovector_pointer_8(m.data);
                (*ovector, *ovector.add(1))
            };
            if end > start {
                out.push((start, end));
            }
            must_advance = end == start;
            pos = end;
        }
        Ok(out)
    }
}

#[pymethods]
impl UserRegex {
    /// `body`: the translated pattern; `match_limit`: PCRE2's match limit at one position.
    #[new]
    fn new(body: &str, match_limit: u32) -> PyResult<Self> {
        Self::compile(body, match_limit)
            .map_err(|e| PyValueError::new_err(format!("guardrail core: Guardrail regex: {e}")))
    }

    /// Non-empty match spans in character offsets (code points), as `re.finditer` finds them
    /// on `text` (no lone surrogates). Raises `MatchLimitError` when a search hits the match
    /// limit or all of them together take longer than `budget_ms`.
    fn spans(&self, py: Python<'_>, text: &str, budget_ms: u64) -> PyResult<Vec<(usize, usize)>> {
        let budget = Duration::from_millis(budget_ms);
        let spans = py
            .allow_threads(|| self.byte_spans(text.as_bytes(), budget))
            .map_err(|e| match e {
                Exhausted::Budget => MatchLimitError::new_err(
                    "guardrail core: Guardrail regex over its match budget",
                ),
                Exhausted::Error(code) => {
                    PyValueError::new_err(format!("guardrail core: PCRE2 error {code}"))
                }
            })?;
        if text.is_ascii() {
            return Ok(spans);
        }
        // Byte offsets to code points, walking forward once (spans are in order).
        let (mut byte, mut chars) = (0, 0);
        let mut to_chars = |b: usize| {
            chars += text[byte..b].chars().count();
            byte = b;
            chars
        };
        Ok(spans
            .into_iter()
            .map(|(s, e)| (to_chars(s), to_chars(e)))
            .collect())
    }
}

#[pymodule]
fn fleetward_guardrail_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Core>()?;
    m.add_class::<UserRegex>()?;
    m.add("MatchLimitError", m.py().get_type::<MatchLimitError>())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_syntax_is_translated() {
        assert_eq!(python_to_pcre2(r"a\Z").unwrap(), r"a\z");
        assert_eq!(
            python_to_pcre2(r"x\s+y").unwrap(),
            r"x[\t\n\x0b\x0c\r\x1c-\x1f\x20]+y"
        );
        assert_eq!(
            python_to_pcre2(r"[]\s]").unwrap(),
            r"[]\t\n\x0b\x0c\r\x1c-\x1f\x20]"
        );
        assert_eq!(python_to_pcre2(r"\\Z").unwrap(), r"\\Z");
        assert!(python_to_pcre2(r"\S").is_err());
    }

    #[test]
    fn base64_as_binascii() {
        // expected values: base64.b64decode / urlsafe_b64decode on the padded input
        assert_eq!(
            decode_base64(b"SGVsbG8gd29ybGQ="),
            Some(b"Hello world".to_vec())
        );
        assert_eq!(
            decode_base64(b"SGVsbG8gd29ybGQ"),
            Some(b"Hello world".to_vec())
        );
        assert_eq!(decode_base64(b"QUJDRB=="), Some(b"ABCD".to_vec())); // trailing bits ignored
        assert_eq!(decode_base64(b"SGVsbG8gd29ybGQhI"), None); // 4n+1 characters
        assert_eq!(decode_base64(b"-_-_"), Some(vec![0xfb, 0xff, 0xbf]));
        assert_eq!(decode_base64(b"ab=c"), None);
    }

    #[test]
    fn camel_positions_and_short_runs() {
        assert_eq!(
            camel_positions(b"IgnoreAllPrevious aB xyZ"),
            vec![6, 9, 19, 23]
        );
        assert_eq!(camel_positions(b"ABC abc"), Vec::<usize>::new());
        let mut table = [false; 256];
        for b in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_.-" {
            table[*b as usize] = true;
        }
        let text = b"decode YWN0IGFzIERBTg short colleague 0123456789abcdefg";
        assert_eq!(
            token_runs_sized(text, &table, 8, 15),
            vec![(7, 21), (28, 37)]
        );
    }

    #[test]
    fn joined_matches_touch_a_run_together_token_at_word_boundaries() {
        let data = b"please rewrite myfunction";
        let joined = [(15, 25)];
        assert!(!joined_match_ok(data, 9, 25, &joined)); // starts inside "rewrite"
        assert!(joined_match_ok(data, 7, 25, &joined));
        assert!(joined_match_ok(data, 17, 25, &joined)); // starts inside the joined token
        assert!(!joined_match_ok(data, 0, 6, &joined)); // does not touch it
    }

    #[test]
    fn user_regex_iterates_like_python_finditer() {
        // expected values: [m.span() for m in re.finditer(p, t) if m.end() > m.start()]
        let spans = |p: &str, t: &str| {
            let rx = UserRegex::compile(p, 1_000_000).unwrap();
            match rx.byte_spans(t.as_bytes(), Duration::from_secs(5)) {
                Ok(s) => s,
                Err(_) => panic!("over budget"),
            }
        };
        assert_eq!(spans("a*", "baa"), vec![(1, 3)]);
        assert_eq!(spans("(?:)|ab", "ab"), vec![(0, 2)]); // non-empty after an empty match at 0
        assert_eq!(spans("x*|b", "abc"), vec![(1, 2)]);
        assert_eq!(spans("\\x{e9}+", "caf\u{e9}\u{e9}!"), vec![(3, 7)]); // bytes here
    }

    #[test]
    fn user_regex_stops_at_the_match_limit_and_the_time_budget() {
        let exponential = UserRegex::compile("(?:a|aa)+$", 100_000).unwrap();
        let text = "a".repeat(60) + "!";
        assert!(matches!(
            exponential.byte_spans(text.as_bytes(), Duration::from_secs(5)),
            Err(Exhausted::Budget)
        ));
        // quadratic (`(?s).*x$` as userregex.translate writes it): each start position is
        // within the match limit, the deadline stops it
        let quadratic = UserRegex::compile(
            "(?:[\\x{0}-\\x{d7ff}\\x{e000}-\\x{10ffff}]){0,}\\x{78}(?=\\x{a}?\\z)",
            10_000_000,
        )
        .unwrap();
        let long = "fox ".repeat(50_000);
        let started = Instant::now();
        assert!(matches!(
            quadratic.byte_spans(long.as_bytes(), Duration::from_millis(50)),
            Err(Exhausted::Budget)
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn token_runs_need_16_characters() {
        let mut table = [false; 256];
        for b in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_.-" {
            table[*b as usize] = true;
        }
        let text = b"key ghp_aB3dE5fG7hJ9kL1mN3pQ5 short 0123456789abcde, x";
        assert_eq!(token_runs(text, &table), vec![(4, 29)]);
    }

    #[test]
    fn overlaps_longest_then_most_specific() {
        let spec = [75, 70, 60, 50, 65, 80, 85, 90];
        let c = |kind, start, end| Candidate { kind, start, end };
        let mut found = vec![
            c(PHONE, 0, 12),
            c(CREDIT_CARD, 0, 19),
            c(EMAIL, 30, 40),
            c(IP, 30, 40),
        ];
        resolve_overlaps(&mut found, &spec, b"");
        assert_eq!(found, vec![c(CREDIT_CARD, 0, 19), c(EMAIL, 30, 40)]);
    }

    #[test]
    fn overlaps_keep_what_the_loser_covers_beyond_the_winner() {
        // expected values: detectors.resolve_overlaps on the same candidates
        let spec = [75, 70, 60, 50, 65, 80, 85, 90];
        let c = |kind, start, end| Candidate { kind, start, end };
        let text = b"+44 20 7946 0958 123-45-6789 (x)";
        let mut found = vec![c(US_SSN, 17, 28), c(PHONE, 0, 20)];
        resolve_overlaps(&mut found, &spec, text);
        assert_eq!(found, vec![c(PHONE, 0, 20), c(US_SSN, 20, 28)]);
        // a leftover of spaces or punctuation only is dropped; spaces are trimmed off
        let mut found = vec![
            c(PHONE, 0, 16),
            c(PHONE, 12, 17),
            c(IP, 20, 30),
            c(US_SSN, 15, 24),
        ];
        resolve_overlaps(&mut found, &spec, text);
        assert_eq!(
            found,
            vec![c(PHONE, 0, 16), c(US_SSN, 17, 20), c(IP, 20, 30)]
        );
    }
}
