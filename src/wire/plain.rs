//! Finding plain CSV lines fast: eight bytes at a time, where the commas are, and whether
//! there is anything that would make the csv crate read the line as other than its bytes split
//! at those commas (a quote, a control character, a line break, DEL).
//!
//! A row is some fifty bytes. Looking at them one by one costs several instructions each; this
//! looks at eight at once with the byte-wise comparisons of "bit twiddling hacks": on bytes
//! below 0x80, adding 0x7F or 0x60 to each never carries into the next byte, so the top bit of
//! each byte answers for that byte alone. Bytes from 0x80 up (parts of multi-byte characters)
//! are set aside first, and reported, for the caller to check as UTF-8.

use std::ops::Range;

/// Where the `N` commas of `line` are, if it has exactly `N` and no quote, no ASCII control
/// character and no DEL; and the span of its bytes that are not ASCII (not yet checked to be
/// UTF-8). Such a line is, to the csv crate, its `N + 1` fields split at the commas, unquoted.
pub(crate) fn plain_commas<const N: usize>(line: &[u8]) -> Option<([usize; N], Option<Range<usize>>)> {
    classify(line)
}

const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
const TOP: u64 = ONES * 0x80;
const LOW: u64 = ONES * 0x7f;
/// Plain bytes, to fill a word past the end of a line.
const PAD: u64 = ONES * b'a' as u64;

/// The top bit of each byte of `x` (all below 0x80) that equals `b`.
#[inline(always)]
fn equal(x: u64, b: u8) -> u64 {
    let y = x ^ (ONES * u64::from(b));
    !((y + LOW) | y) & TOP
}

/// [`plain_commas`].
#[inline(always)]
fn classify<const N: usize>(line: &[u8]) -> Option<([usize; N], Option<Range<usize>>)> {
    let (mut commas, mut found, mut high) = ([0; N], 0, (usize::MAX, 0));
    // One word at `at`; false if the line is not plain.
    let mut word = |at: usize, word: u64| -> bool {
        let (top, x) = (word & TOP, word & LOW);
        let control = !(x + ONES * 0x60) & TOP;
        if (control | equal(x, 0x7f) | equal(x, b'"')) & !top != 0 {
            return false;
        }
        if top != 0 {
            high.0 = high.0.min(at + top.trailing_zeros() as usize / 8);
            high.1 = at + (63 - top.leading_zeros() as usize) / 8 + 1;
        }
        let mut comma = equal(x, b',') & !top;
        while comma != 0 {
            if found == N {
                return false;
            }
            commas[found] = at + comma.trailing_zeros() as usize / 8;
            found += 1;
            comma &= comma - 1;
        }
        true
    };
    let mut words = line.chunks_exact(8);
    for (i, chunk) in words.by_ref().enumerate() {
        if !word(i * 8, u64::from_le_bytes(chunk.try_into().unwrap_or_default())) {
            return None;
        }
    }
    // The last bytes, padded with letters: the line's last eight bytes shifted down past those
    // already seen (copying the tail into a padded buffer costs a call to memcpy per line), or
    // in a line shorter than eight bytes, gathered one by one.
    let tail = words.remainder();
    if !tail.is_empty() {
        let last = match line.len().checked_sub(8) {
            Some(from) => {
                let seen = 8 * (8 - tail.len() as u32);
                let bytes = u64::from_le_bytes(line[from..].try_into().unwrap_or_default());
                (bytes >> seen) | (PAD << (64 - seen))
            }
            None => tail.iter().rev().fold(PAD, |word, &b| (word << 8) | u64::from(b)),
        };
        if !word(line.len() - tail.len(), last) {
            return None;
        }
    }
    if found < N {
        return None;
    }
    Some((commas, (high.0 < high.1).then_some(high.0..high.1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: byte by byte.
    fn slow<const N: usize>(line: &[u8]) -> Option<([usize; N], Option<Range<usize>>)> {
        if line.iter().any(|&b| b < 0x20 || b == 0x7f || b == b'"') {
            return None;
        }
        let commas: Vec<usize> = (0..line.len()).filter(|&i| line[i] == b',').collect();
        let commas = <[usize; N]>::try_from(commas).ok()?;
        let first = line.iter().position(|&b| b >= 0x80);
        let last = line.iter().rposition(|&b| b >= 0x80);
        Some((commas, first.zip(last).map(|(f, l)| f..l + 1)))
    }

    proptest::proptest! {
        #[test]
        fn eight_at_a_time_is_one_at_a_time(
            line in proptest::collection::vec(proptest::sample::select(b"ab,,,\n\"\r\t\x7f\x80\xc3\xa1\xff ".to_vec()), 0..40),
        ) {
            proptest::prop_assert_eq!(plain_commas::<3>(&line), slow::<3>(&line));
        }
    }
}
