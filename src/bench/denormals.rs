//! Where a training step meets denormal floats (`clue bench --denormal-census`): the CPU's
//! sticky flags around each phase of one extra step (forward only, forward + backward +
//! clipping, the AdamW update), and the share of stored values that are denormal (weights, the
//! step's gradients, AdamW's two moments). Run it with `--keep-denormals` to see them as the
//! hardware would without flushing; with flushing on, the stored values hold none and the
//! "underflow" flags still say where they would have been made.
//!
//! The flags are read on the calling thread and rayon's pools (the global one and, with
//! `--workers`, each data-parallel worker's), where the Flex backend and clue's kernels compute;
//! the `ndarray` backend's matrix products run on their own threads (`matrixmultiply`), whose
//! flags are not read. The flags are best-effort: the compiler assumes the default
//! floating-point environment and may fold or move float operations.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::{AdaptorRecord, AdaptorRecordV1};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::TrainStep;
use serde::Serialize;

use crate::cpu::{FpFlags, clear_fp_flags, fp_flags};
use crate::data::batcher::UserBatch;
use crate::train::adamw::ClueAdamW;
use crate::train::step::Trainee;

/// How many of a set of stored values are denormal.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Share {
    pub denormal: usize,
    pub total: usize,
}

impl Share {
    fn add<Bk: Backend, const D: usize>(&mut self, t: Tensor<Bk, D>) {
        let data = t.into_data();
        for v in data.iter::<f32>() {
            // `is_subnormal` looks at the bits (no float comparison to raise a flag itself).
            self.denormal += v.is_subnormal() as usize;
            self.total += 1;
        }
    }

    pub fn line(&self) -> String {
        format!(
            "{} of {} ({:.3} %)",
            self.denormal,
            self.total,
            100.0 * self.denormal as f64 / self.total.max(1) as f64
        )
    }
}

/// The census of one training step.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DenormalCensus {
    /// Whether the step ran with denormals flushed (then the CPU reads denormal operands as
    /// zero and never flags them; underflows are still flagged).
    pub flushed: bool,
    /// Flags of an inference forward pass.
    pub forward: FpFlags,
    /// Flags of a training step: forward, loss, backward and gradient clipping.
    pub train_step: FpFlags,
    /// Flags of the AdamW update.
    pub optimizer: FpFlags,
    /// Weights after the update.
    pub weights: Share,
    /// The step's gradients (after clipping).
    pub gradients: Share,
    pub adam_moment1: Share,
    pub adam_moment2: Share,
}

/// Counts the denormal values of every parameter, or of every parameter's gradient.
struct Values<'a> {
    grads: Option<&'a GradientsParams>,
    share: Share,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Values<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        match self.grads {
            Some(grads) => {
                if let Some(g) = grads.get::<B::InnerBackend, D>(param.id) {
                    self.share.add(g);
                }
            }
            None => self.share.add(param.val().inner()),
        }
    }
}

fn values<B: AutodiffBackend>(trainee: &Trainee<B>, grads: Option<&GradientsParams>) -> Share {
    let mut v = Values {
        grads,
        share: Share::default(),
    };
    trainee.visit(&mut v);
    v.share
}

/// The two moments of every parameter's AdamW state.
fn moments<B: AutodiffBackend>(
    optim: &OptimizerAdaptor<ClueAdamW, Trainee<B>, B>,
) -> (Share, Share) {
    let (mut m1, mut m2) = (Share::default(), Share::default());
    macro_rules! add {
        ($s:expr) => {{
            m1.add($s.momentum.moment_1);
            m2.add($s.momentum.moment_2);
        }};
    }
    for record in optim.to_record().into_values() {
        match record {
            AdaptorRecord::V1(AdaptorRecordV1::Rank1(s)) => add!(s),
            AdaptorRecord::V1(AdaptorRecordV1::Rank2(s)) => add!(s),
            AdaptorRecord::V1(AdaptorRecordV1::Rank3(s)) => add!(s),
            _ => {}
        }
    }
    (m1, m2)
}

/// One more training step of `trainee` on `train`, and an inference pass on `infer` (the same
/// users), with the CPU's flags read around each phase; then the stored values counted.
pub fn census<B: AutodiffBackend>(
    trainee: Trainee<B>,
    optim: &mut OptimizerAdaptor<ClueAdamW, Trainee<B>, B>,
    lr: f64,
    train: UserBatch<B>,
    infer: UserBatch<B::InnerBackend>,
) -> (Trainee<B>, DenormalCensus) {
    clear_fp_flags();
    let _ = trainee.model.valid().encoder.forward(&infer).into_data();
    let forward = fp_flags();

    clear_fp_flags();
    let out = TrainStep::step(&trainee, train);
    let _ = out.item.loss.clone().into_data();
    let train_step = fp_flags();
    let gradients = values(&trainee, Some(&out.grads));

    // The CPU backends compute eagerly: the update is done when `optimize` returns.
    clear_fp_flags();
    let trainee = trainee.optimize(optim, lr, out.grads);
    let optimizer = fp_flags();
    let weights = values(&trainee, None);
    let (adam_moment1, adam_moment2) = moments(optim);
    (
        trainee,
        DenormalCensus {
            flushed: crate::cpu::flushes_denormals(),
            forward,
            train_step,
            optimizer,
            weights,
            gradients,
            adam_moment1,
            adam_moment2,
        },
    )
}

impl DenormalCensus {
    /// Table rows: flags per phase, then the stored shares.
    pub fn rows(&self) -> Vec<(String, String)> {
        let flags = |f: &FpFlags| {
            format!(
                "denormal operands {}, underflows {}",
                match self.flushed {
                    true => "n/a (read as 0)",
                    false => yes(f.denormal_operand),
                },
                yes(f.underflow)
            )
        };
        vec![
            ("denormals: forward".into(), flags(&self.forward)),
            ("denormals: train step".into(), flags(&self.train_step)),
            ("denormals: AdamW".into(), flags(&self.optimizer)),
            ("denormal weights".into(), self.weights.line()),
            ("denormal gradients".into(), self.gradients.line()),
            ("denormal AdamW m".into(), self.adam_moment1.line()),
            ("denormal AdamW v".into(), self.adam_moment2.line()),
        ]
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn share_counts_denormals_of_either_sign_only() {
        let values = [
            f32::from_bits(1),
            -f32::from_bits(0x007f_ffff),
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            1.0,
            f32::NAN,
            f32::INFINITY,
        ];
        let t = Tensor::<NdArray, 1>::from_floats(values, &Default::default());
        let mut share = Share::default();
        share.add(t.reshape([2, 4]));
        assert_eq!((share.denormal, share.total), (2, 8));
    }
}
