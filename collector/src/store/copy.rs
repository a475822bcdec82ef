//! Encoder for PostgreSQL's binary `COPY` format, for the sample rows
//! `(series_id int8, ts timestamptz, value float8)`.

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Builds one binary COPY stream of sample rows.
#[derive(Debug)]
pub struct SampleCopy {
    buf: Vec<u8>,
    rows: u64,
}

impl SampleCopy {
    pub fn with_capacity(rows: usize) -> Self {
        let mut buf = Vec::with_capacity(19 + rows * 38 + 2);
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        SampleCopy { buf, rows: 0 }
    }

    /// Appends a row; `ts_ms` is milliseconds since the Unix epoch.
    pub fn push(&mut self, series_id: i64, ts_ms: i64, value: f64) {
        let ts_us = ts_ms
            .saturating_mul(1000)
            .saturating_sub(PG_EPOCH_OFFSET_US);
        self.buf.extend_from_slice(&3i16.to_be_bytes());
        self.buf.extend_from_slice(&8i32.to_be_bytes());
        self.buf.extend_from_slice(&series_id.to_be_bytes());
        self.buf.extend_from_slice(&8i32.to_be_bytes());
        self.buf.extend_from_slice(&ts_us.to_be_bytes());
        self.buf.extend_from_slice(&8i32.to_be_bytes());
        self.buf.extend_from_slice(&value.to_bits().to_be_bytes());
        self.rows += 1;
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The complete stream, trailer included.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_binary_copy_format() {
        let mut copy = SampleCopy::with_capacity(1);
        copy.push(7, 946_684_800_001, 1.5);
        assert_eq!(copy.rows(), 1);
        let bytes = copy.finish();
        assert_eq!(&bytes[..11], SIGNATURE);
        assert_eq!(bytes.len(), 19 + 2 + 3 * (4 + 8) + 2);
        // The timestamp is 1 ms after PostgreSQL's epoch: 1000 µs.
        assert_eq!(
            &bytes[19 + 2 + 12 + 4..19 + 2 + 12 + 12],
            &1000i64.to_be_bytes()
        );
        assert_eq!(&bytes[bytes.len() - 2..], &[0xff, 0xff]);
    }
}
