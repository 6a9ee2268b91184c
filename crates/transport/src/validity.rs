//! A certificate's validity period, read straight from its DER encoding.
//!
//! Identities are pinned by public key, but a certificate still carries dates, and a peer showing
//! one that has expired (or is not valid yet) is refused: an operator who lets an identity lapse
//! expects it to stop working. Only the few fields in front of `validity` are walked, so this is a
//! short DER reader rather than an X.509 library.

use std::fmt;

/// A point in time as seconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Seconds(pub(crate) i64);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.0.div_euclid(86_400);
        let secs = self.0.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )
    }
}

/// `notBefore` and `notAfter` of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Validity {
    pub(crate) not_before: Seconds,
    pub(crate) not_after: Seconds,
}

/// Where `now` stands against a validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    Valid,
    NotYetValid(Seconds),
    Expired(Seconds),
}

impl Validity {
    /// Reads the validity of a DER certificate; `None` if the bytes are not a certificate.
    pub(crate) fn of_certificate(der: &[u8]) -> Option<Validity> {
        let mut r = Reader(der);
        let mut cert = r.element(SEQUENCE)?;
        let mut tbs = cert.element(SEQUENCE)?;
        if tbs.peek() == Some(VERSION) {
            tbs.element(VERSION)?;
        }
        tbs.element(INTEGER)?; // serialNumber
        tbs.element(SEQUENCE)?; // signature
        tbs.element(SEQUENCE)?; // issuer
        let mut validity = tbs.element(SEQUENCE)?;
        let not_before = validity.time()?;
        let not_after = validity.time()?;
        Some(Validity {
            not_before,
            not_after,
        })
    }

    /// Whether `now` lies within the period.
    pub(crate) fn standing(&self, now: Seconds) -> Standing {
        if now < self.not_before {
            Standing::NotYetValid(self.not_before)
        } else if now > self.not_after {
            Standing::Expired(self.not_after)
        } else {
            Standing::Valid
        }
    }
}

const INTEGER: u8 = 0x02;
const SEQUENCE: u8 = 0x30;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.0.first().copied()
    }

    /// The next element's tag and contents, advancing past it.
    fn any(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.0.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            first as usize
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| acc << 8 | b as usize);
            rest = &rest[n..];
            len
        };
        if rest.len() < len {
            return None;
        }
        let (contents, rest) = rest.split_at(len);
        self.0 = rest;
        Some((tag, contents))
    }

    fn element(&mut self, tag: u8) -> Option<Reader<'a>> {
        match self.any()? {
            (t, contents) if t == tag => Some(Reader(contents)),
            _ => None,
        }
    }

    fn time(&mut self) -> Option<Seconds> {
        let (tag, text) = self.any()?;
        let text = std::str::from_utf8(text).ok()?;
        let (year, rest) = match tag {
            // RFC 5280: two-digit years 50-99 are 19xx, 00-49 are 20xx.
            UTC_TIME if text.len() == 13 => {
                let yy: i64 = digits(&text[..2])?;
                (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
            }
            GENERALIZED_TIME if text.len() == 15 => (digits(&text[..4])?, &text[4..]),
            _ => return None,
        };
        if !rest.ends_with('Z') {
            return None;
        }
        let month = digits(&rest[0..2])?;
        let day = digits(&rest[2..4])?;
        let hour: i64 = digits(&rest[4..6])?;
        let minute: i64 = digits(&rest[6..8])?;
        let second: i64 = digits(&rest[8..10])?;
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
            return None;
        }
        let days = days_from_civil(year, month, day);
        Some(Seconds(
            days * 86_400 + hour * 3600 + minute * 60 + second.min(60),
        ))
    }
}

fn digits(s: &str) -> Option<i64> {
    if s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["syncd".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn dates_are_read_in_both_time_encodings() {
        // rcgen writes UTCTime before 2050 and GeneralizedTime from 2050 on.
        let v = Validity::of_certificate(&cert((2001, 2, 3), (2099, 12, 31))).unwrap();
        assert_eq!(v.not_before, Seconds(days_from_civil(2001, 2, 3) * 86_400));
        assert_eq!(v.not_before.to_string(), "2001-02-03 00:00:00 UTC");
        assert_eq!(v.not_after.to_string(), "2099-12-31 00:00:00 UTC");
        assert_eq!(Seconds(0).to_string(), "1970-01-01 00:00:00 UTC");
    }

    #[test]
    fn standing_against_now() {
        let v = Validity::of_certificate(&cert((2001, 1, 1), (2002, 1, 1))).unwrap();
        let in_2001 = Seconds(days_from_civil(2001, 6, 1) * 86_400);
        let in_2003 = Seconds(days_from_civil(2003, 1, 1) * 86_400);
        let in_2000 = Seconds(days_from_civil(2000, 1, 1) * 86_400);
        assert_eq!(v.standing(in_2001), Standing::Valid);
        assert_eq!(v.standing(in_2003), Standing::Expired(v.not_after));
        assert_eq!(v.standing(in_2000), Standing::NotYetValid(v.not_before));
    }

    #[test]
    fn the_calendar_round_trips() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn truncated_or_foreign_bytes_are_not_a_certificate() {
        let der = cert((2001, 1, 1), (2002, 1, 1));
        for len in 0..der.len() {
            // The outer length no longer fits: not a certificate.
            assert!(
                Validity::of_certificate(&der[..len]).is_none(),
                "cut at {len}"
            );
        }
        assert!(Validity::of_certificate(b"not a certificate").is_none());
        assert!(Validity::of_certificate(&[]).is_none());
    }
}
