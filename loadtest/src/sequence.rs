//! Loss and duplicate bookkeeping of a numbered stream: a room's offsets, or one sender's
//! sequence numbers, each expected once and in increasing order.

/// Counts number `next` of a stream whose last number seen is `last`. Not past `last`, it is a
/// duplicate (counted in `duplicates`; returns false); otherwise the numbers skipped are added to
/// `gaps`, `last` becomes `next`, and it returns true.
pub fn advance(last: &mut u64, next: u64, duplicates: &mut u64, gaps: &mut u64) -> bool {
    if next <= *last {
        *duplicates += 1;
        return false;
    }
    *gaps += next - *last - 1;
    *last = next;
    true
}

#[cfg(test)]
mod tests {
    use super::advance;

    #[test]
    fn counts_duplicates_and_gaps() {
        let (mut last, mut duplicates, mut gaps) = (0, 0, 0);
        let seen: Vec<bool> = [1, 2, 2, 5, 3, 6]
            .into_iter()
            .map(|next| advance(&mut last, next, &mut duplicates, &mut gaps))
            .collect();
        assert_eq!(seen, [true, true, false, true, false, true]);
        assert_eq!((last, duplicates, gaps), (6, 2, 2));
    }
}
