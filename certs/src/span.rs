//! Time spans as operators type them: `30d`, `12h`, `2w`, `90m`, `45s`.

use crate::CaError;
use std::time::Duration;

/// Parses a span: a whole number followed by one unit, `s`, `m`, `h`, `d` or `w`.
pub fn parse_span(input: &str) -> Result<Duration, CaError> {
    let invalid = |reason| CaError::InvalidSpan {
        input: input.into(),
        reason,
    };
    let text = input.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| invalid("missing unit (s, m, h, d or w), e.g. 30d"))?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(invalid("must start with a number, e.g. 30d"));
    }
    let count: u64 = digits.parse().map_err(|_| invalid("number too large"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(invalid("unknown unit; use s, m, h, d or w")),
    };
    count
        .checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| invalid("number too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        let check = |input: &str, secs: Option<u64>| {
            assert_eq!(
                parse_span(input).ok().map(|d| d.as_secs()),
                secs,
                "input {input:?}"
            )
        };
        check("30d", Some(30 * 86_400));
        check("12h", Some(43_200));
        check("2w", Some(14 * 86_400));
        check("90m", Some(5_400));
        check("45s", Some(45));
        check("0d", Some(0));
        check("30", None);
        check("d", None);
        check("30x", None);
        check("3.5d", None);
        check("-1d", None);
        check("", None);
        check("99999999999999999999d", None);
        check("9999999999999999d", None);
    }
}
