//! The CPU modes of `clue::cpu`. Flushing denormals to zero: the bits reach rayon's pool and
//! threads created afterwards, results stay within tolerance of the unflushed run, a flushed run
//! stores no denormal weight, gradient or AdamW moment, and an unflushed Flex step makes none.
//! The vector path of clue's Flex kernels: each one the CPU has trains to the same losses, and so
//! do steps driven from rayon's pool and from the calling thread. Its own
//! test binary, since the bits are process-wide state; the tests here take a lock so that they
//! do not see each other's.
// Linux: a new thread inherits its creator's floating-point bits there (tested below).
#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use std::hint::black_box;
use std::sync::Mutex;

use burn::backend::Autodiff;
use burn::backend::NdArray;
use burn::backend::flex::Flex;
use burn::tensor::backend::AutodiffBackend;
use clue::bench::{BenchOptions, BenchReport, bench, preset};
use clue::cpu::{clear_fp_flags, flushes_denormals, flushes_denormals_everywhere, fp_flags};

static CPU_STATE: Mutex<()> = Mutex::new(());

/// A denormal result, inexact (so the underflow flag is raised): the smallest normal float / 3.
fn tiny() -> f32 {
    black_box(f32::MIN_POSITIVE) / black_box(3.0)
}

fn set(on: bool) {
    assert!(clue::cpu::set_flush_denormals(on), "x86-64 has the switch");
}

#[test]
fn flushing_reaches_the_pool_and_threads_created_afterwards() {
    let _lock = CPU_STATE.lock().unwrap_or_else(|e| e.into_inner());
    set(true);
    assert!(flushes_denormals_everywhere().iter().all(|&b| b));
    assert_eq!(tiny(), 0.0);
    assert!(rayon::broadcast(|_| tiny()).iter().all(|&v| v == 0.0));
    let spawned = std::thread::spawn(|| (flushes_denormals(), tiny()))
        .join()
        .unwrap();
    assert_eq!(spawned, (true, 0.0));

    set(false);
    assert!(flushes_denormals_everywhere().iter().all(|&b| !b));
    assert!(tiny().is_subnormal());
    assert!(
        rayon::broadcast(|_| tiny())
            .iter()
            .all(|v| v.is_subnormal())
    );
    let spawned = std::thread::spawn(|| tiny().is_subnormal()).join().unwrap();
    assert!(spawned);
}

#[test]
fn the_sticky_flags_see_a_denormal_in_any_pool_thread() {
    let _lock = CPU_STATE.lock().unwrap_or_else(|e| e.into_inner());
    set(false);
    clear_fp_flags();
    let before = fp_flags();
    assert!(!before.underflow && !before.denormal_operand);
    // Only the pool's last thread makes one (and then reads it).
    let n = rayon::current_num_threads();
    rayon::broadcast(|c| {
        if c.index() == n - 1 {
            black_box(tiny() * black_box(2.0));
        }
    });
    let after = fp_flags();
    assert!(after.underflow, "the division underflowed");
    assert!(after.denormal_operand, "the product read a denormal");
    clear_fp_flags();
    assert!(!fp_flags().underflow);
}

fn tiny_bench<B: AutodiffBackend>(backend: &str) -> BenchReport {
    let p = preset("tiny").unwrap();
    let options = BenchOptions {
        steps: 2,
        warmup: 1,
        denormal_census: true,
        grad_cache: 0,
        workers: 1,
    };
    bench::<B>(Default::default(), &p, options, backend)
}

/// The same training run kept and flushed: the same losses (within 1e-4).
fn kept_and_flushed<B: AutodiffBackend>(backend: &str) -> (BenchReport, BenchReport) {
    set(false);
    let kept = tiny_bench::<B>(backend);
    set(true);
    let flushed = tiny_bench::<B>(backend);
    set(false);
    assert!(!kept.cpu.flush_denormals && flushed.cpu.flush_denormals);
    for (a, b) in [
        (kept.loss_first, flushed.loss_first),
        (kept.loss_last, flushed.loss_last),
    ] {
        assert!(
            a.is_finite() && (a - b).abs() <= 1e-4 * a.abs(),
            "{backend}: {a} vs {b}"
        );
    }
    (kept, flushed)
}

#[test]
fn flushing_on_ndarray_where_denormals_occur_keeps_the_losses() {
    let _lock = CPU_STATE.lock().unwrap_or_else(|e| e.into_inner());
    let (kept, _) = kept_and_flushed::<Autodiff<NdArray>>("ndarray");
    // The comparison means something only if the unflushed run met denormals.
    let k = kept.denormals.expect("census requested");
    assert!(
        k.train_step.denormal_operand,
        "the unflushed ndarray step met no denormal: this test no longer compares anything"
    );
}

#[test]
fn flex_stores_no_denormal_when_flushed_and_makes_none_when_not() {
    let _lock = CPU_STATE.lock().unwrap_or_else(|e| e.into_inner());
    let (kept, flushed) = kept_and_flushed::<Autodiff<Flex>>("flex");
    // Unflushed, clue's Flex kernels make none either on this run: a masked key's attention
    // weight is exactly 0 (it was e^-87, whose products with the values were denormal in every
    // attention call).
    let k = kept.denormals.expect("census requested");
    assert!(!k.forward.denormal_operand && !k.forward.underflow);
    assert!(!k.train_step.denormal_operand && !k.train_step.underflow);
    let c = flushed.denormals.expect("census requested");
    for (what, share) in [
        ("weights", c.weights),
        ("gradients", c.gradients),
        ("AdamW m", c.adam_moment1),
        ("AdamW v", c.adam_moment2),
    ] {
        assert!(share.total > 0, "{what}: nothing counted");
        assert_eq!(share.denormal, 0, "{what}: denormals stored while flushing");
    }
}

/// `clue [flag] bench --preset tiny --backend flex --steps <steps> --json`, with the environment
/// variable `var` set to its value, or unset; the report.
fn bench_json(
    flag: Option<&str>,
    steps: usize,
    (var, value): (&str, Option<&str>),
) -> serde_json::Value {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_clue"));
    cmd.args(flag)
        .args(["--quiet", "bench", "--preset", "tiny", "--backend", "flex"])
        .args(["--steps", &steps.to_string(), "--warmup", "0", "--json"])
        .env_remove(var);
    if let Some(v) = value {
        cmd.env(var, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_binary_flushes_by_default_and_keeps_on_request() {
    let run =
        |flag: Option<&str>, env: Option<&str>| bench_json(flag, 1, ("CLUE_KEEP_DENORMALS", env));
    let flushed = |r: &serde_json::Value| r["cpu"]["flush_denormals"].as_bool().unwrap();
    let default = run(None, None);
    assert!(flushed(&default));
    assert!(default["matmul_peak"]["gflops_per_s"].as_f64().unwrap() > 0.0);
    assert!(!default["cpu"]["model"].as_str().unwrap().is_empty());
    assert!(!flushed(&run(Some("--keep-denormals"), None)));
    assert!(!flushed(&run(None, Some("1"))));
    assert!(flushed(&run(None, Some("0"))));
}

#[test]
fn every_vector_path_trains_to_the_same_losses() {
    let run = |path: Option<&str>| bench_json(None, 3, ("CLUE_VECTOR_PATH", path));
    let best = clue::cpu::VectorPath::detect();
    let default = run(None);
    assert_eq!(default["cpu"]["kernels"], best.name());
    let loss = |r: &serde_json::Value, which: &str| r[which].as_f64().unwrap();
    for (asked, name) in [("avx2", "avx2+fma"), ("portable", "portable")] {
        let r = run(Some(asked));
        // A path the CPU lacks is never taken: the best one it has below the asked one.
        let expect = if best == clue::cpu::VectorPath::Portable {
            "portable"
        } else {
            name
        };
        assert_eq!(r["cpu"]["kernels"], expect, "CLUE_VECTOR_PATH={asked}");
        for which in ["loss_first", "loss_last"] {
            let (a, b) = (loss(&default, which), loss(&r, which));
            assert!(
                (a - b).abs() <= 1e-4 * a.abs(),
                "{asked}: {which} {b} vs {a} on {}",
                best.name()
            );
        }
    }
    let odd = run(Some("sse9"));
    assert_eq!(
        odd["cpu"]["kernels"],
        best.name(),
        "an unknown path is ignored"
    );
}

#[test]
fn driving_from_the_pool_keeps_the_losses() {
    let pool = bench_json(None, 3, ("CLUE_DRIVE_FROM_POOL", None));
    let caller = bench_json(None, 3, ("CLUE_DRIVE_FROM_POOL", Some("0")));
    for which in ["loss_first", "loss_last"] {
        let (a, b) = (
            pool[which].as_f64().unwrap(),
            caller[which].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-6 * a.abs(),
            "{which}: {a} on the pool, {b} on the calling thread"
        );
    }
}
