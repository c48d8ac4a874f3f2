//! The building blocks of the attention and GELU kernels: [`madd`], the multiply-add that is
//! fused where the kernel is compiled for FMA; [`exp_neg`], a branch-free `e^(−a)` that
//! vectorises; [`product`], small matrix products in register tiles (writing through
//! [`rows_of`]; [`lanes8`] for 8-lane passes over a buffer); and `dispatch!`, which
//! compiles a kernel three times (plain, with AVX2 + FMA, with AVX-512) and picks one at run
//! time. The kernels are written once, generic over `const FMA: bool`, and `#[inline(always)]`,
//! so that each instantiation is compiled with its own target features.

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

/// `C = A·B` for small matrices given by accessors: `a(i, k)` for A (`[rows, inner]`), `b(k)` for
/// row `k` of B (at least `cols` long); `out(i, c, values)` receives row `i` of C from column `c`
/// on. Register tiles of 4 rows × 16 columns: each 8 values of B loaded serve 4 rows, and 8 sums
/// run side by side, so consecutive multiply-adds do not wait for each other. The rows and
/// columns past the last whole tile take smaller tiles, down to 1 × 1.
#[inline(always)]
pub(super) fn product<'a, const FMA: bool>(
    [rows, inner, cols]: [usize; 3],
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize) -> &'a [f32],
    mut out: impl FnMut(usize, usize, &[f32]),
) {
    let mut i = 0;
    while i + 4 <= rows {
        row_block::<FMA, 4>(i, [inner, cols], &a, &b, &mut out);
        i += 4;
    }
    for i in i..rows {
        row_block::<FMA, 1>(i, [inner, cols], &a, &b, &mut out);
    }
}

/// Rows `i0..i0 + R` of [`product`]: 16 columns at a time, then 8, then one by one.
#[inline(always)]
fn row_block<'a, const FMA: bool, const R: usize>(
    i0: usize,
    [inner, cols]: [usize; 2],
    a: &impl Fn(usize, usize) -> f32,
    b: &impl Fn(usize) -> &'a [f32],
    out: &mut impl FnMut(usize, usize, &[f32]),
) {
    let a = |r: usize, k: usize| a(i0 + r, k);
    let mut c = 0;
    while c + 16 <= cols {
        let sums = tile::<FMA, R, 2>(inner, a, |k| &b(k)[c..c + 16]);
        for (r, sums) in sums.iter().enumerate() {
            out(i0 + r, c, sums.as_flattened());
        }
        c += 16;
    }
    if c + 8 <= cols {
        let sums = tile::<FMA, R, 1>(inner, a, |k| &b(k)[c..c + 8]);
        for (r, sums) in sums.iter().enumerate() {
            out(i0 + r, c, sums.as_flattened());
        }
        c += 8;
    }
    for c in c..cols {
        for r in 0..R {
            let sum = (0..inner).fold(0.0, |acc, k| madd::<FMA>(a(r, k), b(k)[c], acc));
            out(i0 + r, c, &[sum]);
        }
    }
}

/// Where [`product`] writes: row `i` of `x` (rows of `stride` values) from column `col` on.
#[inline(always)]
pub(super) fn rows_of(
    x: &mut [f32],
    stride: usize,
    col: usize,
) -> impl FnMut(usize, usize, &[f32]) + '_ {
    move |i, c, values| x[i * stride + col + c..][..values.len()].copy_from_slice(values)
}

/// `buffer` as `len` zeros.
pub(super) fn zeroed(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buffer.clear();
    buffer.resize(len, 0.0);
    buffer
}

/// Eight lanes of `x` from `at` on.
#[inline(always)]
pub(super) fn lanes8(x: &mut [f32], at: usize) -> &mut [f32; 8] {
    (&mut x[at..at + 8]).try_into().expect("8 lanes")
}

/// `R` rows × `8·G` columns of `Σ_k a(r, k)·b(k)` over `k < inner`, with `b(k)` of length `8·G`.
#[inline(always)]
fn tile<'a, const FMA: bool, const R: usize, const G: usize>(
    inner: usize,
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize) -> &'a [f32],
) -> [[[f32; 8]; G]; R] {
    let mut acc = [[[0f32; 8]; G]; R];
    for k in 0..inner {
        let row: &[[f32; 8]; G] = b(k).as_chunks().0.try_into().expect("8·G values");
        for g in 0..G {
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = a(r, k);
                for l in 0..8 {
                    acc[g][l] = madd::<FMA>(x, row[g][l], acc[g][l]);
                }
            }
        }
    }
    acc
}

/// Compiles a kernel three times, plain, with AVX2 + FMA and with AVX-512 (F, VL, BW, DQ: LLVM
/// keeps to 256-bit vectors there, but gets 32 registers, mask registers and AVX-512's
/// instructions), and picks one at run time by [`VectorPath::active`].
///
/// [`VectorPath::active`]: crate::cpu::VectorPath::active
macro_rules! dispatch {
    ($vis:vis $name:ident, $avx2:ident, $avx512:ident, $kernel:ident, ($($arg:ident: $ty:ty),*)) => {
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

        $vis fn $name($($arg: $ty),*) {
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

    /// Every tile size: 7 rows (a tile of 4, then 3 of 1) by 29 columns (16, 8, then 5 of 1).
    #[test]
    fn product_matches_a_direct_product() {
        fn check<const FMA: bool>() {
            let [rows, inner, cols] = [7, 5, 29];
            let a: Vec<f32> = (0..rows * inner).map(|i| (i % 11) as f32 - 5.0).collect();
            let b: Vec<f32> = (0..inner * cols).map(|i| (i % 7) as f32 * 0.5).collect();
            let mut got = vec![f32::NAN; rows * cols];
            product::<FMA>(
                [rows, inner, cols],
                |i, k| a[i * inner + k],
                |k| &b[k * cols..(k + 1) * cols],
                rows_of(&mut got, cols, 0),
            );
            for i in 0..rows {
                for c in 0..cols {
                    let want: f32 = (0..inner).map(|k| a[i * inner + k] * b[k * cols + c]).sum();
                    assert_eq!(got[i * cols + c], want, "row {i}, column {c}");
                }
            }
        }
        check::<false>();
        check::<true>();
    }

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
