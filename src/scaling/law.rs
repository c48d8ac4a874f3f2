//! Scaling-law fits and the statistics around them.
//!
//! The law is L(C) = L∞ + (C₀/C)^α, fitted by variable projection: for each α of a log-spaced
//! grid (refined by golden section) the linear parameters L∞ ≥ 0 and A = C₀^α ≥ 0 are solved by
//! Gauss–Newton on log L with Huber weights (δ = 10⁻³, as Chinchilla's approach 3), starting
//! from the weighted least-squares solution. The pure power law L = (C₀/C)^α is a line in
//! log–log. Intervals come from a bootstrap over the fitted points.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Fewest points a law is fitted to (three parameters, and at least two to spare).
pub const MIN_POINTS: usize = 5;
/// Decades of compute a fit should span to be read as a law (a shorter span is flagged).
pub const MIN_DECADES: f64 = 2.0;
const HUBER_DELTA: f64 = 1e-3;

/// L(C) = L∞ + (C₀/C)^α.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Law {
    pub alpha: f64,
    pub l_inf: f64,
    pub c0: f64,
    /// R² of log L.
    pub r2: f64,
}

impl Law {
    pub fn predict(&self, c: f64) -> f64 {
        self.l_inf + (self.c0 / c).powf(self.alpha)
    }
}

/// The pure power law L(C) = (C₀/C)^α (a line in log–log).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Power {
    pub alpha: f64,
    pub c0: f64,
    pub r2: f64,
}

impl Power {
    pub fn predict(&self, c: f64) -> f64 {
        (self.c0 / c).powf(self.alpha)
    }
}

fn huber_weight(r: f64) -> f64 {
    if r.abs() <= HUBER_DELTA {
        1.0
    } else {
        HUBER_DELTA / r.abs()
    }
}

fn huber(r: f64) -> f64 {
    if r.abs() <= HUBER_DELTA {
        0.5 * r * r
    } else {
        HUBER_DELTA * (r.abs() - 0.5 * HUBER_DELTA)
    }
}

/// min Σ wᵢ (l∞ + a·tᵢ − yᵢ)² over l∞ ≥ 0, a ≥ 0.
fn nonneg_ls(t: &[f64], y: &[f64], w: &[f64]) -> (f64, f64) {
    let (mut sw, mut st, mut sy, mut stt, mut sty) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for i in 0..t.len() {
        sw += w[i];
        st += w[i] * t[i];
        sy += w[i] * y[i];
        stt += w[i] * t[i] * t[i];
        sty += w[i] * t[i] * y[i];
    }
    let det = sw * stt - st * st;
    let cost = |l: f64, a: f64| -> f64 {
        (0..t.len())
            .map(|i| w[i] * (l + a * t[i] - y[i]).powi(2))
            .sum()
    };
    let mut candidates = vec![(0.0, (sty / stt).max(0.0)), ((sy / sw).max(0.0), 0.0)];
    if det.abs() > 1e-300 {
        let a = (sw * sty - st * sy) / det;
        let l = (sy - a * st) / sw;
        if a >= 0.0 && l >= 0.0 {
            candidates.push((l, a));
        }
    }
    candidates
        .into_iter()
        .min_by(|p, q| cost(p.0, p.1).total_cmp(&cost(q.0, q.1)))
        .expect("candidates")
}

/// At a fixed α: L∞ and A' (of tᵢ = exp(−α (ln cᵢ − x̄))), and the Huber objective on log L.
fn project(alpha: f64, x: &[f64], l: &[f64]) -> (f64, f64, f64) {
    let t: Vec<f64> = x.iter().map(|x| (-alpha * x).exp()).collect();
    let mut w: Vec<f64> = l.iter().map(|l| 1.0 / (l * l)).collect();
    let (mut li, mut a) = nonneg_ls(&t, l, &w);
    for _ in 0..20 {
        // Gauss–Newton on rᵢ = ln(l∞ + a tᵢ) − ln lᵢ, Huber-weighted, projected on l∞, a ≥ 0.
        let p: Vec<f64> = t.iter().map(|t| (li + a * t).max(1e-300)).collect();
        let r: Vec<f64> = (0..t.len()).map(|i| p[i].ln() - l[i].ln()).collect();
        w = r.iter().map(|&r| huber_weight(r)).collect();
        let (mut h11, mut h12, mut h22, mut g1, mut g2) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for i in 0..t.len() {
            let (j1, j2) = (1.0 / p[i], t[i] / p[i]);
            h11 += w[i] * j1 * j1;
            h12 += w[i] * j1 * j2;
            h22 += w[i] * j2 * j2;
            g1 += w[i] * j1 * r[i];
            g2 += w[i] * j2 * r[i];
        }
        let det = h11 * h22 - h12 * h12;
        if det.abs() < 1e-300 {
            break;
        }
        let (d1, d2) = ((h22 * g1 - h12 * g2) / det, (h11 * g2 - h12 * g1) / det);
        let (mut nl, mut na) = (li - d1, a - d2);
        // A bound that binds: hold that variable at 0 and take the other's one-dimensional step.
        if nl < 0.0 {
            (nl, na) = (0.0, (a - g2 / h22).max(0.0));
        } else if na < 0.0 {
            (nl, na) = ((li - g1 / h11).max(0.0), 0.0);
        }
        let done = (nl - li).abs() <= 1e-12 * li.abs().max(1e-12)
            && (na - a).abs() <= 1e-12 * a.abs().max(1e-12);
        (li, a) = (nl, na);
        if done {
            break;
        }
    }
    let objective = (0..t.len())
        .map(|i| huber((li + a * t[i]).max(1e-300).ln() - l[i].ln()))
        .sum();
    (li, a, objective)
}

fn r2(y: &[f64], fitted: impl Fn(usize) -> f64) -> f64 {
    let mean = y.iter().sum::<f64>() / y.len() as f64;
    let tot: f64 = y.iter().map(|v| (v - mean).powi(2)).sum();
    let res: f64 = (0..y.len()).map(|i| (y[i] - fitted(i)).powi(2)).sum();
    if tot > 0.0 { 1.0 - res / tot } else { 0.0 }
}

/// Fit L(C) = L∞ + (C₀/C)^α to `(compute, loss)`; `None` below three distinct computes.
pub fn fit_law(c: &[f64], l: &[f64]) -> Option<Law> {
    let distinct = {
        let mut v: Vec<f64> = c.to_vec();
        v.sort_by(f64::total_cmp);
        v.dedup();
        v.len()
    };
    if distinct < 3 || c.iter().chain(l).any(|v| !(v.is_finite() && *v > 0.0)) {
        return None;
    }
    let ln_c: Vec<f64> = c.iter().map(|c| c.ln()).collect();
    let mid = ln_c.iter().sum::<f64>() / c.len() as f64;
    let x: Vec<f64> = ln_c.iter().map(|v| v - mid).collect();
    let grid: Vec<f64> = (0..400)
        .map(|k| (0.005f64.ln() + (3.0f64 / 0.005).ln() * k as f64 / 399.0).exp())
        .collect();
    let scores: Vec<f64> = grid.iter().map(|&a| project(a, &x, l).2).collect();
    let best = (0..grid.len())
        .min_by(|&i, &j| scores[i].total_cmp(&scores[j]))
        .expect("grid");
    let (mut lo, mut hi) = (
        grid[best.saturating_sub(1)],
        grid[(best + 1).min(grid.len() - 1)],
    );
    let g = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..60 {
        let (m1, m2) = (hi - g * (hi - lo), lo + g * (hi - lo));
        if project(m1, &x, l).2 <= project(m2, &x, l).2 {
            hi = m2;
        } else {
            lo = m1;
        }
    }
    let alpha = (lo + hi) / 2.0;
    let (l_inf, a, _) = project(alpha, &x, l);
    // A' tᵢ = A' (cᵢ / e^mid)^−α = (C₀ / cᵢ)^α with C₀ = e^mid · A'^(1/α).
    let c0 = mid.exp() * a.powf(1.0 / alpha);
    if !(c0.is_finite() && l_inf.is_finite()) {
        return None;
    }
    let law = Law {
        alpha,
        l_inf,
        c0,
        r2: 0.0,
    };
    let y: Vec<f64> = l.iter().map(|v| v.ln()).collect();
    Some(Law {
        r2: r2(&y, |i| law.predict(c[i]).ln()),
        ..law
    })
}

/// Least squares of ln L on ln C: L = (C₀/C)^α.
pub fn fit_power(c: &[f64], l: &[f64]) -> Option<Power> {
    if c.len() < 2 || c.iter().chain(l).any(|v| !(v.is_finite() && *v > 0.0)) {
        return None;
    }
    let x: Vec<f64> = c.iter().map(|v| v.ln()).collect();
    let y: Vec<f64> = l.iter().map(|v| v.ln()).collect();
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let sxx: f64 = x.iter().map(|v| (v - mx).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let slope = x
        .iter()
        .zip(&y)
        .map(|(a, b)| (a - mx) * (b - my))
        .sum::<f64>()
        / sxx;
    let intercept = my - slope * mx;
    let alpha = -slope;
    let c0 = (intercept / alpha).exp();
    // A flat line has no C₀ (it overflows): no power law to report.
    (c0.is_finite() && c0 > 0.0).then(|| Power {
        alpha,
        c0,
        r2: r2(&y, |i| intercept + slope * x[i]),
    })
}

/// Indices of the compute-efficient frontier (the lower envelope): the points with a lower loss
/// than every point of less compute, in order of compute.
pub fn frontier(c: &[f64], l: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..c.len()).collect();
    order.sort_by(|&i, &j| c[i].total_cmp(&c[j]).then(l[i].total_cmp(&l[j])));
    let mut best = f64::INFINITY;
    let mut out = Vec::new();
    for i in order {
        if l[i] < best {
            best = l[i];
            out.push(i);
        }
    }
    out
}

/// A 95 % interval (2.5th and 97.5th percentiles).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

/// Percentile intervals of α and L∞ over `rounds` resamples (with replacement) of the points.
pub fn bootstrap(c: &[f64], l: &[f64], rounds: usize, seed: u64) -> Option<(Interval, Interval)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut alphas, mut floors) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let pick: Vec<usize> = (0..c.len()).map(|_| rng.random_range(0..c.len())).collect();
        let cs: Vec<f64> = pick.iter().map(|&i| c[i]).collect();
        let ls: Vec<f64> = pick.iter().map(|&i| l[i]).collect();
        if let Some(law) = fit_law(&cs, &ls) {
            alphas.push(law.alpha);
            floors.push(law.l_inf);
        }
    }
    if alphas.is_empty() || alphas.len() < rounds / 2 {
        return None;
    }
    let interval = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Interval {
            low: at(0.025),
            high: at(0.975),
        }
    };
    Some((interval(alphas), interval(floors)))
}

/// Pearson's correlation; `None` for fewer than 3 points or a constant series.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len();
    if n < 3 || y.len() != n {
        return None;
    }
    let (mx, my) = (
        x.iter().sum::<f64>() / n as f64,
        y.iter().sum::<f64>() / n as f64,
    );
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        sxy += (x[i] - mx) * (y[i] - my);
        sxx += (x[i] - mx).powi(2);
        syy += (y[i] - my).powi(2);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// Ranks from 1, ties sharing their mean rank.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        for &k in &order[i..=j] {
            out[k] = (i + j) as f64 / 2.0 + 1.0;
        }
        i = j + 1;
    }
    out
}

/// Spearman's rank correlation (Pearson's of the ranks, ties averaged).
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    pearson(&ranks(x), &ranks(y))
}

/// Kendall's τ-b (ties in either series corrected); `None` when a series is constant.
pub fn kendall_tau_b(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len();
    if n < 2 || y.len() != n {
        return None;
    }
    let (mut concordant, mut discordant, mut ties_x, mut ties_y) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..n {
        for j in i + 1..n {
            let (dx, dy) = (x[i].total_cmp(&x[j]) as i64, y[i].total_cmp(&y[j]) as i64);
            match (dx, dy) {
                (0, 0) => {
                    ties_x += 1;
                    ties_y += 1;
                }
                (0, _) => ties_x += 1,
                (_, 0) => ties_y += 1,
                _ if dx == dy => concordant += 1,
                _ => discordant += 1,
            }
        }
    }
    let pairs = (n * (n - 1) / 2) as f64;
    let denominator = ((pairs - ties_x as f64) * (pairs - ties_y as f64)).sqrt();
    (denominator > 0.0).then(|| (concordant - discordant) as f64 / denominator)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(alpha: f64, l_inf: f64, c0: f64, noise: f64) -> (Vec<f64>, Vec<f64>) {
        let c: Vec<f64> = (0..12).map(|k| 1e-9 * 10f64.powf(k as f64 / 3.0)).collect();
        let l = c
            .iter()
            .enumerate()
            .map(|(k, &c)| {
                let wobble = if k % 2 == 0 { 1.0 + noise } else { 1.0 - noise };
                (l_inf + (c0 / c).powf(alpha)) * wobble
            })
            .collect();
        (c, l)
    }

    #[test]
    fn the_fit_recovers_a_known_exponent_and_floor() {
        let (c, l) = points(0.3, 1.5, 1e-6, 0.0);
        let law = fit_law(&c, &l).unwrap();
        assert!((law.alpha - 0.3).abs() < 0.3 * 0.02, "{law:?}");
        assert!((law.l_inf - 1.5).abs() < 0.03, "{law:?}");
        assert!((law.c0 / 1e-6 - 1.0).abs() < 0.05, "{law:?}");
        assert!(law.r2 > 0.999);
        // 0.3 % multiplicative noise, alternating: still within 2 %.
        let (c, l) = points(0.3, 1.5, 1e-6, 0.003);
        let law = fit_law(&c, &l).unwrap();
        assert!((law.alpha - 0.3).abs() < 0.3 * 0.02, "{law:?}");
        let (alpha, floor) = bootstrap(&c, &l, 200, 1).unwrap();
        assert!(
            alpha.low <= law.alpha && law.alpha <= alpha.high,
            "{alpha:?}"
        );
        assert!(
            alpha.high - alpha.low < 0.1,
            "0.3 % noise leaves α well pinned: {alpha:?}"
        );
        assert!(floor.low <= 1.5 && 1.5 <= floor.high, "{floor:?}");
        // A floor that fits to zero: the bound binds and the other parameters are still found.
        let (c, l) = points(0.2, 0.0, 1e-4, 0.0);
        let law = fit_law(&c, &l).unwrap();
        assert!(
            (law.alpha - 0.2).abs() < 0.2 * 0.02 && (law.c0 / 1e-4 - 1.0).abs() < 0.05,
            "{law:?}"
        );
        // A flat series has no power law (C₀ would overflow), and says so.
        assert!(fit_power(&c, &vec![3.0; c.len()]).is_none());
        // A pure power law: no floor, and the line fit finds the same exponent.
        let (c, l) = points(0.12, 0.0, 1e-3, 0.0);
        let law = fit_law(&c, &l).unwrap();
        assert!(
            (law.alpha - 0.12).abs() < 0.12 * 0.02 && law.l_inf < 0.02,
            "{law:?}"
        );
        let p = fit_power(&c, &l).unwrap();
        assert!(
            (p.alpha - 0.12).abs() < 1e-9 && (p.c0 / 1e-3 - 1.0).abs() < 1e-6,
            "{p:?}"
        );
        assert!(
            fit_law(&c[..2], &l[..2]).is_none(),
            "two points fit nothing"
        );
    }

    #[test]
    fn the_frontier_is_the_lower_envelope() {
        let c = [1.0, 2.0, 2.0, 3.0, 4.0, 5.0];
        let l = [5.0, 4.0, 4.5, 4.2, 3.0, 3.5];
        assert_eq!(frontier(&c, &l), vec![0, 1, 4]);
    }

    #[test]
    fn rank_correlations_match_hand_worked_cases() {
        // x: 1 2 2 3; y: 1 3 2 3 → pairs (6): concordant (1,2)(1,3)(1,4)(2,4)? no: y2 = y4.
        // (1,2)+ (1,3)+ (1,4)+ (2,3) x tie (2,4) y tie (3,4)+ → C 4, D 0, ties x 1, y 1.
        let (x, y) = ([1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 3.0]);
        let tau = kendall_tau_b(&x, &y).unwrap();
        assert!((tau - 4.0 / 5.0).abs() < 1e-12, "{tau}");
        assert_eq!(
            kendall_tau_b(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]),
            Some(-1.0)
        );
        assert_eq!(kendall_tau_b(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(ranks(&[10.0, 20.0, 10.0, 5.0]), vec![2.5, 4.0, 2.5, 1.0]);
        let s = spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 4.0, 9.0, 16.0]).unwrap();
        assert!((s - 1.0).abs() < 1e-12);
        let p = pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 7.0]).unwrap();
        assert!((p - 0.993_399_267_798_783).abs() < 1e-12, "{p}");
    }
}
