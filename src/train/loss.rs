//! The contrastive objective (paper eq. 4): symmetric InfoNCE over the batch.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

/// Rows scaled to unit L2 norm: `[n, d]` → `[n, d]`.
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-8);
    x / norm
}

/// Cross-entropy of `logits` `[n, m]` with the diagonal as targets (row i's positive is column i).
pub fn diagonal_cross_entropy<B: Backend>(logits: Tensor<B, 2>) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    let targets = Tensor::<B, 1, Int>::arange(0..n as i64, &logits.device()).reshape([n, 1]);
    log_softmax(logits, 1).gather(1, targets).mean().neg()
}

/// The loss of one batch and the logits of its first service pair.
pub struct ContrastiveOutput<B: Backend> {
    /// `[1]`: mean over service pairs of (CE(logits) + CE(logitsᵀ)) / 2.
    pub loss: Tensor<B, 1>,
    /// `[batch, batch]`: s·cos(f(z_A,i), f(z_B,j)) for the first two services.
    pub logits: Tensor<B, 2>,
}

/// Symmetric InfoNCE for `projected` `[services·batch, d]` (row `s·batch + i` = user i, service s)
/// with logit scale `scale` `[1]`. More than two services: the mean over every service pair.
///
/// The negatives of a row are the other rows of `projected`; a data-parallel run can pass the
/// rows gathered from every device here and keep the gradient of its own rows only.
pub fn contrastive_loss<B: Backend>(
    projected: Tensor<B, 2>,
    services: usize,
    scale: Tensor<B, 1>,
) -> ContrastiveOutput<B> {
    let [rows, d] = projected.dims();
    let batch = rows / services;
    let z = l2_normalize(projected);
    let per_service: Vec<Tensor<B, 2>> = (0..services)
        .map(|s| z.clone().slice([s * batch..(s + 1) * batch, 0..d]))
        .collect();
    let scale = scale.unsqueeze::<2>();
    let mut losses = Vec::new();
    let mut first = None;
    for a in 0..services {
        for b in a + 1..services {
            let logits = per_service[a]
                .clone()
                .matmul(per_service[b].clone().transpose())
                * scale.clone();
            let l = (diagonal_cross_entropy(logits.clone())
                + diagonal_cross_entropy(logits.clone().transpose()))
                / 2.0;
            losses.push(l);
            first.get_or_insert(logits);
        }
    }
    let pairs = losses.len() as f64;
    ContrastiveOutput {
        loss: Tensor::cat(losses, 0).sum() / pairs,
        logits: first.expect("at least two services"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray;

    #[test]
    fn loss_matches_a_hand_computed_3x3_case() {
        let dev = Default::default();
        // Service A rows are unit vectors e0, e1, e2; service B rows are e0, e2, e1, so user 0
        // matches and users 1 and 2 are swapped. cos = 1 on (0,0), (1,2), (2,1), else 0.
        let a = [[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let b = [[2.0f32, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.5, 0.0]];
        let x = Tensor::<B, 2>::cat(
            vec![Tensor::from_floats(a, &dev), Tensor::from_floats(b, &dev)],
            0,
        );
        let s = 2.0f64;
        let out = contrastive_loss(x, 2, Tensor::from_floats([s as f32], &dev));
        // Row 0: logits [s, 0, 0] → -log(e^s / (e^s + 2)). Rows 1, 2: positive logit 0, one s,
        // one 0 → -log(1 / (e^s + 2)). Logits are symmetric, so both directions agree.
        let e = s.exp();
        let expected = (-(e / (e + 2.0)).ln() + 2.0 * (e + 2.0).ln()) / 3.0;
        let got = out.loss.into_scalar() as f64;
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        let logits: Vec<f32> = out.logits.to_data().to_vec().unwrap();
        assert!(
            (logits[0] - 2.0).abs() < 1e-6
                && (logits[5] - 2.0).abs() < 1e-6
                && logits[4].abs() < 1e-6
        );
    }

    #[test]
    fn three_services_average_the_three_pairs() {
        let dev = Default::default();
        let x = Tensor::<B, 2>::from_floats(
            [
                [1.0f32, 0.2],
                [0.1, 1.0],
                [0.9, 0.1],
                [0.3, 1.0],
                [1.0, 0.0],
                [0.0, 1.0],
            ],
            &dev,
        );
        let scale = Tensor::<B, 1>::from_floats([5.0f32], &dev);
        let three = contrastive_loss(x.clone(), 3, scale.clone())
            .loss
            .into_scalar();
        let pair = |a: usize, b: usize| {
            let rows = Tensor::cat(
                vec![
                    x.clone().slice([2 * a..2 * a + 2, 0..2]),
                    x.clone().slice([2 * b..2 * b + 2, 0..2]),
                ],
                0,
            );
            contrastive_loss(rows, 2, scale.clone()).loss.into_scalar()
        };
        let mean = (pair(0, 1) + pair(0, 2) + pair(1, 2)) / 3.0;
        assert!((three - mean).abs() < 1e-6);
    }
}
