//! The CPU side of the machine: the floating-point environment every compute thread runs with,
//! what the machine is (model, instruction sets, threads) so that every figure can say
//! where it was measured, and this process's peak resident memory.
//!
//! **Denormals.** Intel cores take a microcode assist, ~100 cycles, for every operation whose
//! operand or result is a denormal (subnormal) float. A training step on `flex` made them in every
//! attention call (masked keys weighted e^-87, times the values; then the backward pass and
//! AdamW's first moment), which made it 2.4× slower on a Sapphire Rapids Xeon; the kernels now
//! give those keys an exact 0, but generic operations (the `ndarray` backend's backward pass,
//! for one) still make some. `clue bench --denormal-census` shows where. x86's
//! MXCSR has two bits that make the hardware treat them as zero instead: FTZ (a denormal result
//! becomes 0) and DAZ (a denormal operand reads as 0). [`set_flush_denormals`] sets both on the
//! calling thread and on every thread of rayon's global pool (where the gemm crate and clue's own
//! kernels run) and of the data-parallel workers' pools (whose threads made later set the bits
//! of the thread that made the pool). Threads created later (data loaders, Burn's learner
//! threads, ndarray's matrix-product pool) inherit the calling thread's bits: on Linux a new
//! thread starts with a copy of its creator's floating-point environment (not so on Windows,
//! where only the calling thread and rayon's pools are set). PyTorch offers the same switch
//! (`torch.set_flush_denormal`); its own kernels avoid the penalty. The values that flush are
//! below 1.2·10⁻³⁸, far under anything a float32 model's result depends on.
//! (Rust and LLVM assume the default environment, so a value the compiler computes at build
//! time can still be denormal; the bits govern what the CPU computes at run time.)
//!
//! Other architectures keep their default environment (the setter says so by returning `false`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use serde::Serialize;

#[cfg(target_arch = "x86_64")]
mod mxcsr {
    /// Flush-to-zero: a denormal result is written as zero.
    pub const FTZ: u32 = 1 << 15;
    /// Denormals-are-zero: a denormal operand is read as zero.
    pub const DAZ: u32 = 1 << 6;
    /// Both: denormals neither made nor read.
    pub const FLUSH: u32 = FTZ | DAZ;
    /// Sticky flag: an operand was denormal.
    pub const DENORMAL_FLAG: u32 = 1 << 1;
    /// Sticky flag: a result underflowed (was tiny and inexact), i.e. came out denormal or zero.
    pub const UNDERFLOW_FLAG: u32 = 1 << 4;

    pub fn get() -> u32 {
        let mut v = 0u32;
        // SAFETY: `stmxcsr` stores the 32-bit MXCSR register at the given address, a valid u32.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut v as *mut u32, options(nostack, preserves_flags));
        }
        v
    }

    pub fn set(v: u32) {
        // SAFETY: `ldmxcsr` loads MXCSR from a valid u32; callers only change the FTZ/DAZ control
        // bits and the sticky status flags, never the exception masks or the rounding mode.
        unsafe {
            std::arch::asm!("ldmxcsr [{}]", in(reg) &v as *const u32, options(nostack, preserves_flags, readonly));
        }
    }
}

/// Whether [`drives_from_pool`]: off unless the program turns it on.
static DRIVE_FROM_POOL: AtomicBool = AtomicBool::new(false);

/// Let the model's work run on rayon's pool ([`on_pool`], through
/// [`crate::backend::BackendKind::drive`]). The `clue` binary turns it on: its commands drive one
/// model at a time. Off by default, for programs (and test binaries) that may run autodiff on
/// other threads at the same time: a pool thread that runs one of their jobs could take up the
/// driven work nested inside it, and Burn's autodiff graph lock, held by that other thread for
/// its backward pass, would then deadlock both.
pub fn set_drive_from_pool(on: bool) {
    DRIVE_FROM_POOL.store(on, Ordering::Relaxed);
}

pub fn drives_from_pool() -> bool {
    DRIVE_FROM_POOL.load(Ordering::Relaxed)
}

/// `f()` on a thread of rayon's global pool, while the calling thread waits (directly on a
/// thread of the pool). Flex runs its matrix products and clue's kernels on that pool: driven
/// from outside it, every parallel operation wakes the pool's threads and puts the driving
/// thread to sleep (three threads on the cores of two, with a hand-off at every operation);
/// driven from inside, the driving thread is one of the pool's and computes its share of each
/// operation, as PyTorch's calling thread does in its OpenMP team.
///
/// One `f` at a time: a pool thread that waits inside one `f` takes up the pool's other jobs
/// (work stealing), and a second `f` would run there nested inside the first, on its thread,
/// where a lock the first holds (Burn's autodiff graph, during a backward pass) deadlocks it.
/// For the same reason no other thread may run autodiff work meanwhile (see
/// [`set_drive_from_pool`]). Called on a thread of a rayon pool, `f` runs right there. A panic
/// in `f` reaches the caller.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    first_thread(rayon::broadcast(on_first_thread(f)))
}

/// A broadcast that runs `f` on the pool's first thread only, so that the work's memory comes
/// from one allocator arena (glibc gives each thread its own, and each keeps what it freed:
/// alternating threads doubled `small`'s peak memory). The other threads take the broadcast,
/// return at once and are free for the work's parallel operations.
fn on_first_thread<R: Send>(
    f: impl FnOnce() -> R + Send,
) -> impl Fn(rayon::BroadcastContext<'_>) -> Option<R> + Sync {
    let f = Mutex::new(Some(f));
    move |thread| {
        let f = (thread.index() == 0).then(|| f.lock().unwrap_or_else(PoisonError::into_inner));
        f.and_then(|mut f| f.take()).map(|f| f())
    }
}

/// The first thread's result of an [`on_first_thread`] broadcast.
fn first_thread<R>(mut results: Vec<Option<R>>) -> R {
    results
        .swap_remove(0)
        .expect("the pool's first thread ran the work")
}

/// `f()` on the first thread of data-parallel worker `k`'s own rayon pool of `threads` threads
/// (made at the first call and kept for the process), while the calling thread waits. Worker
/// threads that drove rayon's global pool from outside it all at once would hand every
/// operation over to the pool's threads, each time waking them (the cost [`on_pool`] removes for
/// one model); in a pool of its own, each worker computes on its share of the cores. The pools
/// are apart, so no worker's job runs nested inside another's.
pub fn on_worker_pool<R: Send>(k: usize, threads: usize, f: impl FnOnce() -> R + Send) -> R {
    let pool = (WORKER_POOLS.lock().unwrap_or_else(PoisonError::into_inner))
        .entry((k, threads))
        .or_insert_with(|| {
            // Its threads flush denormals as this thread does (set, not inherited: on Windows a
            // new thread starts with the default bits).
            let flush = flushes_denormals();
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(move |t| format!("clue-worker-{k}-pool-{t}"))
                .start_handler(move |_| flush_here(flush))
                .build();
            Arc::new(pool.expect("a worker's thread pool"))
        })
        .clone();
    first_thread(pool.broadcast(on_first_thread(f)))
}

/// The data-parallel workers' pools ([`on_worker_pool`]), by worker and number of threads.
static WORKER_POOLS: Mutex<BTreeMap<(usize, usize), Arc<rayon::ThreadPool>>> =
    Mutex::new(BTreeMap::new());

/// Run `f` on the calling thread, on every thread of rayon's global pool (creating the pool if
/// it does not exist yet) and on every thread of the workers' pools made so far; the results,
/// calling thread first. Between steps: a worker's pool busy with a step waits for it.
fn on_every_thread<T: Send>(f: impl Fn() -> T + Sync) -> Vec<T> {
    let mut all = vec![f()];
    all.extend(rayon::broadcast(|_| f()));
    let pools: Vec<_> = (WORKER_POOLS.lock().unwrap_or_else(PoisonError::into_inner))
        .values()
        .cloned()
        .collect();
    for pool in pools {
        all.extend(pool.broadcast(|_| f()));
    }
    all
}

/// Turn the flushing of denormals to zero (FTZ and DAZ) on or off for the calling thread, the
/// threads it creates from now on, rayon's global pool and the workers' pools. Returns whether
/// this CPU has the switch (x86-64); elsewhere it does nothing. Call it before the work starts:
/// threads that already exist outside rayon's pools keep their bits.
pub fn set_flush_denormals(on: bool) -> bool {
    on_every_thread(|| flush_here(on));
    cfg!(target_arch = "x86_64")
}

/// Turn the flushing of denormals on or off for the calling thread (x86-64; elsewhere nothing).
fn flush_here(on: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        let v = mxcsr::get();
        mxcsr::set(if on {
            v | mxcsr::FLUSH
        } else {
            v & !mxcsr::FLUSH
        });
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = on;
}

/// Whether the calling thread flushes denormals (both FTZ and DAZ set).
pub fn flushes_denormals() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        mxcsr::get() & mxcsr::FLUSH == mxcsr::FLUSH
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`flushes_denormals`] on the calling thread, then on each thread of rayon's global pool and
/// of the workers' pools.
pub fn flushes_denormals_everywhere() -> Vec<bool> {
    on_every_thread(flushes_denormals)
}

/// Which denormal events the CPU has seen since [`clear_fp_flags`], on the calling thread or any
/// thread of rayon's pools (x86's sticky MXCSR flags; all false elsewhere).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FpFlags {
    /// Some operation read a denormal operand (the slow case on Intel cores).
    pub denormal_operand: bool,
    /// Some operation's result underflowed (came out denormal, or flushed to zero).
    pub underflow: bool,
}

/// Clear the sticky status flags on the calling thread and rayon's pools (the global pool and
/// the workers').
pub fn clear_fp_flags() {
    #[cfg(target_arch = "x86_64")]
    on_every_thread(|| mxcsr::set(mxcsr::get() & !(mxcsr::DENORMAL_FLAG | mxcsr::UNDERFLOW_FLAG)));
}

/// The sticky status flags since [`clear_fp_flags`], over the calling thread and rayon's pools.
pub fn fp_flags() -> FpFlags {
    #[cfg(target_arch = "x86_64")]
    {
        let all = on_every_thread(mxcsr::get)
            .into_iter()
            .fold(0, |a, v| a | v);
        FpFlags {
            denormal_operand: all & mxcsr::DENORMAL_FLAG != 0,
            underflow: all & mxcsr::UNDERFLOW_FLAG != 0,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    FpFlags::default()
}

/// What the machine is, for every figure measured on it.
#[derive(Debug, Clone, Serialize)]
pub struct CpuInfo {
    /// `model name` from `/proc/cpuinfo` (or the architecture where there is none).
    pub model: String,
    /// The instruction sets clue's CPU code can use here, of those it knows.
    pub isa: Vec<&'static str>,
    /// The vector path clue's own Flex kernels take ([`VectorPath::name`]); the gemm crate picks
    /// its own (AVX-512 where `avx512f` is listed).
    pub kernels: &'static str,
    /// Threads of rayon's global pool (the matrix products and clue's kernels).
    pub threads: usize,
    /// Whether the calling thread and rayon's pool flush denormals to zero.
    pub flush_denormals: bool,
}

impl CpuInfo {
    pub fn detect() -> Self {
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        let isa = detect_isa();
        let kernels = VectorPath::active().name();
        Self {
            model,
            isa,
            kernels,
            threads: rayon::current_num_threads(),
            flush_denormals: flushes_denormals_everywhere().iter().all(|&b| b),
        }
    }

    /// One line: model, instruction sets, threads, denormal mode.
    pub fn line(&self) -> String {
        format!(
            "{}; {}; Flex kernels {}; {} threads; denormals {}",
            self.model,
            if self.isa.is_empty() {
                "no SIMD extensions detected".to_string()
            } else {
                self.isa.join(" ")
            },
            self.kernels,
            self.threads,
            if self.flush_denormals {
                "flushed to zero"
            } else {
                "kept"
            }
        )
    }
}

/// The instruction sets clue's own Flex kernels (attention, GELU) are compiled for, best first;
/// each kernel is built once per path and picks the best one the CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum VectorPath {
    /// AVX-512 (F, VL, BW, DQ) with AVX2 and FMA.
    Avx512,
    /// AVX2 with FMA.
    Avx2Fma,
    /// Whatever the compiler's baseline target offers (SSE2 on x86-64).
    Portable,
}

impl VectorPath {
    /// The best path this CPU runs (cheap: the standard library caches the CPU's features).
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma");
            if avx2 && has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq") {
                return Self::Avx512;
            }
            if avx2 {
                return Self::Avx2Fma;
            }
        }
        Self::Portable
    }

    /// The path the kernels take: [`Self::detect`], or a lower one named by the environment
    /// variable `CLUE_VECTOR_PATH` (`avx512`, `avx2` or `portable`; to compare paths on one
    /// machine). Read once per process.
    pub fn active() -> Self {
        static ACTIVE: OnceLock<VectorPath> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let best = Self::detect();
            let Some(asked) = std::env::var_os("CLUE_VECTOR_PATH") else {
                return best;
            };
            let asked = asked.to_string_lossy().trim().to_ascii_lowercase();
            let path = match asked.as_str() {
                "avx512" => Self::Avx512,
                "avx2" | "avx2+fma" => Self::Avx2Fma,
                "portable" => Self::Portable,
                _ => {
                    eprintln!(
                        "warning: CLUE_VECTOR_PATH={asked:?} is not avx512, avx2 or portable; \
                         using {}",
                        best.name()
                    );
                    return best;
                }
            };
            // Never above what the CPU has (a greater path has fewer instruction sets).
            path.max(best)
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512",
            Self::Avx2Fma => "avx2+fma",
            Self::Portable => "portable",
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_isa() -> Vec<&'static str> {
    use std::arch::is_x86_feature_detected as has;
    [
        ("avx2", has!("avx2")),
        ("fma", has!("fma")),
        ("avx512f", has!("avx512f")),
        ("avx512bf16", has!("avx512bf16")),
    ]
    .into_iter()
    .filter_map(|(name, yes)| yes.then_some(name))
    .collect()
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_isa() -> Vec<&'static str> {
    Vec::new()
}

/// Peak resident memory of this process (Linux `VmHWM`), MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Start a new peak for [`peak_rss_mib`] at the current resident memory (Linux ≥ 4.0:
/// `/proc/self/clear_refs`); false where the kernel does not offer it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn on_pool_runs_on_the_pool_one_at_a_time() {
        assert!(rayon::current_thread_index().is_none(), "a test thread");
        let (index, nested) = on_pool(|| {
            // Called again on the pool: runs in place (the lock is not taken twice).
            let nested = on_pool(rayon::current_thread_index);
            (rayon::current_thread_index(), nested)
        });
        assert!(
            index == Some(0) && index == nested,
            "on the first thread: {index:?}"
        );
        // From several threads at once: each runs on the pool, never two at a time.
        static RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let most = std::thread::scope(|s| {
            let runs: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        on_pool(|| {
                            use std::sync::atomic::Ordering::SeqCst;
                            let now = RUNNING.fetch_add(1, SeqCst) + 1;
                            // Parallel work inside, so the pool's threads go looking for jobs.
                            let sum: u64 = (0..200_000u64).into_par_iter().sum();
                            assert_eq!(sum, 199_999 * 100_000);
                            RUNNING.fetch_sub(1, SeqCst);
                            assert_eq!(rayon::current_thread_index(), Some(0));
                            now
                        })
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).max().unwrap()
        });
        assert_eq!(most, 1, "two closures ran at once");
        // A panic reaches the caller, and the next call still runs.
        let panicked = std::panic::catch_unwind(|| on_pool(|| panic!("in the work")));
        assert!(panicked.is_err());
        assert_eq!(on_pool(|| 7), 7);
    }

    /// Each data-parallel worker computes on a pool of its own, of the size asked, on the same
    /// thread from call to call, apart from rayon's global pool and the other workers' pools.
    #[test]
    fn each_worker_computes_on_a_kept_pool_of_its_own() {
        let on_worker = |k: usize, threads: usize| {
            on_worker_pool(k, threads, move || {
                let sum: u64 = (0..100_000u64).into_par_iter().sum();
                assert_eq!(sum, 99_999 * 50_000);
                let name = std::thread::current().name().map(String::from);
                (
                    name,
                    std::thread::current().id(),
                    rayon::current_num_threads(),
                )
            })
        };
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| on_worker(0, 1));
            let b = s.spawn(|| on_worker(1, 2));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!((a.0.as_deref(), a.2), (Some("clue-worker-0-pool-0"), 1));
        assert_eq!((b.0.as_deref(), b.2), (Some("clue-worker-1-pool-0"), 2));
        let global = on_pool(|| std::thread::current().id());
        assert!(a.1 != b.1 && a.1 != global && b.1 != global);
        assert_eq!(on_worker(0, 1).1, a.1, "worker 0's pool was not kept");
        // A panic reaches the caller, and the pool still serves.
        let panicked = std::panic::catch_unwind(|| on_worker_pool(0, 1, || panic!("in the work")));
        assert!(panicked.is_err());
        assert_eq!(on_worker(0, 1).1, a.1);
    }

    /// The sticky flags are read and cleared on the workers' pools too (`clue bench --workers 2
    /// --denormal-census` reads them there): an underflow made on a worker's pool is seen, then
    /// cleared there.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn fp_flags_cover_the_workers_pools() {
        let underflows_here = || mxcsr::get() & mxcsr::UNDERFLOW_FLAG != 0;
        on_worker_pool(5, 1, || {
            std::hint::black_box(std::hint::black_box(1e-30f32) * std::hint::black_box(1e-30f32));
        });
        assert!(on_worker_pool(5, 1, underflows_here));
        assert!(fp_flags().underflow);
        clear_fp_flags();
        assert!(!on_worker_pool(5, 1, underflows_here), "not cleared there");
    }

    #[test]
    fn cpu_info_names_the_machine() {
        let info = CpuInfo::detect();
        assert!(!info.model.is_empty());
        assert!(info.threads >= 1);
        let line = info.line();
        assert!(line.contains(&info.model) && line.contains(info.kernels));
        // The path taken is the one `active` picks, never above what the CPU has.
        let (best, active) = (VectorPath::detect(), VectorPath::active());
        assert_eq!(info.kernels, active.name());
        assert!(active >= best, "{active:?} above {best:?}");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            info.isa.contains(&"avx2") && info.isa.contains(&"fma"),
            best != VectorPath::Portable
        );
        if best == VectorPath::Avx512 {
            assert!(info.isa.contains(&"avx512f"));
        }
    }
}
