//! Statistics of several runs per side (`hvprof diff A1 A2 A3 --vs B1 B2
//! B3`): the median and spread of each side, and whether B is
//! significantly more than a bound above A.
//!
//! A boot is one sample of a noisy process: a gate on the medians alone
//! would flap. A gate over runs fails only where the change is also
//! significant: a one-sided Welch t-test on the logarithms of the runs'
//! values (run times and counts of a noisy process spread by ratios, not
//! by amounts), of "B's mean is more than the bound above A's" (for
//! `regression>10%`, `ln B − ln A > ln 1.1`), its p-values adjusted with
//! Holm's method over every value the gate looks at, so that a gate over
//! 14 metrics in 10 windows does not fail on identical workloads one time
//! in a few (a test per value at 5 % would). A rank test cannot do that
//! with the three runs a CI job has: its smallest p-value at 3 a side is
//! 1/20.

/// The family-wise level a change must be significant at.
pub const SIGNIFICANCE: f64 = 0.05;

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

/// The mean and the sample variance of `ln(v + 1)`.
fn log_moments(values: &[u64]) -> (f64, f64) {
    #[expect(clippy::cast_precision_loss, reason = "statistics")]
    let logs: Vec<f64> = values.iter().map(|&v| (v as f64 + 1.0).ln()).collect();
    #[expect(clippy::cast_precision_loss, reason = "statistics")]
    let n = logs.len() as f64;
    let mean = logs.iter().sum::<f64>() / n;
    let var = if logs.len() < 2 {
        0.0
    } else {
        logs.iter().map(|l| (l - mean) * (l - mean)).sum::<f64>() / (n - 1.0)
    };
    (mean, var)
}

/// The one-sided p-value of "B is more than `ratio` times A" (Welch's
/// t-test on the logarithms): small when every B run is well above every
/// A run raised by `ratio`, given how much each side's runs spread. A side
/// of one run takes the other side's spread; with no spread at all (exact
/// counts) it is 0 or 1. 1 when either side is empty.
#[must_use]
pub fn p_above(a: &[u64], b: &[u64], ratio: f64) -> f64 {
    if a.is_empty() || b.is_empty() {
        return 1.0;
    }
    let (mean_a, mut var_a) = log_moments(a);
    let (mean_b, mut var_b) = log_moments(b);
    if a.len() < 2 {
        var_a = var_b;
    }
    if b.len() < 2 {
        var_b = var_a;
    }
    #[expect(clippy::cast_precision_loss, reason = "statistics")]
    let (n_a, n_b) = (a.len() as f64, b.len() as f64);
    let d = mean_b - mean_a - ratio.max(f64::MIN_POSITIVE).ln();
    let (sa, sb) = (var_a / n_a, var_b / n_b);
    let se2 = sa + sb;
    if se2 <= 1e-18 {
        return if d > 0.0 { 0.0 } else { 1.0 };
    }
    // Welch–Satterthwaite degrees of freedom.
    let denominator = sa * sa / (n_a - 1.0).max(1.0) + sb * sb / (n_b - 1.0).max(1.0);
    let df = if denominator > 0.0 {
        se2 * se2 / denominator
    } else {
        n_a + n_b - 2.0
    };
    t_upper(d / se2.sqrt(), df.max(1.0))
}

/// Holm's step-down adjustment of p-values: each p-value times the number
/// of hypotheses not yet rejected before it, made monotone, at most 1. A
/// value is significant at family-wise level α where its adjusted one is
/// at most α.
#[must_use]
pub fn holm(p: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&i, &j| p[i].total_cmp(&p[j]));
    let mut out = vec![1.0; p.len()];
    let mut running: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "a count of hypotheses")]
        let left = (p.len() - rank) as f64;
        running = running.max((p[i] * left).min(1.0));
        out[i] = running;
    }
    out
}

/// P(T ≥ t) of Student's t distribution with `df` degrees of freedom.
fn t_upper(t: f64, df: f64) -> f64 {
    if t < 0.0 {
        return 1.0 - t_upper(-t, df);
    }
    0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
}

/// The regularized incomplete beta function `I_x(a, b)` (its continued
/// fraction, evaluated with the modified Lentz method).
fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    // The fraction converges fast for x below (a + 1) / (a + b + 2).
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_fraction(b, a, 1.0 - x) / b
    }
}

#[expect(
    clippy::many_single_char_names,
    reason = "the continued fraction's own notation"
)]
fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    d = 1.0 / if d.abs() < TINY { TINY } else { d };
    let mut h = d;
    for m in 1..300 {
        let m = f64::from(m);
        let m2 = 2.0 * m;
        for numerator in [
            m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0)),
        ] {
            d = 1.0 + numerator * d;
            d = 1.0 / if d.abs() < TINY { TINY } else { d };
            c = 1.0 + numerator / c;
            if c.abs() < TINY {
                c = TINY;
            }
            h *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms: 15 digits).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = G[0];
    for (i, g) in G.iter().enumerate().skip(1) {
        #[expect(clippy::cast_precision_loss, reason = "a small index")]
        let i = i as f64;
        sum += g / (x + i);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near(a: f64, b: f64, eps: f64) -> bool {
        (a - b).abs() < eps
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

    /// Student's t against the tables' critical values.
    #[test]
    fn t_tails() {
        assert!(near(ln_gamma(5.0), 24f64.ln(), 1e-12));
        assert!(near(ln_gamma(0.5), std::f64::consts::PI.sqrt().ln(), 1e-12));
        for (t, df, p) in [
            (2.919_986, 2.0, 0.05),
            (6.964_557, 2.0, 0.01),
            (2.131_847, 4.0, 0.05),
            (12.706_20, 1.0, 0.025),
            (1.959_964, 1e6, 0.025),
            (0.0, 3.0, 0.5),
        ] {
            let got = t_upper(t, df);
            assert!(near(got, p, 1e-5), "t {t}, df {df}: {got} for {p}");
        }
        assert!(near(t_upper(-2.919_986, 2.0), 0.95, 1e-5));
    }

    #[test]
    fn b_above_a_by_more_than_a_ratio() {
        // Well separated, spread a few percent: far more than 10 % above.
        assert!(p_above(&[100, 102, 98], &[130, 135, 140], 1.1) < 0.01);
        // The same spread, 8 % above: not more than 10 % above.
        assert!(p_above(&[100, 102, 98], &[107, 108, 109], 1.1) > 0.5);
        // Identical runs: no evidence.
        assert!(p_above(&[100, 110, 105], &[100, 110, 105], 1.0) >= 0.5);
        // Widely spread (lock contentions of identical boots): every B run
        // above every A run raised by 10 %, yet not significant.
        let p = p_above(&[470, 594, 884], &[982, 1257, 1489], 1.1);
        assert!(p > 0.01 && p < 0.1, "{p}");
        // Exact counts: any change past the bound is certain, any other none.
        assert!(near(p_above(&[64, 64, 64], &[80, 80, 80], 1.1), 0.0, 1e-12));
        assert!(near(p_above(&[64, 64, 64], &[68, 68, 68], 1.1), 1.0, 1e-12));
        // One run a side takes the other's spread.
        assert!(p_above(&[100], &[130, 135, 140], 1.1) < 0.05);
        assert!(near(p_above(&[], &[1], 1.0), 1.0, 1e-12));
    }

    #[test]
    fn holm_adjusts_for_every_value_looked_at() {
        let adjusted = holm(&[0.01, 0.04, 0.03]);
        assert!(near(adjusted[0], 0.03, 1e-12), "{adjusted:?}");
        assert!(near(adjusted[1], 0.06, 1e-12), "{adjusted:?}");
        assert!(near(adjusted[2], 0.06, 1e-12), "{adjusted:?}");
        assert_eq!(holm(&[0.9, 0.8]), [1.0, 1.0]);
        assert_eq!(holm(&[]), [] as [f64; 0]);
    }
}
