//! Helpers shared by the library's unit tests.

/// The largest `|a − b|` over two slices of the same length; a NaN counts as an infinite
/// difference (`f32::max` would drop it).
pub(crate) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "max_diff: slices of different lengths");
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}
