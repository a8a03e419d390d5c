//! Statistics of several runs per side (`hvprof diff A1 A2 A3 --vs B1 B2
//! B3`): the median and spread of each side, and a one-sided Mann–Whitney
//! U test of "B's values tend to be larger than A's" (or smaller), exact
//! for the few runs a CI job has.
//!
//! A boot is one sample of a noisy process: a gate on the medians alone
//! would still flap. A regression gate on runs fails only where the change
//! is also significant at [`SIGNIFICANCE`]. With three runs a side the
//! smallest p-value there is is 1/20 = 0.05: only every B run above every
//! A run is significant; five a side (p down to 1/252) tell more.

/// The level a change must be significant at (one-sided p-value).
pub const SIGNIFICANCE: f64 = 0.05;

/// Pooled values up to which the test enumerates every split (C(20, 10)
/// = 184 756 at most); above, the normal approximation.
const EXACT_UP_TO: usize = 20;

/// The median: the middle value, or the mean of the middle two (rounded
/// down); 0 for none.
#[must_use]
pub fn median(values: &[u64]) -> u64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    let n = v.len();
    match n {
        0 => 0,
        _ if n % 2 == 1 => v[n / 2],
        _ => u64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

/// Twice the Mann–Whitney U of `b` against `a`: per pair, 2 where b's value
/// is larger, 1 where they tie.
fn twice_u(a: &[u64], b: &[u64]) -> u64 {
    let mut u = 0;
    for &y in b {
        for &x in a {
            u += match y.cmp(&x) {
                std::cmp::Ordering::Greater => 2,
                std::cmp::Ordering::Equal => 1,
                std::cmp::Ordering::Less => 0,
            };
        }
    }
    u
}

/// The one-sided p-value of "`b` tends to be larger than `a`": the
/// probability, were both from one distribution, of a U at least the one
/// observed. 1 when either side is empty.
#[must_use]
pub fn p_greater(a: &[u64], b: &[u64]) -> f64 {
    if a.is_empty() || b.is_empty() {
        return 1.0;
    }
    let observed = twice_u(a, b);
    let pooled: Vec<u64> = a.iter().chain(b).copied().collect();
    if pooled.len() <= EXACT_UP_TO {
        exact(&pooled, b.len(), observed)
    } else {
        normal(a, b, observed)
    }
}

/// The one-sided p-value of "`b` tends to be smaller than `a`".
#[must_use]
pub fn p_less(a: &[u64], b: &[u64]) -> f64 {
    p_greater(b, a)
}

/// Every split of `pooled` (at most [`EXACT_UP_TO`] values) into
/// `b_count` values for B and the rest for A: the share whose U is at
/// least `observed`.
fn exact(pooled: &[u64], b_count: usize, observed: u64) -> f64 {
    let (mut at_least, mut splits) = (0u64, 0u64);
    let (mut side_a, mut side_b) = (Vec::new(), Vec::new());
    for mask in 0u32..(1 << pooled.len()) {
        if mask.count_ones() as usize != b_count {
            continue;
        }
        side_a.clear();
        side_b.clear();
        for (i, &v) in pooled.iter().enumerate() {
            if mask & (1 << i) != 0 {
                side_b.push(v);
            } else {
                side_a.push(v);
            }
        }
        splits += 1;
        if twice_u(&side_a, &side_b) >= observed {
            at_least += 1;
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "a probability")]
    let p = at_least as f64 / splits as f64;
    p
}

/// The normal approximation of U's distribution, with the correction for
/// ties and for continuity.
fn normal(side_a: &[u64], side_b: &[u64], observed: u64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "statistics")]
    let (n_a, n_b) = (side_a.len() as f64, side_b.len() as f64);
    let total = n_a + n_b;
    let mut pooled: Vec<u64> = side_a.iter().chain(side_b).copied().collect();
    pooled.sort_unstable();
    let mut ties = 0.0;
    for equal in pooled.chunk_by(|x, y| x == y) {
        #[expect(clippy::cast_precision_loss, reason = "statistics")]
        let len = equal.len() as f64;
        ties += len * len * len - len;
    }
    let mean = n_a * n_b / 2.0;
    let var = n_a * n_b / 12.0 * ((total + 1.0) - ties / (total * (total - 1.0)));
    if var <= 0.0 {
        return 1.0;
    }
    #[expect(clippy::cast_precision_loss, reason = "statistics")]
    let u = observed as f64 / 2.0;
    upper_tail((u - mean - 0.5) / var.sqrt())
}

/// P(Z ≥ z) of the standard normal distribution (Abramowitz and Stegun
/// 26.2.17, error below 7.5e-8).
fn upper_tail(z: f64) -> f64 {
    if z < 0.0 {
        return 1.0 - upper_tail(-z);
    }
    let t = 1.0 / (1.0 + 0.231_641_9 * z);
    let poly = t
        * (0.319_381_530
            + t * (-0.356_563_782
                + t * (1.781_477_937 + t * (-1.821_255_978 + t * 1.330_274_429))));
    (-z * z / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt() * poly
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0);
        assert_eq!(median(&[5]), 5);
        assert_eq!(median(&[9, 1, 5]), 5);
        assert_eq!(median(&[1, 2, 3, 10]), 2);
        assert_eq!(median(&[3, 4]), 3);
        assert_eq!(median(&[u64::MAX, u64::MAX]), u64::MAX);
    }

    #[test]
    fn exact_p_values() {
        // Every B above every A: 1 split in C(6, 3) = 20.
        assert!(close(p_greater(&[1, 2, 3], &[4, 5, 6]), 0.05));
        assert!(close(p_less(&[4, 5, 6], &[1, 2, 3]), 0.05));
        // The other way round: every split has a U at least that.
        assert!(close(p_greater(&[4, 5, 6], &[1, 2, 3]), 1.0));
        // A tie at the boundary: two splits reach U = 8.5.
        assert!(close(p_greater(&[1, 2, 3], &[3, 4, 5]), 0.1));
        // All equal: no evidence.
        assert!(close(p_greater(&[7, 7, 7], &[7, 7, 7]), 1.0));
        // Five a side, all above: 1 in C(10, 5) = 252.
        assert!(close(
            p_greater(&[1, 2, 3, 4, 5], &[6, 7, 8, 9, 10]),
            1.0 / 252.0
        ));
        assert!(close(p_greater(&[], &[1]), 1.0));
    }

    #[test]
    fn the_normal_approximation_agrees_where_it_takes_over() {
        let a: Vec<u64> = (0..11).collect();
        let b: Vec<u64> = (5..16).collect();
        let approx = p_greater(&a, &b);
        let pooled: Vec<u64> = a.iter().chain(&b).copied().collect();
        let exact = exact(&pooled, b.len(), twice_u(&a, &b));
        assert!((approx - exact).abs() < 0.01, "{approx} vs {exact}");
        assert!(upper_tail(0.0) > 0.4999 && upper_tail(0.0) < 0.5001);
        assert!((upper_tail(1.644_853_6) - 0.05).abs() < 1e-6);
    }
}
