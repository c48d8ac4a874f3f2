//! The contrastive objective (paper eq. 4): symmetric InfoNCE over the batch.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use crate::model::LOGIT_SCALE_MAX;

/// The floor of a row's squared norm before its square root.
const MIN_SQUARED_NORM: f64 = 1e-16;

/// Rows scaled to unit L2 norm: `[n, d]` → `[n, d]`.
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let x = match crate::cube::l2_normalize(x, MIN_SQUARED_NORM as f32) {
        Ok(z) => return z,
        Err(x) => x,
    };
    // Clamped before the square root: at a zero row, sqrt's gradient is infinite and a clamp
    // after it would multiply that by zero (NaN).
    let norm = x
        .clone()
        .square()
        .sum_dim(1)
        .clamp_min(MIN_SQUARED_NORM)
        .sqrt();
    x / norm
}

/// Cross-entropy of `logits` `[n, m]` with the diagonal as targets (row i's positive is column i).
pub fn diagonal_cross_entropy<B: Backend>(logits: Tensor<B, 2>) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    let targets = Tensor::<B, 1, Int>::arange(0..n as i64, &logits.device()).reshape([n, 1]);
    log_softmax(logits, 1).gather(1, targets).mean().neg()
}

/// Whether a loss is finite (a step with a non-finite one is skipped).
pub fn is_finite<B: Backend>(loss: &Tensor<B, 1>) -> bool {
    let value: f64 = loss.clone().into_scalar().elem();
    value.is_finite()
}

/// The loss of one batch and the similarities of its first service pair.
pub struct ContrastiveOutput<B: Backend> {
    /// `[1]`: mean over service pairs of (CE(logits) + CE(logitsᵀ)) / 2.
    pub loss: Tensor<B, 1>,
    /// `[batch, batch]`: cos(f(z_A,i), f(z_B,j)) for the first two services (the logits over
    /// the logit scale: they rank the same).
    pub similarities: Tensor<B, 2>,
}

/// Symmetric InfoNCE for `projected` `[services·batch, d]` (row `s·batch + i` = user i, service s)
/// with the log `log_scale` `[1]` of the logit scale (the scale is [`logit_scale`]'s). More
/// than two services: the mean over every service pair.
///
/// The negatives of a row are the other rows of `projected`; a data-parallel run can pass the
/// rows gathered from every device here and keep the gradient of its own rows only.
pub fn contrastive_loss<B: Backend>(
    projected: Tensor<B, 2>,
    services: usize,
    log_scale: Tensor<B, 1>,
) -> ContrastiveOutput<B> {
    let [rows, d] = projected.dims();
    let batch = rows / services;
    let z = l2_normalize(projected);
    let per_service: Vec<Tensor<B, 2>> = (0..services)
        .map(|s| z.clone().slice([s * batch..(s + 1) * batch, 0..d]))
        .collect();
    let mut losses = Vec::new();
    let mut first = None;
    for a in 0..services {
        for b in a + 1..services {
            let sim = per_service[a]
                .clone()
                .matmul(per_service[b].clone().transpose());
            losses.push(symmetric_cross_entropy(sim.clone(), log_scale.clone()));
            first.get_or_insert(sim);
        }
    }
    let pairs = losses.len();
    let loss = match pairs {
        1 => losses.remove(0),
        _ => Tensor::cat(losses, 0).sum() / pairs as f64,
    };
    ContrastiveOutput {
        loss,
        similarities: first.expect("at least two services"),
    }
}

/// The logit scale `exp(min(t, ln LOGIT_SCALE_MAX))` of its log `t`: `[1]`.
pub fn logit_scale<B: Backend>(log_scale: Tensor<B, 1>) -> Tensor<B, 1> {
    log_scale.clamp_max(LOGIT_SCALE_MAX.ln()).exp()
}

/// `(CE(s·sim) + CE(s·simᵀ)) / 2` for one service pair's similarities `sim` `[n, n]`, with `s`
/// the [`logit_scale`] of `log_scale`: on wgpu and CUDA one kernel each way (with the scale's
/// clamp and gradient), elsewhere Burn's operations.
pub fn symmetric_cross_entropy<B: Backend>(
    sim: Tensor<B, 2>,
    log_scale: Tensor<B, 1>,
) -> Tensor<B, 1> {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    let (sim, log_scale) = match crate::cube::infonce(sim, log_scale, LOGIT_SCALE_MAX.ln() as f32) {
        Ok(loss) => return loss,
        Err(inputs) => inputs,
    };
    let logits = sim * logit_scale(log_scale).unsqueeze::<2>();
    (diagonal_cross_entropy(logits.clone()) + diagonal_cross_entropy(logits.transpose())) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray;

    /// Cross-entropy of rows `a` against rows `b` (row i's positive is row i of `b`), in f64:
    /// −mean_i log softmax_j(s·cos(a_i, b_j))[i].
    fn ce(a: &[Vec<f64>], b: &[Vec<f64>], s: f64) -> f64 {
        let unit = |x: &Vec<f64>| {
            let n = x.iter().map(|v| v * v).sum::<f64>().sqrt();
            x.iter().map(|v| v / n).collect::<Vec<f64>>()
        };
        let (a, b): (Vec<_>, Vec<_>) = (a.iter().map(unit).collect(), b.iter().map(unit).collect());
        let mut total = 0.0;
        for (i, ai) in a.iter().enumerate() {
            let logits: Vec<f64> = b
                .iter()
                .map(|bj| s * ai.iter().zip(bj).map(|(x, y)| x * y).sum::<f64>())
                .collect();
            let log_sum = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
            total += log_sum - logits[i];
        }
        total / a.len() as f64
    }

    fn tensor(services: &[Vec<Vec<f64>>]) -> Tensor<B, 2> {
        let rows: Vec<f32> = services
            .iter()
            .flatten()
            .flatten()
            .map(|&v| v as f32)
            .collect();
        let d = services[0][0].len();
        Tensor::from_data(
            TensorData::new(rows.clone(), [rows.len() / d, d]),
            &Default::default(),
        )
    }

    fn log_scale(s: f64) -> Tensor<B, 1> {
        Tensor::from_floats([s.ln() as f32], &Default::default())
    }

    fn loss(services: &[Vec<Vec<f64>>], s: f64) -> f64 {
        contrastive_loss(tensor(services), services.len(), log_scale(s))
            .loss
            .into_scalar() as f64
    }

    #[test]
    fn a_zero_row_normalises_to_zero_with_a_finite_gradient() {
        // A model with 8-wide embeddings (`d_model = 8`, seed 42) produced a zero row at its
        // second step; the clamp after the square root gave it a NaN gradient (0 · ∞).
        type A = burn::backend::Autodiff<NdArray>;
        let device = Default::default();
        let x =
            Tensor::<A, 2>::from_floats([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]], &device).require_grad();
        let y = l2_normalize(x.clone());
        let values: Vec<f32> = y.clone().into_data().to_vec().unwrap();
        assert_eq!(values, vec![0.0, 0.0, 0.0, 0.6, 0.0, 0.8]);
        let weights = Tensor::<A, 2>::from_floats([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], &device);
        let grads = (y * weights).sum().backward();
        let g: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        // The unit row's gradient is (w − (w·u) u) / ‖x‖ = ((1,2,3) − 3 (0.6,0,0.8)) / 5.
        let expected = [(1.0 - 1.8) / 5.0, 2.0 / 5.0, (3.0 - 2.4) / 5.0];
        for (a, b) in g[3..].iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{g:?}");
        }
    }

    /// Non-unit, non-symmetric rows: the A→B and B→A terms differ, so a loss missing either
    /// direction (or one that forgets the normalisation or the scale) fails.
    #[test]
    fn loss_matches_an_f64_reference_on_an_asymmetric_batch() {
        let a = vec![
            vec![1.0, 0.2, -0.3],
            vec![0.1, 2.0, 0.4],
            vec![-0.5, 0.3, 1.5],
            vec![0.7, 0.7, 0.1],
        ];
        let b = vec![
            vec![0.9, 0.8, 0.0],
            vec![0.3, 1.0, -0.2],
            vec![0.2, -0.1, 3.0],
            vec![1.0, -0.4, 0.6],
        ];
        let s = 4.5;
        let (ab, ba) = (ce(&a, &b, s), ce(&b, &a, s));
        assert!(
            (ab - ba).abs() > 0.05,
            "the case must tell the directions apart: {ab} {ba}"
        );
        let expected = (ab + ba) / 2.0;
        let got = loss(&[a.clone(), b.clone()], s);
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        // The similarities of the first pair are the cosines, row = service A's user.
        let sims: Vec<f32> = contrastive_loss(tensor(&[a.clone(), b.clone()]), 2, log_scale(s))
            .similarities
            .to_data()
            .to_vec()
            .unwrap();
        let cos01 = {
            let dot: f64 = a[0].iter().zip(&b[1]).map(|(x, y)| x * y).sum();
            let n = |v: &Vec<f64>| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            dot / (n(&a[0]) * n(&b[1]))
        };
        assert!((sims[1] as f64 - cos01).abs() < 1e-6);
        // Above the clamp the scale is 100.
        let clamped = (ce(&a, &b, 100.0) + ce(&b, &a, 100.0)) / 2.0;
        let got = loss(&[a.clone(), b.clone()], 250.0);
        assert!((got - clamped).abs() < 1e-4, "{got} vs {clamped}");
    }

    /// Three services: the mean over the pairs (A,B), (A,C), (B,C) of each pair's symmetric
    /// loss, each pair summed by hand in f64.
    #[test]
    fn three_services_average_the_three_pairs() {
        let a = vec![vec![1.0, 0.2], vec![0.1, 1.0], vec![0.6, -0.4]];
        let b = vec![vec![0.9, 0.1], vec![0.3, 1.0], vec![-0.2, 0.5]];
        let c = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.8, 0.3]];
        let s = 5.0;
        let pair = |x: &Vec<Vec<f64>>, y: &Vec<Vec<f64>>| (ce(x, y, s) + ce(y, x, s)) / 2.0;
        let expected = (pair(&a, &b) + pair(&a, &c) + pair(&b, &c)) / 3.0;
        let got = loss(&[a.clone(), b.clone(), c.clone()], s);
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        // Not the first pair alone, nor a mean over ordered pairs with self-pairs.
        assert!((got - pair(&a, &b)).abs() > 1e-3);
    }
}
