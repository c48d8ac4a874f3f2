//! The GPU runtime's set-up, shared by every command on `wgpu` and `cuda`: CubeCL's compiled
//! kernels kept on disk, and a count of the kernels it compiles and the autotune keys it tunes
//! (what `clue fit` shows while it warms up, and what `clue bench -v` prints per step).
//!
//! CubeCL reports each compilation and each tuned key to its loggers; clue points the two
//! loggers at files of its own process (unless a `cubecl.toml` configures them, or
//! `CLUE_KERNEL_COUNT=off`) and counts their lines.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The files this process's compilation and autotune loggers write (set by [`configure`]).
static LOGS: OnceLock<Logs> = OnceLock::new();

#[derive(Debug)]
#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
struct Logs {
    compiled: Option<PathBuf>,
    tuned: Option<PathBuf>,
}

/// Kernels compiled and autotune keys tuned by this process so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelWork {
    pub compiled: usize,
    pub tuned: usize,
}

impl KernelWork {
    /// The work done since `earlier`.
    pub fn since(self, earlier: KernelWork) -> KernelWork {
        KernelWork {
            compiled: self.compiled.saturating_sub(earlier.compiled),
            tuned: self.tuned.saturating_sub(earlier.tuned),
        }
    }
}

impl std::fmt::Display for KernelWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = |n: usize| if n == 1 { "" } else { "s" };
        write!(f, "{} kernel{} compiled", self.compiled, s(self.compiled))?;
        if self.tuned > 0 {
            write!(f, ", {} autotune key{} tuned", self.tuned, s(self.tuned))?;
        }
        Ok(())
    }
}

/// What this process has compiled and tuned so far; `None` when nothing counts them (a CPU
/// backend, or a `cubecl.toml` that sends CubeCL's compilation log elsewhere).
pub fn kernel_work() -> Option<KernelWork> {
    let logs = LOGS.get()?;
    let compiled = count_lines(logs.compiled.as_deref()?, "[Compiling kernel]");
    let tuned = logs
        .tuned
        .as_deref()
        .map_or(0, |p| count_lines(p, "Fastest result"));
    Some(KernelWork { compiled, tuned })
}

/// [`kernel_work`] once CubeCL's logger has caught up: CubeCL logs from a task of its own, a
/// moment after the compilation, so this waits until the count has held for half a second
/// (at most 5 s).
pub fn settled_work() -> Option<KernelWork> {
    let start = std::time::Instant::now();
    let mut last = kernel_work()?;
    let mut held = start;
    while held.elapsed().as_millis() < 500 && start.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let now = kernel_work()?;
        if now != last {
            (last, held) = (now, std::time::Instant::now());
        }
    }
    Some(last)
}

/// The kernels this process has compiled so far, by kind ([`by_kind`]); empty where nothing
/// counts them.
fn compiled_by_kind() -> Vec<(String, usize)> {
    let log = LOGS.get().and_then(|l| l.compiled.as_deref());
    log.and_then(|p| std::fs::read_to_string(p).ok())
        .map_or_else(Vec::new, |s| by_kind(&s))
}

/// The `[Compiling kernel] NAME` lines of CubeCL's compilation log counted by the kernel's type,
/// the last segment of NAME's path without its generic arguments (`KernelBinop`,
/// `MatmulEntry`, …): the most frequent first, then by name.
fn by_kind(log: &str) -> Vec<(String, usize)> {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for line in log.lines() {
        let Some(name) = line.strip_prefix("[Compiling kernel]") else {
            continue;
        };
        let path = name.split('<').next().unwrap_or_default();
        let kind = path.rsplit("::").map(str::trim).find(|s| !s.is_empty());
        *counts
            .entry(kind.unwrap_or("unnamed").to_string())
            .or_default() += 1;
    }
    let mut kinds: Vec<_> = counts.into_iter().collect();
    kinds.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    kinds
}

/// `-v`: the kernels compiled so far by kind, on one line, once CubeCL's logger has caught up
/// (nothing where nothing counts them).
pub fn show_kinds() {
    if crate::ui::verbosity() < 2 || settled_work().is_none() {
        return;
    }
    let kinds = compiled_by_kind();
    if !kinds.is_empty() {
        let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        crate::ui::detail(format!("kernels compiled, by kind: {}", list.join(", ")));
    }
}

/// Lines of `path` that start with `prefix` (0 when it cannot be read: nothing logged yet).
fn count_lines(path: &Path, prefix: &str) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().filter(|l| l.starts_with(prefix)).count())
        .unwrap_or(0)
}

/// Removes this process's log files when the command ends (see [`configure`]).
#[derive(Debug)]
#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
pub struct LogFiles(Vec<PathBuf>);

impl Drop for LogFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Configure CubeCL before the first GPU call:
/// - keep compiled kernels on disk so that only the first run on a machine pays for compiling
///   them: the compilation cache goes to `$CLUE_KERNEL_CACHE`, else
///   `$XDG_CACHE_HOME/clue/kernels` or `~/.cache/clue/kernels`, unless a `cubecl.toml` already
///   names one; CubeCL's autotune results go to `<cache>/autotune` unless a `cubecl.toml`
///   names a place other than CubeCL's default (the `target/` of the Cargo project around the
///   working directory, else `~/.cache/cubecl`); the CUDA driver's cache is set apart, at the
///   start of the process ([`point_driver_cache`]);
/// - count compilations and tuned keys ([`kernel_work`]): the two loggers write to
///   `<cache>/logs/{compiled,tuned}-<pid>.log` (removed when the returned value drops, or by a
///   later process once this one is gone) unless a `cubecl.toml` configures them or
///   `CLUE_KERNEL_COUNT=off`. On wgpu, CubeCL then creates its instance with wgpu's debugging
///   flags (Vulkan's validation layer runs where it is installed).
///
/// `CUBECL_*` variables (e.g. `CUBECL_DEBUG_LOG`, `CUBECL_AUTOTUNE_LEVEL`) still apply.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub fn configure() -> LogFiles {
    use cubecl_runtime::config::{
        CubeClRuntimeConfig, RuntimeConfig, autotune::AutotuneLogLevel, cache::CacheConfig,
        compilation::CompilationLogLevel,
    };
    let dir = cache_dir().filter(|d| std::fs::create_dir_all(d).is_ok());
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if let Some(dir) = &dir {
        if config.compilation.cache.is_none() {
            crate::ui::detail(format!("kernel cache: {}", dir.display()));
            config.compilation.cache = Some(CacheConfig::File(dir.clone()));
        }
        // CubeCL's default ("target") is the `target/` of the Cargo project around the working
        // directory, else `~/.cache/cubecl`: a run from inside a project would tune again. The
        // tuner adds `autotune/` itself.
        if matches!(config.autotune.cache, CacheConfig::Target) {
            config.autotune.cache = CacheConfig::File(dir.clone());
        }
    }
    // A log file of this process's own, created (empty) here so that CubeCL's logger, which
    // panics on a file it cannot open, finds it writable. CubeCL opens it once per logger
    // (each device, each tuner), neither truncating nor appending unless told: appending keeps
    // their lines from overwriting each other.
    let logs = dir.unwrap_or_else(std::env::temp_dir).join("logs");
    remove_dead_logs(&logs);
    let pid = std::process::id();
    let own = |name: &str| {
        let path = logs.join(format!("{name}-{pid}.log"));
        let made = std::fs::create_dir_all(&logs).and_then(|()| std::fs::File::create(&path));
        made.is_ok().then_some(path)
    };
    // Counted unless a `cubecl.toml` (or `CUBECL_DEBUG_LOG`) already gives a logger a sink.
    let count = std::env::var("CLUE_KERNEL_COUNT").map_or(true, |v| v != "off");
    let c = &mut config.compilation.logger;
    let compiled = match count && no_sink(&c.file, c.stdout || c.stderr || c.log.is_some()) {
        true => own("compiled").inspect(|p| {
            (c.level, c.file, c.append) = (CompilationLogLevel::Basic, Some(p.clone()), true);
        }),
        false => None,
    };
    let a = &mut config.autotune.logger;
    let tuned = match no_sink(&a.file, a.stdout || a.stderr || a.log.is_some()) {
        true if compiled.is_some() => own("tuned").inspect(|p| {
            (a.level, a.file, a.append) = (AutotuneLogLevel::Minimal, Some(p.clone()), true);
        }),
        _ => None,
    };
    CubeClRuntimeConfig::set(config);
    let files = compiled.iter().chain(&tuned).cloned().collect();
    let _ = LOGS.set(Logs { compiled, tuned });
    LogFiles(files)
}

/// Where GPU runs keep their caches: `$CLUE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/clue/kernels`
/// or `~/.cache/clue/kernels`.
#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("CLUE_KERNEL_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("clue/kernels"))
        })
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/clue/kernels")))
}

/// Point the CUDA driver's cache into the kernel cache ([`driver_cache`]), unless the
/// environment already sets it.
///
/// # Safety
/// It sets environment variables: no other thread may read or write the environment meanwhile
/// (call it first thing in `main`).
#[cfg(feature = "cuda")]
pub unsafe fn point_driver_cache() {
    let Some(dir) = cache_dir() else { return };
    for (name, value) in driver_cache(&dir, |v| std::env::var_os(v).is_some()) {
        // SAFETY: the caller's promise, above.
        unsafe { std::env::set_var(name, value) };
    }
}

/// The CUDA driver's cache of the machine code it builds from the PTX that CubeCL compiles
/// (CubeCL's kernel cache holds PTX, so a new process still waits for the driver unless its
/// cache hits): those of its two variables that `is_set` says are not set already,
/// `CUDA_CACHE_PATH` in `<dir>/cuda-driver` (instead of `~/.nv`, so that one directory keeps
/// every cache of a machine or a container; CubeCL's own PTX is in `<dir>/cuda`) and
/// `CUDA_CACHE_MAXSIZE` at the driver's largest, 4 GiB.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn driver_cache(dir: &Path, is_set: impl Fn(&str) -> bool) -> Vec<(&'static str, OsString)> {
    [
        ("CUDA_CACHE_PATH", dir.join("cuda-driver").into_os_string()),
        ("CUDA_CACHE_MAXSIZE", OsString::from("4294967296")),
    ]
    .into_iter()
    .filter(|(name, _)| !is_set(name))
    .collect()
}

/// A CubeCL logger with no file and no other output.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn no_sink(file: &Option<PathBuf>, elsewhere: bool) -> bool {
    file.is_none() && !elsewhere
}

/// Remove the kernel logs of processes that are gone (killed before they could).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn remove_dead_logs(logs: &Path) {
    let Ok(entries) = std::fs::read_dir(logs) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_suffix(".log")
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok());
        if pid.is_some_and(|p| !crate::data::store::process_alive(p)) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_kernels_are_counted_by_their_type() {
        let log = "[Compiling kernel] burn_cubecl::kernel::binary::kernel_binop::KernelBinop\n\
            [Compiling kernel] burn_cubecl::kernel::binary::kernel_binop::KernelBinop\n\
            [Compiling kernel] cubek_matmul::components::matmul_entry::MatmulEntry\n\
            [Compiling kernel] FullKernel<f32>\n\
            [Compiling kernel] burn_cubecl::ops::tensor::\n\
            [Compiling kernel]\n\
            Fastest result: not a compilation\n";
        let kinds = by_kind(log);
        let expected = [
            ("KernelBinop", 2),
            ("FullKernel", 1),
            ("MatmulEntry", 1),
            ("tensor", 1),
            ("unnamed", 1),
        ];
        let expected: Vec<(String, usize)> =
            expected.iter().map(|(k, n)| (k.to_string(), *n)).collect();
        assert_eq!(kinds, expected);
        assert!(by_kind("").is_empty());
    }

    #[test]
    fn the_driver_cache_goes_next_to_the_kernels_unless_the_environment_says_otherwise() {
        let dir = Path::new("/cache/clue/kernels");
        let none = driver_cache(dir, |_| false);
        assert_eq!(
            none,
            [
                (
                    "CUDA_CACHE_PATH",
                    OsString::from("/cache/clue/kernels/cuda-driver")
                ),
                ("CUDA_CACHE_MAXSIZE", OsString::from("4294967296")),
            ]
        );
        let path_set = driver_cache(dir, |v| v == "CUDA_CACHE_PATH");
        assert_eq!(path_set, [none[1].clone()]);
        assert!(driver_cache(dir, |_| true).is_empty());
    }
}
