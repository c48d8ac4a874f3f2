//! The building blocks of the attention and GELU kernels: [`madd`], the multiply-add that is
//! fused where the kernel is compiled for FMA; [`exp_neg`], a branch-free `e^(−a)` that
//! vectorises; [`row_times`] and [`combination`], sums of products kept 8 columns at a time in
//! registers ([`weighted_sum8`]); and `dispatch!`, which compiles a kernel three times (plain, with
//! AVX2 + FMA, with AVX-512) and picks one at run time. The kernels are written once, generic over
//! `const FMA: bool`, and `#[inline(always)]`, so that each instantiation is compiled with its
//! own target features.

/// `a·b + c`, fused into one rounding where the kernel is compiled for FMA.
#[inline(always)]
pub(super) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    match FMA {
        true => a.mul_add(b, c),
        false => a * b + c,
    }
}

/// Beyond this, [`exp_neg`] is exactly 0: e^−80 ≈ 1.8·10⁻³⁵ is invisible next to the largest
/// softmax weight (1) in f32, and anything smaller is a step from the denormal range, where its
/// products (a masked attention key's weight times the values, GELU's far tails) would cost
/// Intel cores a slow path when denormals are not flushed.
pub(super) const EXP_NEG_ZERO_BEYOND: f32 = 80.0;

/// `e^(−a)` for `a ≥ 0`, branch-free so loops over it vectorise: `2^k` from the exponent bits
/// times a degree-7 polynomial on the remainder (relative error < 10⁻⁷); exactly 0 beyond
/// [`EXP_NEG_ZERO_BEYOND`] (a masked key gets weight 0, as in Burn's generic softmax); NaN
/// stays NaN.
#[inline(always)]
pub(super) fn exp_neg<const FMA: bool>(a: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    // Not `a.min(87.0)`, which would turn a NaN into 87.
    let v = -(if a > 87.0 { 87.0 } else { a });
    let shifted = madd::<FMA>(v, std::f32::consts::LOG2_E, MAGIC);
    let k = shifted - MAGIC;
    // k as an integer, from the bits (a float-to-int cast would not vectorise).
    let k_int = shifted.to_bits() as i32 - MAGIC.to_bits() as i32;
    let r = madd::<FMA>(-k, 1.428_606_8e-6, madd::<FMA>(-k, 0.693_145_75, v));
    let p = [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ]
    .iter()
    .fold(1.0 / 5040.0, |acc, &c| madd::<FMA>(acc, r, c));
    let e = p * f32::from_bits(((k_int + 127) as u32) << 23);
    if a > EXP_NEG_ZERO_BEYOND { 0.0 } else { e }
}

/// `out[j] = Σ_c x[c]·t[c, j]` for `t`: `[x.len(), len8]` (8 columns at a time, in registers).
#[inline(always)]
pub(super) fn row_times<const FMA: bool>(x: &[f32], t: &[f32], out: &mut [f32]) {
    let len8 = out.len();
    for (b, block) in out.chunks_exact_mut(8).enumerate() {
        let sums = weighted_sum8::<FMA>(
            x.len(),
            |c| x[c],
            |c| {
                t[c * len8 + 8 * b..c * len8 + 8 * b + 8]
                    .try_into()
                    .expect("8 values")
            },
        );
        block.copy_from_slice(&sums);
    }
}

/// `out = Σ_r coef(r)·row(r)` over `r < n`, 8 columns at a time in registers.
#[inline(always)]
pub(super) fn combination<'a, const FMA: bool>(
    out: &mut [f32],
    n: usize,
    coef: impl Fn(usize) -> f32,
    row: impl Fn(usize) -> &'a [f32],
) {
    let (o8, o_rest) = out.as_chunks_mut::<8>();
    for (b, ob) in o8.iter_mut().enumerate() {
        *ob = weighted_sum8::<FMA>(n, &coef, |r| {
            row(r)[8 * b..8 * b + 8].try_into().expect("8 values")
        });
    }
    let first = 8 * o8.len();
    for (c, o) in o_rest.iter_mut().enumerate() {
        *o = (0..n).fold(0.0, |acc, r| madd::<FMA>(coef(r), row(r)[first + c], acc));
    }
}

/// `Σ_r coef(r)·row(r)` over `r < n` for 8 lanes, in four partial sums so that consecutive
/// multiply-adds do not wait for each other.
#[inline(always)]
fn weighted_sum8<const FMA: bool>(
    n: usize,
    coef: impl Fn(usize) -> f32,
    row: impl Fn(usize) -> [f32; 8],
) -> [f32; 8] {
    let mut acc = [[0f32; 8]; 4];
    let add = |acc: &mut [f32; 8], r: usize| {
        let (c, x) = (coef(r), row(r));
        for l in 0..8 {
            acc[l] = madd::<FMA>(c, x[l], acc[l]);
        }
    };
    let [a0, a1, a2, a3] = &mut acc;
    let mut r = 0;
    while r + 4 <= n {
        add(a0, r);
        add(a1, r + 1);
        add(a2, r + 2);
        add(a3, r + 3);
        r += 4;
    }
    for r in r..n {
        add(a0, r);
    }
    std::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]))
}

/// Compiles a kernel three times, plain, with AVX2 + FMA and with AVX-512 (F, VL, BW, DQ: LLVM
/// keeps to 256-bit vectors there, but gets 32 registers, mask registers and AVX-512's
/// instructions), and picks one at run time by [`VectorPath::active`].
///
/// [`VectorPath::active`]: crate::cpu::VectorPath::active
macro_rules! dispatch {
    ($name:ident, $avx2:ident, $avx512:ident, $kernel:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx2($($arg: $ty),*) {
            $kernel::<true>($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
        fn $avx512($($arg: $ty),*) {
            $kernel::<true>($($arg),*)
        }

        fn $name($($arg: $ty),*) {
            match $crate::cpu::VectorPath::active() {
                // SAFETY: the CPU has these instruction sets (`VectorPath::active` checked them).
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::VectorPath::Avx512 => unsafe { $avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::cpu::VectorPath::Avx2Fma => unsafe { $avx2($($arg),*) },
                $crate::cpu::VectorPath::Portable => $kernel::<false>($($arg),*),
                // Elsewhere `active` is always `Portable`.
                #[cfg(not(target_arch = "x86_64"))]
                _ => $kernel::<false>($($arg),*),
            }
        }
    };
}

pub(super) use dispatch;

/// A build of a `dispatch!`ed kernel, for tests that run every build this CPU has.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Build {
    /// The portable build, with and without fused multiply-adds.
    Plain {
        fma: bool,
    },
    Avx2,
    Avx512,
}

/// Every build this CPU runs: both portable ones, and the vector paths it has.
#[cfg(test)]
pub(super) fn builds() -> Vec<Build> {
    use crate::cpu::VectorPath;
    let best = VectorPath::detect();
    let mut builds = vec![Build::Plain { fma: false }, Build::Plain { fma: true }];
    if cfg!(target_arch = "x86_64") && best <= VectorPath::Avx2Fma {
        builds.push(Build::Avx2);
    }
    if cfg!(target_arch = "x86_64") && best == VectorPath::Avx512 {
        builds.push(Build::Avx512);
    }
    builds
}

/// Runs the build `$build` of a `dispatch!`ed kernel (`$kernel`, `$avx2`, `$avx512`) on `args`.
#[cfg(test)]
macro_rules! run_build {
    ($build:expr, $kernel:ident, $avx2:ident, $avx512:ident, ($($arg:expr),*)) => {
        match $build {
            $crate::model::flex::simd::Build::Plain { fma: false } => $kernel::<false>($($arg),*),
            $crate::model::flex::simd::Build::Plain { fma: true } => $kernel::<true>($($arg),*),
            // SAFETY: `builds()` lists these only where the CPU has their instruction sets.
            #[cfg(target_arch = "x86_64")]
            $crate::model::flex::simd::Build::Avx2 => unsafe { $avx2($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            $crate::model::flex::simd::Build::Avx512 => unsafe { $avx512($($arg),*) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no x86 builds here"),
        }
    };
}

#[cfg(test)]
pub(super) use run_build;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_neg_is_accurate_then_zero_and_keeps_nan() {
        fn check<const FMA: bool>() {
            for i in 0..=9000 {
                let a = i as f32 / 100.0;
                let want = (-(a as f64)).exp();
                let got = exp_neg::<FMA>(a) as f64;
                if a <= EXP_NEG_ZERO_BEYOND {
                    assert!(
                        (got - want).abs() <= 3e-7 * want,
                        "e^-{a} = {got}, want {want}"
                    );
                } else {
                    assert_eq!(got, 0.0, "e^-{a}");
                }
            }
            for a in [1e4, f32::MAX, f32::INFINITY] {
                assert_eq!(exp_neg::<FMA>(a), 0.0, "e^-{a}");
            }
            assert!(exp_neg::<FMA>(f32::NAN).is_nan());
        }
        check::<false>();
        check::<true>();
    }
}
