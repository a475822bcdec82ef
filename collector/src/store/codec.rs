//! Compact encoding of settled samples and their 1-minute rollups, one `bytea` per
//! series and 10-minute window.
//!
//! Timestamps are millisecond offsets from the window start, stored as delta-of-delta.
//! Values are stored, per window, in the smallest of: decimal-scaled integers
//! (`value × 10^k` is an exact integer for every value: GPU utilisation, temperatures,
//! milliwatts, bytes) as deltas or deltas of deltas; or, when no scale is exact, the
//! XOR of successive IEEE bit patterns with their zero bytes stripped. Every stream
//! run-length encodes zeros, so a constant series costs a few bytes per window.
//! Decoding returns exactly the `f64` bits that were encoded.

/// Format version written as the first byte.
const VERSION: u8 = 1;
/// Value mode: XOR of successive bit patterns.
const MODE_XOR: u8 = 0x7f;
/// Value mode flag: decimal integers stored as deltas of deltas (else deltas).
const MODE_DOD: u8 = 0x80;
/// Largest decimal scale tried (10^6).
const MAX_SCALE: u8 = 6;
/// XOR stream control byte introducing a run of unchanged values.
const XOR_RUN: u8 = 0xff;
/// Integers beyond ±2^53 are not all representable as f64: not decimal-scaled.
const MAX_EXACT: f64 = 9_007_199_254_740_992.0;

/// A stored blob that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt encoded samples: {0}")]
pub struct CodecError(&'static str);

/// Encodes points sorted by time, offsets in ms from the window start.
pub fn encode_points(points: &[(i64, f64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + points.len() * 2);
    out.push(VERSION);
    put_varint(&mut out, points.len() as u64);
    let mut tokens = Vec::with_capacity(points.len());
    let (mut prev, mut prev_delta) = (0i64, 0i64);
    for (i, &(t, _)) in points.iter().enumerate() {
        let delta = t.wrapping_sub(prev);
        tokens.push(match i {
            0 => t,
            1 => delta,
            _ => delta.wrapping_sub(prev_delta),
        });
        if i > 0 {
            prev_delta = delta;
        }
        prev = t;
    }
    put_stream(&mut out, &tokens);
    let values: Vec<f64> = points.iter().map(|p| p.1).collect();
    encode_values(&values, &mut out);
    out
}

/// Decodes what [`encode_points`] wrote.
pub fn decode_points(data: &[u8]) -> Result<Vec<(i64, f64)>, CodecError> {
    let mut r = Reader { data, pos: 0 };
    if r.byte()? != VERSION {
        return Err(CodecError("unknown version"));
    }
    let n = bounded_len(&mut r)?;
    let tokens = get_stream(&mut r, n)?;
    let mut ts = Vec::with_capacity(n);
    let (mut prev, mut prev_delta) = (0i64, 0i64);
    for (i, &token) in tokens.iter().enumerate() {
        let t = match i {
            0 => token,
            1 => prev.wrapping_add(token),
            _ => prev.wrapping_add(prev_delta.wrapping_add(token)),
        };
        if i > 0 {
            prev_delta = t.wrapping_sub(prev);
        }
        prev = t;
        ts.push(t);
    }
    let values = decode_values(&mut r, n)?;
    r.expect_end()?;
    Ok(ts.into_iter().zip(values).collect())
}

/// One minute's rollup of a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MinuteRollup {
    /// Minute index within the window (0..10).
    pub minute: u8,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    pub last: f64,
    pub count: u32,
}

/// Computes the 1-minute rollups of points sorted by time (offsets in ms from the window start).
pub fn rollup(points: &[(i64, f64)]) -> Vec<MinuteRollup> {
    let mut out: Vec<MinuteRollup> = Vec::new();
    let mut sum = 0.0;
    for &(t, v) in points {
        let minute = (t.div_euclid(60_000)).clamp(0, 255) as u8;
        match out.last_mut() {
            Some(r) if r.minute == minute => {
                r.min = r.min.min(v);
                r.max = r.max.max(v);
                r.last = v;
                r.count += 1;
                sum += v;
                r.avg = sum / f64::from(r.count);
            }
            _ => {
                sum = v;
                out.push(MinuteRollup {
                    minute,
                    min: v,
                    max: v,
                    avg: v,
                    last: v,
                    count: 1,
                });
            }
        }
    }
    out
}

/// Encodes a window's rollups.
pub fn encode_rollups(rollups: &[MinuteRollup]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + rollups.len() * 12);
    out.push(VERSION);
    put_varint(&mut out, rollups.len() as u64);
    for r in rollups {
        out.push(r.minute);
        put_varint(&mut out, u64::from(r.count));
    }
    for field in [
        |r: &MinuteRollup| r.min,
        |r: &MinuteRollup| r.max,
        |r: &MinuteRollup| r.avg,
        |r: &MinuteRollup| r.last,
    ] {
        let values: Vec<f64> = rollups.iter().map(field).collect();
        encode_values(&values, &mut out);
    }
    out
}

/// Decodes what [`encode_rollups`] wrote.
pub fn decode_rollups(data: &[u8]) -> Result<Vec<MinuteRollup>, CodecError> {
    let mut r = Reader { data, pos: 0 };
    if r.byte()? != VERSION {
        return Err(CodecError("unknown version"));
    }
    let n = bounded_len(&mut r)?;
    let mut heads = Vec::with_capacity(n);
    for _ in 0..n {
        let minute = r.byte()?;
        let count = u32::try_from(r.varint()?).map_err(|_| CodecError("count"))?;
        heads.push((minute, count));
    }
    let min = decode_values(&mut r, n)?;
    let max = decode_values(&mut r, n)?;
    let avg = decode_values(&mut r, n)?;
    let last = decode_values(&mut r, n)?;
    r.expect_end()?;
    Ok((0..n)
        .map(|i| MinuteRollup {
            minute: heads[i].0,
            count: heads[i].1,
            min: min[i],
            max: max[i],
            avg: avg[i],
            last: last[i],
        })
        .collect())
}

fn encode_values(values: &[f64], out: &mut Vec<u8>) {
    if let Some((scale, ints)) = decimal_ints(values) {
        let delta = int_stream(&ints, false);
        let dod = int_stream(&ints, true);
        if dod.len() < delta.len() {
            out.push(MODE_DOD | scale);
            out.extend_from_slice(&dod);
        } else {
            out.push(scale);
            out.extend_from_slice(&delta);
        }
        return;
    }
    out.push(MODE_XOR);
    let mut prev = 0u64;
    let mut run = 0u64;
    for v in values {
        let bits = v.to_bits();
        let x = bits ^ prev;
        prev = bits;
        if x == 0 {
            run += 1;
            continue;
        }
        if run > 0 {
            out.push(XOR_RUN);
            put_varint(out, run);
            run = 0;
        }
        let lead = (x.leading_zeros() / 8) as u8;
        let trail = (x.trailing_zeros() / 8) as u8;
        out.push((lead << 4) | trail);
        let bytes = x.to_be_bytes();
        out.extend_from_slice(&bytes[usize::from(lead)..8 - usize::from(trail)]);
    }
    if run > 0 {
        out.push(XOR_RUN);
        put_varint(out, run);
    }
}

fn decode_values(r: &mut Reader<'_>, n: usize) -> Result<Vec<f64>, CodecError> {
    let mode = r.byte()?;
    let mut out = Vec::with_capacity(n);
    if mode == MODE_XOR {
        let mut prev = 0u64;
        while out.len() < n {
            let control = r.byte()?;
            if control == XOR_RUN {
                let run = r.varint()?;
                if run == 0 || run > (n - out.len()) as u64 {
                    return Err(CodecError("xor run"));
                }
                for _ in 0..run {
                    out.push(f64::from_bits(prev));
                }
                continue;
            }
            let (lead, trail) = (usize::from(control >> 4), usize::from(control & 0x0f));
            if lead + trail >= 8 {
                return Err(CodecError("xor control"));
            }
            let mut bytes = [0u8; 8];
            bytes[lead..8 - trail].copy_from_slice(r.take(8 - lead - trail)?);
            prev ^= u64::from_be_bytes(bytes);
            out.push(f64::from_bits(prev));
        }
        return Ok(out);
    }
    let scale = mode & !MODE_DOD;
    if scale > MAX_SCALE {
        return Err(CodecError("value mode"));
    }
    let divisor = 10f64.powi(i32::from(scale));
    let dod = mode & MODE_DOD != 0;
    let tokens = get_stream(r, n)?;
    let (mut prev, mut prev_delta) = (0i64, 0i64);
    for (i, &token) in tokens.iter().enumerate() {
        let v = match (i, dod) {
            (0, _) => token,
            (_, false) | (1, true) => prev.wrapping_add(token),
            (_, true) => prev.wrapping_add(prev_delta.wrapping_add(token)),
        };
        if i > 0 {
            prev_delta = v.wrapping_sub(prev);
        }
        prev = v;
        if v.unsigned_abs() >= MAX_EXACT as u64 {
            return Err(CodecError("value out of range"));
        }
        out.push(int_to_value(v, scale, divisor));
    }
    Ok(out)
}

fn int_to_value(v: i64, scale: u8, divisor: f64) -> f64 {
    if scale == 0 {
        v as f64
    } else {
        v as f64 / divisor
    }
}

/// The smallest decimal scale at which every value is an exact integer, and those integers.
fn decimal_ints(values: &[f64]) -> Option<(u8, Vec<i64>)> {
    'scale: for scale in 0..=MAX_SCALE {
        let divisor = 10f64.powi(i32::from(scale));
        let mut ints = Vec::with_capacity(values.len());
        for &v in values {
            let scaled = (v * divisor).round();
            if !scaled.is_finite() || scaled.abs() >= MAX_EXACT {
                return None;
            }
            let i = scaled as i64;
            if int_to_value(i, scale, divisor).to_bits() != v.to_bits() {
                continue 'scale;
            }
            ints.push(i);
        }
        return Some((scale, ints));
    }
    None
}

fn int_stream(ints: &[i64], dod: bool) -> Vec<u8> {
    let mut tokens = Vec::with_capacity(ints.len());
    let (mut prev, mut prev_delta) = (0i64, 0i64);
    for (i, &v) in ints.iter().enumerate() {
        let delta = v.wrapping_sub(prev);
        tokens.push(match (i, dod) {
            (0, _) => v,
            (_, false) | (1, true) => delta,
            (_, true) => delta.wrapping_sub(prev_delta),
        });
        if i > 0 {
            prev_delta = delta;
        }
        prev = v;
    }
    let mut out = Vec::with_capacity(ints.len() / 2 + 8);
    put_stream(&mut out, &tokens);
    out
}

/// Tokens per bit-packed block.
const BLOCK: usize = 16;
/// Leading tokens of a stream written as plain varints.
const HEAD: usize = 2;

/// Writes signed tokens in blocks of [`BLOCK`]: a byte with the block's bit width, then
/// every zigzagged token in that many bits. A width-0 byte is followed by the number of
/// consecutive all-zero blocks, so long constant stretches cost a couple of bytes.
fn put_stream(out: &mut Vec<u8>, tokens: &[i64]) {
    // The first two tokens (a start value and a first delta) are large and unlike the
    // rest: they go as plain varints so they do not widen the first block.
    let head = tokens.len().min(HEAD);
    for &t in &tokens[..head] {
        put_varint(out, zigzag(t));
    }
    let blocks: Vec<&[i64]> = tokens[head..].chunks(BLOCK).collect();
    let mut i = 0;
    while i < blocks.len() {
        let width = blocks[i]
            .iter()
            .map(|&t| 64 - zigzag(t).leading_zeros())
            .max()
            .unwrap_or(0);
        if width == 0 {
            let run = blocks[i..]
                .iter()
                .take_while(|b| b.iter().all(|&t| t == 0))
                .count();
            out.push(0);
            put_varint(out, run as u64);
            i += run;
            continue;
        }
        out.push(width as u8);
        let mut acc: u128 = 0;
        let mut bits = 0u32;
        for &t in blocks[i] {
            acc |= u128::from(zigzag(t)) << bits;
            bits += width;
            while bits >= 8 {
                out.push(acc as u8);
                acc >>= 8;
                bits -= 8;
            }
        }
        if bits > 0 {
            out.push(acc as u8);
        }
        i += 1;
    }
}

/// Reads `n` tokens written by [`put_stream`].
fn get_stream(r: &mut Reader<'_>, n: usize) -> Result<Vec<i64>, CodecError> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.min(HEAD) {
        out.push(unzigzag(r.varint()?));
    }
    while out.len() < n {
        let width = u32::from(r.byte()?);
        if width == 0 {
            let run = r.varint()?;
            let zeros = run
                .checked_mul(BLOCK as u64)
                .ok_or(CodecError("zero run"))?
                .min((n - out.len()) as u64);
            if run == 0 || (run - 1) * BLOCK as u64 >= (n - out.len()) as u64 {
                return Err(CodecError("zero run"));
            }
            out.extend(std::iter::repeat_n(0, zeros as usize));
            continue;
        }
        if width > 64 {
            return Err(CodecError("bit width"));
        }
        let count = BLOCK.min(n - out.len());
        let mask: u128 = (1u128 << width) - 1;
        let mut acc: u128 = 0;
        let mut bits = 0u32;
        for _ in 0..count {
            while bits < width {
                acc |= u128::from(r.byte()?) << bits;
                bits += 8;
            }
            out.push(unzigzag((acc & mask) as u64));
            acc >>= width;
            bits -= width;
        }
    }
    Ok(out)
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, CodecError> {
        let b = *self.data.get(self.pos).ok_or(CodecError("truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).ok_or(CodecError("truncated"))?;
        let slice = self
            .data
            .get(self.pos..end)
            .ok_or(CodecError("truncated"))?;
        self.pos = end;
        Ok(slice)
    }

    fn varint(&mut self) -> Result<u64, CodecError> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            if shift == 63 && b > 1 {
                return Err(CodecError("varint overflow"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CodecError("varint overflow"))
    }

    fn expect_end(&self) -> Result<(), CodecError> {
        if self.pos == self.data.len() {
            Ok(())
        } else {
            Err(CodecError("trailing bytes"))
        }
    }
}

/// A count read from the blob, bounded so a corrupt value cannot make us allocate wildly
/// (a window of 10 minutes holds at most 600,000 one-millisecond samples).
fn bounded_len(r: &mut Reader<'_>) -> Result<usize, CodecError> {
    let n = r.varint()?;
    if n > 600_000 {
        return Err(CodecError("count too large"));
    }
    Ok(n as usize)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(points: &[(i64, f64)]) -> usize {
        let data = encode_points(points);
        let back = decode_points(&data).expect("decodes");
        assert_eq!(back.len(), points.len());
        for (a, b) in points.iter().zip(&back) {
            assert_eq!(a.0, b.0);
            assert_eq!(a.1.to_bits(), b.1.to_bits(), "{} vs {}", a.1, b.1);
        }
        data.len()
    }

    /// Deterministic pseudo-random numbers (xorshift), so the test needs no extra crate.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn round_trips_exact_bits_for_every_kind_of_series() {
        let ts: Vec<i64> = (0..600).map(|i| i * 1000 + (i % 3)).collect();
        let mut seed = 42u64;
        let cases: Vec<Vec<f64>> = vec![
            vec![81_920_000_000.0; 600],
            (0..600).map(|i| f64::from(i % 100)).collect(),
            (0..600).map(|i| 250.0 + f64::from(i % 7) * 0.125).collect(),
            (0..600).map(|_| rng(&mut seed) as f64 / 1e9).collect(),
            (0..600).map(|i| f64::from(i) * 0.1).collect(),
            (0..600)
                .map(|i| match i % 5 {
                    0 => f64::NAN,
                    1 => -0.0,
                    2 => f64::INFINITY,
                    3 => 1e300,
                    _ => -1.5,
                })
                .collect(),
            (0..600).map(|i| (i as f64).sin()).collect(),
        ];
        for values in cases {
            let points: Vec<(i64, f64)> = ts.iter().copied().zip(values).collect();
            check(&points);
        }
        check(&[]);
        check(&[(599_999, 1.0)]);
        check(&[(0, 1.0), (0, 2.0), (5, 2.0)]);
    }

    #[test]
    fn regular_quantised_series_cost_about_a_byte_or_less() {
        let constant: Vec<(i64, f64)> = (0..600).map(|i| (i * 1000, 42.0)).collect();
        assert!(check(&constant) < 16, "{}", check(&constant));
        let mut seed = 7u64;
        let mut util = 50i64;
        let wandering: Vec<(i64, f64)> = (0..600)
            .map(|i| {
                util = (util + (rng(&mut seed) % 5) as i64 - 2).clamp(0, 100);
                (i * 1000 + (rng(&mut seed) % 3) as i64, util as f64)
            })
            .collect();
        assert!(check(&wandering) < 600, "{}", check(&wandering));
    }

    #[test]
    fn corrupt_input_is_an_error_never_a_panic() {
        let points: Vec<(i64, f64)> = (0..50).map(|i| (i * 1000, i as f64 * 1.7)).collect();
        let data = encode_points(&points);
        for cut in 0..data.len() {
            assert!(decode_points(&data[..cut]).is_err());
        }
        let mut seed = 99u64;
        for _ in 0..20_000 {
            let len = (rng(&mut seed) % 40) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng(&mut seed) as u8).collect();
            let _ = decode_points(&bytes);
            let _ = decode_rollups(&bytes);
        }
        let mut trailing = data.clone();
        trailing.push(0);
        assert!(decode_points(&trailing).is_err());
    }

    #[test]
    fn rollups_per_minute_and_round_trip() {
        let points: Vec<(i64, f64)> = (0..180)
            .map(|i| (i * 1000, f64::from(i as u32 % 61)))
            .collect();
        let rollups = rollup(&points);
        assert_eq!(rollups.len(), 3);
        assert_eq!(rollups[0].count, 60);
        assert_eq!(rollups[0].min, 0.0);
        assert_eq!(rollups[0].max, 59.0);
        assert_eq!(rollups[0].last, 59.0);
        assert_eq!(rollups[0].avg, 29.5);
        assert_eq!(rollups[1].min, 0.0);
        assert_eq!(rollups[1].max, 60.0);
        let back = decode_rollups(&encode_rollups(&rollups)).expect("decodes");
        assert_eq!(back, rollups);
    }
}
