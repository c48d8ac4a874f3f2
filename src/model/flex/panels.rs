//! clue's own AVX-512 matrix product for the right operands of linear layers: `[k, n]` weights
//! with `k·n` up to [`MOST_VALUES`] (`tiny` and `small`), products of many rows.
//!
//! The gemm crate packs the right operand again in every call, and runs these shapes at
//! 180–215 GFLOP/s on one Xeon core (Sapphire Rapids) in a warm loop; in clue's inference on
//! `small`, its packing was 16 % of the call (64-row blocks of 256×1024 weights). Here a weight
//! is packed once ([`Panels::pack`]) into panels of 64 columns, which every block of rows then
//! reads: a register tile of 6 rows × 64 columns (24 of the 32 vector registers) takes one row
//! of the panel (four loads) and six broadcasts of the left operand per step of the inner axis,
//! and starts from the bias (or the residual rows) instead of a pass that writes them first:
//! 220–240 GFLOP/s on the same core and shapes. Wider weights stay with the gemm crate, which
//! blocks its left operand for the cache (at 1024³: 221 against this kernel's 156 GFLOP/s).

use std::mem::MaybeUninit;

use crate::cpu::VectorPath;

/// What the output rows of a [`product`](super::product) start as (the product is added to
/// them).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Start<'a> {
    Zero,
    /// `[n]`, on every row: a linear layer's bias.
    Bias(&'a [f32]),
    /// `[m, n]` plus a bias `[n]` on every row: a residual connection around a linear layer.
    Residual(&'a [f32], &'a [f32]),
}

/// A matrix operand: its values, row stride and column stride.
pub(super) type Operand<'a> = (&'a [f32], usize, usize);

/// Columns per panel: four vectors of 16.
const PANEL: usize = 64;
/// The largest right operand packed into panels (`k·n`).
const MOST_VALUES: usize = 1 << 18;
/// The fewest rows a packed operand serves: below it packing is a large share of the work (in a
/// warm loop, packing a 64×64 weight value by value took as long as its product with about a
/// hundred rows), and the gemm crate packs for blocks of this many rows itself.
const LEAST_ROWS: usize = 256;

/// A right operand `[k, n]` copied into panels of [`PANEL`] columns, each `k` rows of its
/// columns after one another; the last panel, of `w` columns, is `16·⌈w/16⌉` wide (zeros past
/// `n`).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) struct Panels {
    values: Vec<f32>,
    k: usize,
    n: usize,
}

impl Panels {
    /// `rhs` (`[k, n]` at its strides) in panels, or `None` where this kernel does not run:
    /// a CPU without AVX-512 (or `CLUE_VECTOR_PATH` asking for less), an empty inner axis, a
    /// weight of more than [`MOST_VALUES`] values, or fewer than [`LEAST_ROWS`] rows.
    pub(super) fn pack([m, k, n]: [usize; 3], (rhs, rs, cs): Operand) -> Option<Self> {
        let wanted = VectorPath::active() == VectorPath::Avx512
            && k * n > 0
            && k * n <= MOST_VALUES
            && m >= LEAST_ROWS;
        if !wanted {
            return None;
        }
        assert!(
            (k - 1) * rs + (n - 1) * cs < rhs.len(),
            "panels: right operand out of bounds"
        );
        let mut values = Vec::with_capacity(k * n.next_multiple_of(16));
        for first in (0..n).step_by(PANEL) {
            let (width, wide) = panel_width(n, first);
            for p in 0..k {
                let row = &rhs[p * rs + first * cs..];
                match cs {
                    1 => values.extend_from_slice(&row[..width]),
                    _ => values.extend((0..width).map(|c| row[c * cs])),
                }
                values.resize(values.len() + wide - width, 0.0);
            }
        }
        Some(Self { values, k, n })
    }

    /// `[k, n]`.
    pub(super) fn dims(&self) -> [usize; 2] {
        [self.k, self.n]
    }

    /// Rows `first..first + out.len() / n` of `lhs · self` added to `start`, into `out` (as
    /// [`product_rows`](super::linear::product_rows)), every value written. Panics unless
    /// `lhs` has unit column stride and holds those rows, and the start holds `n` bias values
    /// (and those rows).
    pub(super) fn product_rows(
        &self,
        first: usize,
        (lhs, lhs_rs, lhs_cs): Operand,
        start: Start,
        out: &mut [MaybeUninit<f32>],
    ) {
        let (k, n) = (self.k, self.n);
        let rows = out.len() / n;
        assert!(out.len() == rows * n, "panels: whole output rows");
        if rows == 0 {
            return;
        }
        assert!(
            lhs_cs == 1 && (first + rows - 1) * lhs_rs + k <= lhs.len(),
            "panels: left operand out of bounds"
        );
        let fits = match start {
            Start::Zero => true,
            Start::Bias(bias) => bias.len() == n,
            Start::Residual(values, bias) => values.len() >= (first + rows) * n && bias.len() == n,
        };
        assert!(fits, "panels: start size");
        // SAFETY: `pack` returned `self` only where the CPU has AVX-512 (on x86-64), and the
        // operands hold what the kernel reads (checked above).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::product(self, first, (lhs, lhs_rs), start, out)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (first, lhs, lhs_rs, start);
            unreachable!("panels are packed on x86-64 only")
        }
    }
}

/// The columns of the panel from column `first` on, and its width in the packing.
fn panel_width(n: usize, first: usize) -> (usize, usize) {
    let width = (n - first).min(PANEL);
    (width, width.next_multiple_of(16))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::{PANEL, Panels, Start, panel_width};

    /// Rows per register tile.
    const TILE_ROWS: usize = 6;
    /// Inner-axis steps per pass over a panel, at most: 128 panel rows are 32 KiB, which stay
    /// in a core's L1 data cache (48 KiB on the Xeon and on Zen 5) while every tile uses them.
    const DEPTH: usize = 128;

    /// Where one register tile reads and writes: its first row of the left operand (at the
    /// pass's first inner index), of the output and of a residual start, all `R` rows at
    /// their strides.
    struct Tile {
        lhs: *const f32,
        lhs_rs: usize,
        out: *mut f32,
        n: usize,
        /// The start, or `None` on a later pass (the tile adds to what `out` holds).
        start: Option<TileStart>,
    }

    #[derive(Clone, Copy)]
    enum TileStart {
        Zero,
        /// The bias at the panel's first column.
        Bias(*const f32),
        /// The residual rows at the tile's first row and the panel's first column, and the bias.
        Residual(*const f32, *const f32),
    }

    /// See [`Panels::product_rows`]: panel by panel, in passes of up to [`DEPTH`] inner
    /// indices (split evenly), every row tile of `out` per pass.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, and the operands and start hold what
    /// [`Panels::product_rows`] checks.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product(
        panels: &Panels,
        first: usize,
        (lhs, lhs_rs): (&[f32], usize),
        start: Start,
        out: &mut [MaybeUninit<f32>],
    ) {
        let (k, n) = (panels.k, panels.n);
        let rows = out.len() / n;
        let passes = k.div_ceil(DEPTH);
        let depth = k.div_ceil(passes);
        let (lhs, out) = (
            // SAFETY: the caller's contract (row `first` on exists).
            unsafe { lhs.as_ptr().add(first * lhs_rs) },
            out.as_mut_ptr().cast::<f32>(),
        );
        let mut panel = panels.values.as_ptr();
        for col in (0..n).step_by(PANEL) {
            let (width, wide) = panel_width(n, col);
            let masks: [__mmask16; 4] = std::array::from_fn(|v| {
                ((1u64 << width.saturating_sub(16 * v).min(16)) - 1) as __mmask16
            });
            for at in (0..k).step_by(depth) {
                let steps = depth.min(k - at);
                // SAFETY: the panel holds `k` rows of `wide` values.
                let b = unsafe { panel.add(at * wide) };
                let mut i = 0;
                while i < rows {
                    let r = (rows - i).min(TILE_ROWS);
                    // SAFETY (all three): row `first + i + r − 1` and inner index
                    // `at + steps − 1` lie inside the operands (the caller's contract).
                    let tile = Tile {
                        lhs: unsafe { lhs.add(i * lhs_rs + at) },
                        lhs_rs,
                        out: unsafe { out.add(i * n + col) },
                        n,
                        start: (at == 0).then(|| match start {
                            Start::Zero => TileStart::Zero,
                            Start::Bias(bias) => TileStart::Bias(bias[col..].as_ptr()),
                            Start::Residual(values, bias) => TileStart::Residual(
                                values[(first + i) * n + col..].as_ptr(),
                                bias[col..].as_ptr(),
                            ),
                        }),
                    };
                    // SAFETY: `tile` covers rows of `out`, the panel columns `masks` allow.
                    unsafe { tile_by_rows(r, wide / 16, &tile, b, steps, masks) };
                    i += r;
                }
            }
            // SAFETY: the next panel, or the end of the packing.
            panel = unsafe { panel.add(k * wide) };
        }
    }

    /// [`tile`] for `r ≤ 6` rows and `vectors ≤ 4` vectors of columns.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_by_rows(
        r: usize,
        vectors: usize,
        t: &Tile,
        b: *const f32,
        steps: usize,
        masks: [__mmask16; 4],
    ) {
        macro_rules! by_vectors {
            ($r:literal) => {
                // SAFETY: as the caller's.
                unsafe {
                    match vectors {
                        4 => tile::<$r, 4>(t, b, steps, masks),
                        3 => tile::<$r, 3>(t, b, steps, masks),
                        2 => tile::<$r, 2>(t, b, steps, masks),
                        _ => tile::<$r, 1>(t, b, steps, masks),
                    }
                }
            };
        }
        match r {
            6 => by_vectors!(6),
            5 => by_vectors!(5),
            4 => by_vectors!(4),
            3 => by_vectors!(3),
            2 => by_vectors!(2),
            _ => by_vectors!(1),
        }
    }

    /// `R` rows × `V` vectors of the output: from the start (or from `out`), plus `steps`
    /// inner indices of the left operand times the panel rows from `b` on (`16·V` wide).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize, const V: usize>(
        t: &Tile,
        b: *const f32,
        steps: usize,
        masks: [__mmask16; 4],
    ) {
        // SAFETY (every load and store): rows `< R` of the tile, columns under `masks[v]`
        // (inside `n`) or, in the panel, `< 16·V` (its packed width).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            for (r, row) in acc.iter_mut().enumerate() {
                let load =
                    |at: *const f32, v: usize| _mm512_maskz_loadu_ps(masks[v], at.add(16 * v));
                for (v, acc) in row.iter_mut().enumerate() {
                    *acc = match t.start {
                        None => load(t.out.add(r * t.n), v),
                        Some(TileStart::Zero) => _mm512_setzero_ps(),
                        Some(TileStart::Bias(bias)) => load(bias, v),
                        Some(TileStart::Residual(values, bias)) => {
                            _mm512_add_ps(load(values.add(r * t.n), v), load(bias, v))
                        }
                    };
                }
            }
            for p in 0..steps {
                let row: [__m512; V] =
                    std::array::from_fn(|v| _mm512_loadu_ps(b.add((p * V + v) * 16)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*t.lhs.add(r * t.lhs_rs + p));
                    for (acc, &b) in acc.iter_mut().zip(&row) {
                        *acc = _mm512_fmadd_ps(a, b, *acc);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (v, &acc) in acc.iter().enumerate() {
                    _mm512_mask_storeu_ps(t.out.add(r * t.n + 16 * v), masks[v], acc);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tile (6 rows down to 1; 4 vectors of columns down to 1, with masked tails), one
    /// pass and several (`k` past 128), each start, a block of rows from the middle of a
    /// left operand whose rows are longer than `k`, and a strided (transposed) right operand,
    /// against sums in f64; and the cases the kernel leaves to the gemm crate.
    #[test]
    fn panel_products_match_direct_sums() {
        let value = |i: usize, salt: usize| ((i * 37 + salt) % 29) as f32 / 14.0 - 1.0;
        if VectorPath::active() != VectorPath::Avx512 {
            let b = vec![1.0; 64];
            assert!(Panels::pack([LEAST_ROWS, 8, 8], (&b, 8, 1)).is_none());
            eprintln!("no AVX-512 here: the gemm crate runs every product");
            return;
        }
        let m = LEAST_ROWS;
        for [k, n] in [
            [1, 5],
            [7, 16],
            [33, 40],
            [5, 50],
            [64, 64],
            [129, 17],
            [70, 176],
            [300, 130],
            [256, 1024],
        ] {
            let lhs_rs = k + 3;
            let lhs: Vec<f32> = (0..m * lhs_rs).map(|i| value(i, 1)).collect();
            let b: Vec<f32> = (0..k * n).map(|i| value(i, 2)).collect();
            // The same matrix stored transposed ([n, k]), read at strides (1, k).
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let bias: Vec<f32> = (0..n).map(|i| value(i, 3)).collect();
            let residual: Vec<f32> = (0..m * n).map(|i| value(i, 4)).collect();
            for (rhs, rs, cs) in [(&b, n, 1), (&bt, 1, k)] {
                let panels = Panels::pack([m, k, n], (rhs, rs, cs)).expect("packed");
                // Tiles of 6 and 1, 6, 6 and 3, 6 and 4, 2, 1, 6 and 5 rows.
                let blocks = [(0, 13), (40, 6), (100, 15), (120, 10), (200, 2), (230, 1)];
                for (first, rows) in blocks.into_iter().chain([(m - 11, 11)]) {
                    for (which, name) in ["zero", "bias", "residual"].into_iter().enumerate() {
                        let start = match which {
                            0 => Start::Zero,
                            1 => Start::Bias(&bias),
                            _ => Start::Residual(&residual, &bias),
                        };
                        let mut out = vec![MaybeUninit::new(f32::NAN); rows * n];
                        panels.product_rows(first, (&lhs, lhs_rs, 1), start, &mut out);
                        for (at, got) in out.iter().enumerate() {
                            let (i, j) = (first + at / n, at % n);
                            let want = (0..k)
                                .map(|l| lhs[i * lhs_rs + l] as f64 * b[l * n + j] as f64)
                                .sum::<f64>()
                                + match start {
                                    Start::Zero => 0.0,
                                    Start::Bias(_) => bias[j] as f64,
                                    Start::Residual(..) => (residual[i * n + j] + bias[j]) as f64,
                                };
                            // SAFETY: the kernel wrote every value (NaN if it did not).
                            let got = unsafe { got.assume_init() } as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                                "[{k}, {n}], row {i}, column {j}, {name}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
        let b = vec![1.0; 2048 * 256];
        for ([m, k, n], why) in [
            ([m - 1, 64, 64], "too few rows"),
            ([m, 2048, 256], "a weight too large"),
            ([m, 0, 8], "an empty inner axis"),
        ] {
            assert!(Panels::pack([m, k, n], (&b, n, 1)).is_none(), "{why}");
        }
    }
}
