//! Terminal output shared by every command: verbosity and progress bars.

use std::sync::atomic::{AtomicU8, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

static VERBOSITY: AtomicU8 = AtomicU8::new(1);

/// 0 = quiet (errors only), 1 = normal, 2 = verbose.
pub fn set_verbosity(level: u8) {
    VERBOSITY.store(level, Ordering::Relaxed);
}

pub fn verbosity() -> u8 {
    VERBOSITY.load(Ordering::Relaxed)
}

/// Print a line of normal output (summaries); silent under `--quiet`.
pub fn say(line: impl AsRef<str>) {
    if verbosity() >= 1 {
        println!("{}", line.as_ref());
    }
}

/// Print a detail line, shown only under `--verbose`.
pub fn detail(line: impl AsRef<str>) {
    if verbosity() >= 2 {
        eprintln!("{}", line.as_ref());
    }
}

/// A progress bar over `len` units (bytes when `bytes`); hidden under `--quiet` and when stderr is
/// not a terminal (indicatif draws nothing there).
pub fn bar(len: u64, message: &str, bytes: bool) -> ProgressBar {
    if verbosity() == 0 {
        return ProgressBar::hidden();
    }
    let template = if bytes {
        "{msg:>10} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})"
    } else {
        "{msg:>10} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})"
    };
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// A spinner with a message and the elapsed time, redrawn every 200 ms even while the calling
/// thread is busy; hidden like [`bar`].
pub fn spinner() -> ProgressBar {
    if verbosity() == 0 {
        return ProgressBar::hidden();
    }
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("static template"),
    );
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    spinner
}

/// Render rows of (label, value) as an aligned two-column table.
pub fn table(title: &str, rows: &[(String, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!("{title}\n");
    for (k, v) in rows {
        out.push_str(&format!("  {k:<width$}  {v}\n"));
    }
    out
}
