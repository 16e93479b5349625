//! Checks run on the few candidates the patterns find; each mirrors the function of the
//! same name in `fleetward/runtime/guardrails/detectors.py` (ASCII input).

pub fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

pub fn digit_count(v: &[u8]) -> usize {
    v.iter().filter(|b| b.is_ascii_digit()).count()
}

pub fn luhn_valid(digits: &[u8]) -> bool {
    let mut total = 0u32;
    for (i, &ch) in digits.iter().rev().enumerate() {
        let mut d = u32::from(ch - b'0');
        if i & 1 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        total += d;
    }
    total.is_multiple_of(10)
}

/// `_card`: 13-19 digits (separators ignored), Luhn-valid.
fn card(v: &[u8]) -> bool {
    let digits: Vec<u8> = v.iter().copied().filter(u8::is_ascii_digit).collect();
    (13..=19).contains(&digits.len()) && luhn_valid(&digits)
}

/// `_card_value`: the length of the card number at the start of `v`, or None.
pub fn card_value(v: &[u8]) -> Option<usize> {
    if card(v) {
        return Some(v.len());
    }
    // 4-4-4-4 followed by a short group that is not part of the number (e.g. a CVV).
    let groups: Vec<&[u8]> = v.split(|&b| matches!(b, b' ' | b'.' | b'-')).collect();
    if groups.len() == 5 {
        let head = v.len() - groups[4].len() - 1;
        if card(&v[..head]) {
            return Some(head);
        }
    }
    None
}

pub fn ssn_valid(d: &[u8]) -> bool {
    if d.len() != 9 {
        return false;
    }
    let (area, group, serial) = (&d[..3], &d[3..5], &d[5..]);
    area != b"000"
        && area != b"666"
        && area[0] != b'9'
        && group != b"00"
        && serial != b"0000"
        && d != b"078051120"
        && d != b"219099999"
}

pub fn ipv4_valid(v: &[u8]) -> bool {
    let parts: Vec<&[u8]> = v.split(|&b| b == b'.').collect();
    if parts.len() != 4 {
        return false;
    }
    parts.iter().all(|p| {
        !p.is_empty()
            && p.len() <= 3
            && p.iter().all(u8::is_ascii_digit)
            && !(p.len() > 1 && p[0] == b'0')
            && p.iter().fold(0u32, |n, &b| n * 10 + u32::from(b - b'0')) <= 255
    })
}

fn count_sub(v: &[u8], sub: &[u8]) -> usize {
    // non-overlapping, as str.count
    let mut n = 0;
    let mut i = 0;
    while i + sub.len() <= v.len() {
        if &v[i..i + sub.len()] == sub {
            n += 1;
            i += sub.len();
        } else {
            i += 1;
        }
    }
    n
}

fn find_sub(v: &[u8], sub: &[u8]) -> Option<usize> {
    v.windows(sub.len()).position(|w| w == sub)
}

/// RFC 4291 text forms, IPv4-embedded included (`ipv6_valid`).
pub fn ipv6_valid(value: &[u8]) -> bool {
    if count_sub(value, b"::") > 1 || find_sub(value, b":::").is_some() {
        return false;
    }
    let mut groups_needed = 8;
    let mut value: Vec<u8> = value.to_vec();
    if value.contains(&b'.') {
        let Some(colon) = value.iter().rposition(|&b| b == b':') else {
            return false;
        };
        if !ipv4_valid(&value[colon + 1..]) {
            return false;
        }
        let head = &value[..colon];
        value = if head.ends_with(b":") {
            let mut h = head.to_vec();
            h.push(b':');
            h
        } else {
            head.to_vec()
        };
        groups_needed = 6;
    }
    let parts: Vec<&[u8]> = if let Some(i) = find_sub(&value, b"::") {
        let (left, right) = (&value[..i], &value[i + 2..]);
        let mut parts: Vec<&[u8]> = Vec::new();
        if !left.is_empty() {
            parts.extend(left.split(|&b| b == b':'));
        }
        if !right.is_empty() {
            parts.extend(right.split(|&b| b == b':'));
        }
        if parts.len() > groups_needed - 1 {
            return false;
        }
        parts
    } else {
        let parts: Vec<&[u8]> = value.split(|&b| b == b':').collect();
        if parts.len() != groups_needed {
            return false;
        }
        parts
    };
    parts
        .iter()
        .all(|p| !p.is_empty() && p.len() <= 4 && p.iter().all(u8::is_ascii_hexdigit))
}

/// `_LAST_GROUP.search(v)` (`[\x20.-]\(?[0-9]+\)?$`): where the last digit group starts (at
/// its separator). The group holds no separator, so only the last separator can start it.
pub fn last_group(v: &[u8]) -> Option<usize> {
    let sep = v.iter().rposition(|&b| matches!(b, b' ' | b'.' | b'-'))?;
    let mut rest = &v[sep + 1..];
    if let Some(r) = rest.strip_prefix(b"(") {
        rest = r;
    }
    if let Some(r) = rest.strip_suffix(b")") {
        rest = r;
    }
    (!rest.is_empty() && rest.iter().all(u8::is_ascii_digit)).then_some(sep)
}

/// `_fit_phone`: drop trailing digit groups until the digit count is at most `hi`; the
/// length of the fitted prefix when it has at least `lo` digits.
pub fn fit_phone(v: &[u8], lo: usize, hi: usize) -> Option<usize> {
    let mut n = v.len();
    let closes = v.iter().filter(|&&b| b == b')').count();
    let opens = v.iter().filter(|&&b| b == b'(').count();
    if v.ends_with(b")") && closes > opens {
        n -= 1; // "(..., +1 415 555 0188)": the parenthesis closes the sentence's
    }
    loop {
        let d = digit_count(&v[..n]);
        if d <= hi {
            return (d >= lo).then_some(n);
        }
        n = last_group(&v[..n])?;
    }
}

/// `_trunk_phone`: national number with trunk 0: 10-12 digits; contiguous only up to 11;
/// never a date.
pub fn trunk_phone(v: &[u8]) -> bool {
    let n = digit_count(v);
    if !v.is_empty() && v.iter().all(u8::is_ascii_digit) {
        return (10..=11).contains(&n);
    }
    let date_like = v.len() >= 8
        && [0, 1, 3, 4, 6, 7].iter().all(|&i| v[i].is_ascii_digit())
        && [2, 5].iter().all(|&i| matches!(v[i], b'.' | b'/' | b'-'));
    (10..=12).contains(&n) && !date_like
}

/// `iban_valid` for an upper-case alphanumeric IBAN of the country's `length`.
pub fn iban_valid(compact: &[u8], length: usize) -> bool {
    if compact.len() != length || length < 4 {
        return false;
    }
    let mut rem: u32 = 0;
    for &b in compact[4..].iter().chain(&compact[..4]) {
        match b {
            b'0'..=b'9' => rem = (rem * 10 + u32::from(b - b'0')) % 97,
            b'A'..=b'Z' => rem = (rem * 100 + u32::from(b - b'A' + 10)) % 97,
            _ => return false,
        }
    }
    rem == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn() {
        assert!(luhn_valid(b"4111111111111111"));
        assert!(!luhn_valid(b"4111111111111112"));
    }

    #[test]
    fn cards_with_trailing_group() {
        assert_eq!(card_value(b"4111 1111 1111 1111"), Some(19));
        assert_eq!(card_value(b"4111-1111-1111-1111-123"), Some(19));
        assert_eq!(card_value(b"4111 1111 1111 1112"), None);
    }

    #[test]
    fn ssn_rules() {
        assert!(ssn_valid(b"123456789"));
        for bad in [
            &b"000456789"[..],
            b"666456789",
            b"923456789",
            b"123006789",
            b"123450000",
            b"078051120",
        ] {
            assert!(!ssn_valid(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn ipv4() {
        assert!(ipv4_valid(b"203.0.113.77"));
        assert!(!ipv4_valid(b"256.1.1.1"));
        assert!(!ipv4_valid(b"01.1.1.1"));
        assert!(!ipv4_valid(b"1.1.1"));
        assert!(!ipv4_valid(b"1..1.1"));
    }

    #[test]
    fn ipv6() {
        assert!(ipv6_valid(b"2001:db8:85a3::8a2e:370:7334"));
        assert!(ipv6_valid(b"2001:0db8:0000:0000:0000:ff00:0042:8329"));
        assert!(ipv6_valid(b"::ffff:192.0.2.1"));
        assert!(ipv6_valid(b"::1.2.3.4"));
        assert!(!ipv6_valid(b"2001:db8::85a3::1"));
        assert!(!ipv6_valid(b"2001:db8:::1"));
        assert!(!ipv6_valid(b"12345::1"));
        assert!(!ipv6_valid(b"1:2:3:4:5:6:7"));
    }

    #[test]
    fn phones_are_fitted() {
        // expected values: detectors._fit_phone / _trunk_phone on the same input
        assert_eq!(fit_phone(b"+4915112345678 01 23", 8, 15), Some(17));
        assert_eq!(fit_phone(b"+4915112345678 01 23 45", 8, 15), Some(17));
        assert_eq!(fit_phone(b"+1 415 555 0188)", 8, 15), Some(15));
        assert_eq!(fit_phone(b"+12", 8, 15), None);
        assert_eq!(last_group(b"+1 (415) 555-0132"), Some(12));
        assert_eq!(last_group(b"+49 30 (415)"), Some(6));
        assert_eq!(last_group(b"+49 30 1234567x"), None);
        assert!(trunk_phone(b"020 7946 0958"));
        assert!(!trunk_phone(b"01.02.2024 123"));
        assert!(trunk_phone(b"07700900123"));
        assert!(!trunk_phone(b"077009001234"));
    }

    #[test]
    fn iban_mod97() {
        assert!(iban_valid(b"DE89370400440532013000", 22));
        assert!(!iban_valid(b"DE88370400440532013000", 22));
        assert!(!iban_valid(b"DE8937040044053201300", 22));
    }
}
