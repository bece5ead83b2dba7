//! The log-linear latency buckets the eBPF programs count into (`bucket_of` in enlight.bpf.c).
//!
//! Values below 256 ns have a bucket each. Above, every power of two `[2^m, 2^(m+1))` is split
//! into 128 equal sub-buckets, so a bucket is never wider than 1/128 (0.8%) of its lower bound:
//! enough to fill an HDR histogram with 2 significant digits without losing precision. The last
//! bucket ([`MAX_BUCKET`]) starts at 2^34 ns (about 17 s) and also holds anything longer.

/// Sub-buckets per power of two.
pub const SUB_BUCKETS: u64 = 128;
/// Highest bucket index.
pub const MAX_BUCKET: u32 = crate::types::BUCKETS as u32 - 1;

/// Bucket of a latency in ns (exactly as the eBPF program computes it).
pub fn bucket_index(v: u64) -> u32 {
    if v < 2 * SUB_BUCKETS {
        return v as u32;
    }
    let msb = 63 - v.leading_zeros() as u64;
    let k = msb - 7;
    let idx = 2 * SUB_BUCKETS + (k - 1) * SUB_BUCKETS + ((v >> k) - SUB_BUCKETS);
    idx.min(MAX_BUCKET as u64) as u32
}

/// Smallest value in bucket `idx`.
pub fn bucket_low_ns(idx: u32) -> u64 {
    let idx = idx as u64;
    if idx < 2 * SUB_BUCKETS {
        return idx;
    }
    let j = idx - 2 * SUB_BUCKETS;
    let k = j / SUB_BUCKETS + 1;
    let sub = j % SUB_BUCKETS + SUB_BUCKETS;
    sub << k
}

/// Largest value in bucket `idx` (the last bucket is open-ended: `u64::MAX`, so it never counts
/// toward a finite histogram bound).
pub fn bucket_high_ns(idx: u32) -> u64 {
    if idx >= MAX_BUCKET {
        return u64::MAX;
    }
    bucket_low_ns(idx + 1) - 1
}

/// A representative value for bucket `idx`: its midpoint, so that recording a bucket's count at
/// this value in an HDR histogram errs by at most half a bucket (< 0.4%) either way.
pub fn bucket_mid_ns(idx: u32) -> u64 {
    let low = bucket_low_ns(idx);
    if idx >= MAX_BUCKET {
        return low;
    }
    low + (bucket_high_ns(idx) - low) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C formula, transcribed literally (branchy msb), to check the Rust one against.
    fn c_bucket_of(v: u64) -> u32 {
        if v < 256 {
            return v as u32;
        }
        let (mut msb, mut x) = (0u64, v);
        for shift in [32, 16, 8, 4, 2, 1] {
            if x >> shift != 0 {
                msb += shift;
                x >>= shift;
            }
        }
        let k = msb - 7;
        let idx = 256 + (k - 1) * 128 + ((v >> k) - 128);
        idx.min(MAX_BUCKET as u64) as u32
    }

    #[test]
    fn agrees_with_the_c_formula_at_every_boundary() {
        for m in 0..64u32 {
            for v in [
                1u64 << m,
                (1u64 << m).wrapping_sub(1),
                (1u64 << m) + 1,
                (1u64 << m) | ((1u64 << m) >> 1),
            ] {
                assert_eq!(bucket_index(v), c_bucket_of(v), "v = {v}");
            }
        }
        for v in 0..100_000u64 {
            assert_eq!(bucket_index(v), c_bucket_of(v));
        }
    }

    #[test]
    fn buckets_tile_the_line_and_are_narrow() {
        for idx in 0..MAX_BUCKET {
            let (lo, hi) = (bucket_low_ns(idx), bucket_high_ns(idx));
            assert!(lo <= hi);
            assert_eq!(bucket_index(lo), idx);
            assert_eq!(bucket_index(hi), idx);
            assert_eq!(bucket_low_ns(idx + 1), hi + 1);
            if lo >= 256 {
                assert!(
                    ((hi - lo + 1) as f64) / (lo as f64) <= 1.0 / 128.0 + 1e-12,
                    "bucket {idx}"
                );
            }
        }
        // 10 s is well inside the range.
        assert!(bucket_index(10_000_000_000) < MAX_BUCKET);
        assert_eq!(bucket_index(u64::MAX), MAX_BUCKET);
    }
}
