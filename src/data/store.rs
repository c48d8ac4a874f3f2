//! The prepared dataset on disk: little-endian arrays, `tokenizer.json` and a JSON manifest.
//!
//! | file | type | shape |
//! |---|---|---|
//! | `items.tokens.u32` | token ids of all items, concatenated | `[tokens]` |
//! | `items.offsets.u64` | item i's tokens are `tokens[off[i]..off[i+1]]` | `[items + 1]` |
//! | `items.service.u8` | service index of each item | `[items]` |
//! | `seqs.items.u32` | item indices, per user and service, oldest first | `[behaviours]` |
//! | `seqs.offsets.u64` | user u, service s is `seqs[off[u·S+s]..off[u·S+s+1]]` | `[users·S + 1]` |
//! | `users.split.u8` | 0 train, 1 valid, 2 test | `[users]` |
//! | `users.json` | user ids, in row order | `[users]` |
//!
//! Arrays are memory-mapped when read, so opening a dataset costs almost nothing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::options::{Dropped, PrepareOptions};
use crate::data::tokenize::ItemTokenizer;
use crate::error::{ClueError, Result};
use crate::ui;

pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const TOKENIZER: &str = "tokenizer.json";

/// Which part of the user split a user belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train = 0,
    Valid = 1,
    Test = 2,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitInfo {
    pub seed: u64,
    pub valid_fraction: f64,
    pub test_fraction: f64,
    pub train: u64,
    pub valid: u64,
    pub test: u64,
}

/// Everything about a prepared dataset that is not a big array. Deterministic: no times, no paths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub services: Vec<String>,
    pub users: u64,
    pub items: u64,
    pub tokens: u64,
    pub behaviors: u64,
    pub behaviors_per_service: Vec<u64>,
    pub items_per_service: Vec<u64>,
    pub vocab_size: u64,
    pub id_offset: u32,
    pub service_token_ids: Vec<u32>,
    /// `item_token_histogram[n]` = items with n tokens (prefix included).
    pub item_token_histogram: Vec<u64>,
    pub rows_read: u64,
    pub bad_rows: u64,
    pub rows_other_services: u64,
    pub duplicates_removed: u64,
    pub users_seen: u64,
    pub users_dropped: Dropped,
    pub split: SplitInfo,
    pub options: PrepareOptions,
    pub tokenizer_sha256: String,
    /// SHA-256 of every data file.
    pub files: BTreeMap<String, String>,
}

impl Manifest {
    /// SHA-256 of the manifest itself: names this exact dataset (recorded in model bundles).
    pub fn hash(&self) -> String {
        hex(&Sha256::digest(
            serde_json::to_vec(self).expect("manifest serialises"),
        ))
    }
}

/// The big arrays of a dataset, borrowed for writing.
pub struct Arrays<'a> {
    pub item_tokens: &'a [u32],
    pub item_offsets: &'a [u64],
    pub item_services: &'a [u8],
    pub seq_items: &'a [u32],
    pub seq_offsets: &'a [u64],
    pub split: &'a [u8],
    pub user_ids: &'a [&'a str],
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_file(
    dir: &Path,
    name: &str,
    bytes: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let path = dir.join(name);
    let file = File::create(&path).map_err(|e| ClueError::io(&path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    bytes(&mut w)
        .and_then(|_| w.flush())
        .map_err(|e| ClueError::io(&path, e))
}

fn write_u32s(w: &mut dyn Write, xs: &[u32]) -> std::io::Result<()> {
    xs.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
}

fn write_u64s(w: &mut dyn Write, xs: &[u64]) -> std::io::Result<()> {
    xs.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
}

/// Write `bytes` to `path` through a temporary file and a rename: readers see the old file or
/// the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| ClueError::io(dir, e))?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    if let (Some(dir), Some(stem)) = (tmp.parent(), path.file_stem()) {
        remove_stale(dir, &stem.to_string_lossy(), false);
    }
    let result = std::fs::write(&tmp, bytes)
        .map_err(|e| ClueError::io(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| ClueError::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Whether process `pid` still runs (Linux: `/proc/PID`; elsewhere every process is assumed
/// to, so nothing is cleaned).
pub(crate) fn process_alive(pid: u32) -> bool {
    !cfg!(target_os = "linux") || Path::new(&format!("/proc/{pid}")).exists()
}

/// What clue processes that died (a kill, a power cut) left in `dir` while writing `<base>`:
/// each path, and whether it is a replaced output `<base>.old-PID` rather than a temporary
/// `<base>.tmp-PID`.
fn dead_leftovers(dir: &Path, base: &str) -> Vec<(PathBuf, bool)> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let rest = name.to_str()?.strip_prefix(base)?;
            let (old, pid) = match rest.strip_prefix(".tmp-") {
                Some(pid) => (false, pid),
                None => (true, rest.strip_prefix(".old-")?),
            };
            let pid: u32 = pid.parse().ok()?;
            (pid != std::process::id() && !process_alive(pid)).then(|| (entry.path(), old))
        })
        .collect()
}

/// Remove the temporary files or directories dead writers of `<base>` left in `dir` (with
/// `old`, their replaced outputs too). Best effort: what cannot be removed stays.
fn remove_stale(dir: &Path, base: &str, old: bool) {
    for (path, is_old) in dead_leftovers(dir, base) {
        if old || !is_old {
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

/// `.<name>.old-PID` beside `out`: where [`publish_dir`] moves the output it replaces.
fn old_dir(out: &Path, pid: u32) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().to_string());
    out.with_file_name(format!(".{}.old-{pid}", name.unwrap_or_default()))
}

/// A process killed between [`publish_dir`]'s two renames left no `out`, and the old output
/// under `.<name>.old-PID`: put it back.
fn restore_replaced(out: &Path) {
    let (Some(parent), Some(name)) = (out.parent(), out.file_name()) else {
        return;
    };
    if out.exists() {
        return;
    }
    let base = format!(".{}", name.to_string_lossy());
    if let Some((old, _)) = dead_leftovers(parent, &base).into_iter().find(|(_, o)| *o) {
        let _ = std::fs::rename(old, out);
    }
}

/// Hold the OS lock on `lock` (created if missing; released when the returned file is dropped
/// or the process ends, also by a kill) for a `clue <command>` writing `target`; "PID command"
/// goes in the file. A second writer fails naming the first one's command and PID.
pub fn hold_lock(lock: &Path, target: &Path, command: &str) -> Result<File> {
    if let Some(dir) = lock.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| ClueError::io(dir, e))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(lock)
        .map_err(|e| ClueError::io(lock, e))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)
                .and_then(|()| {
                    file.write_all(format!("{} {command}", std::process::id()).as_bytes())
                })
                .map_err(|e| ClueError::io(lock, e))?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let held = std::fs::read_to_string(lock).unwrap_or_default();
            Err(ClueError::bad_file(
                target,
                format!("is in use by {}", holder(&held)),
                "wait for it to finish or stop it; two writers cannot share an output",
            ))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(ClueError::io(lock, e)),
    }
}

/// Who holds a lock, from its file's "PID command" (a bare PID: an older clue; empty: a
/// writer that has not written it yet).
fn holder(held: &str) -> String {
    match held.trim().split_once(' ') {
        Some((pid, command)) => format!("clue {} (PID {pid})", command.trim()),
        None if held.trim().is_empty() => "another clue".to_string(),
        None => format!("another clue (PID {})", held.trim()),
    }
}

/// The lock on an output ([`lock_output`]); its file is removed when the lock is dropped.
pub struct OutputLock {
    _file: File,
    path: PathBuf,
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still held: a writer that opened it meanwhile sees it is stale.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// [`hold_lock`] on `.<name>.lock` beside the output `out` (a file or a directory), held until
/// the returned guard is dropped.
pub fn lock_output(out: &Path, command: &str) -> Result<OutputLock> {
    let name = out.file_name().map(|n| n.to_string_lossy().to_string());
    let path = out.with_file_name(format!(".{}.lock", name.unwrap_or_default()));
    for _ in 0..8 {
        let file = hold_lock(&path, out, command)?;
        // The holder before us may have removed the file between our open and our lock: then
        // ours is on a file no later writer finds, so take the lock again on the new one.
        if same_file(&file, &path) {
            return Ok(OutputLock { _file: file, path });
        }
    }
    Err(ClueError::bad_file(
        out,
        format!("cannot hold its lock {}", path.display()),
        "another clue keeps taking it; try again when it is done",
    ))
}

/// Whether the open `file` is the file at `path` now.
fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

/// SHA-256 of a file, read in pieces (datasets can be larger than memory).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| ClueError::io(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| ClueError::io(path, e))?;
    Ok(hex(&hasher.finalize()))
}

/// Make `tmp` the directory `out`, replacing an earlier prepared dataset there. Anything else
/// already at `out` is left alone and refused.
pub fn publish_dir(tmp: &Path, out: &Path, marker: &str) -> Result<()> {
    if out.exists() {
        let non_empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true);
        if non_empty && !out.join(marker).exists() {
            let _ = std::fs::remove_dir_all(tmp);
            return Err(ClueError::bad_file(
                out,
                "exists and is not an output of clue",
                "choose another --out directory, or remove this one",
            ));
        }
        let old = old_dir(out, std::process::id());
        std::fs::rename(out, &old).map_err(|e| ClueError::io(out, e))?;
        std::fs::rename(tmp, out).map_err(|e| ClueError::io(out, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, out).map_err(|e| ClueError::io(out, e))?;
    }
    Ok(())
}

/// A fresh temporary directory beside `out` (same file system, so the final rename is atomic).
pub fn temp_dir_beside(out: &Path) -> Result<PathBuf> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| ClueError::io(&parent, e))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    restore_replaced(out);
    remove_stale(&parent, &format!(".{name}"), true);
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| ClueError::io(&tmp, e))?;
    Ok(tmp)
}

/// Write a dataset atomically: everything goes to a temporary directory that is renamed to `out`.
pub fn write(
    out: &Path,
    mut manifest: Manifest,
    a: &Arrays<'_>,
    tokenizer: &ItemTokenizer,
) -> Result<Manifest> {
    let tmp = temp_dir_beside(out)?;
    let result = (|| {
        write_file(&tmp, "items.tokens.u32", |w| write_u32s(w, a.item_tokens))?;
        write_file(&tmp, "items.offsets.u64", |w| write_u64s(w, a.item_offsets))?;
        write_file(&tmp, "items.service.u8", |w| w.write_all(a.item_services))?;
        write_file(&tmp, "seqs.items.u32", |w| write_u32s(w, a.seq_items))?;
        write_file(&tmp, "seqs.offsets.u64", |w| write_u64s(w, a.seq_offsets))?;
        write_file(&tmp, "users.split.u8", |w| w.write_all(a.split))?;
        write_file(&tmp, "users.json", |w| {
            serde_json::to_writer(w, a.user_ids).map_err(std::io::Error::other)
        })?;
        tokenizer.save(&tmp.join(TOKENIZER))?;
        manifest.tokenizer_sha256 = sha256_file(&tmp.join(TOKENIZER))?;
        for name in DATA_FILES {
            manifest
                .files
                .insert(name.to_string(), sha256_file(&tmp.join(name))?);
        }
        write_file(&tmp, MANIFEST, |w| {
            serde_json::to_writer_pretty(&mut *w, &manifest).map_err(std::io::Error::other)?;
            w.write_all(b"\n")
        })?;
        publish_dir(&tmp, out, MANIFEST)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|_| manifest)
}

const DATA_FILES: [&str; 7] = [
    "items.tokens.u32",
    "items.offsets.u64",
    "items.service.u8",
    "seqs.items.u32",
    "seqs.offsets.u64",
    "users.split.u8",
    "users.json",
];

/// A memory-mapped array of little-endian integers.
struct Array {
    map: Option<Mmap>,
}

impl Array {
    fn open(dir: &Path, name: &str, width: usize, expect: u64) -> Result<Self> {
        let path = dir.join(name);
        let file = File::open(&path).map_err(|e| ClueError::io(&path, e))?;
        let len = file.metadata().map_err(|e| ClueError::io(&path, e))?.len();
        if len != expect * width as u64 {
            return Err(ClueError::bad_file(
                &path,
                format!(
                    "holds {len} bytes, the manifest implies {}",
                    expect * width as u64
                ),
                "the dataset is damaged: run clue prepare again",
            ));
        }
        // Empty files cannot be mapped on every platform.
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the file is opened read-only and a prepared dataset is never modified in
            // place (prepare writes a new directory and renames it).
            Some(unsafe { Mmap::map(&file) }.map_err(|e| ClueError::io(&path, e))?)
        };
        Ok(Self { map })
    }

    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    fn u32(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.bytes()[4 * i..4 * i + 4].try_into().expect("4 bytes"))
    }

    fn u64(&self, i: usize) -> u64 {
        u64::from_le_bytes(self.bytes()[8 * i..8 * i + 8].try_into().expect("8 bytes"))
    }
}

/// A prepared dataset opened for reading.
pub struct PreparedDataset {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub user_ids: Vec<String>,
    item_tokens: Array,
    item_offsets: Array,
    seq_items: Array,
    seq_offsets: Array,
    split: Array,
}

impl PreparedDataset {
    /// Open a prepared dataset. File sizes are always checked against the manifest; with
    /// `verify`, every file's SHA-256 too (a flipped item id or a damaged tokenizer would
    /// otherwise surface as a panic mid-training, or not at all).
    pub fn open(dir: &Path, verify: bool) -> Result<Self> {
        let manifest_path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
            ClueError::bad_file(
                &manifest_path,
                format!("cannot read the manifest ({e})"),
                "point --data at a directory written by `clue prepare`",
            )
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
            ClueError::bad_file(
                &manifest_path,
                format!("not a clue manifest: {e}"),
                "run clue prepare again",
            )
        })?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(ClueError::bad_file(
                &manifest_path,
                format!(
                    "format version {} (this clue reads {FORMAT_VERSION})",
                    manifest.format_version
                ),
                "run clue prepare again with this version",
            ));
        }
        let users_path = dir.join("users.json");
        let user_ids: Vec<String> = serde_json::from_slice(
            &std::fs::read(&users_path).map_err(|e| ClueError::io(&users_path, e))?,
        )
        .map_err(|e| ClueError::bad_file(&users_path, e.to_string(), "run clue prepare again"))?;
        let s = manifest.services.len() as u64;
        let m = &manifest;
        let ds = Self {
            item_tokens: Array::open(dir, "items.tokens.u32", 4, m.tokens)?,
            item_offsets: Array::open(dir, "items.offsets.u64", 8, m.items + 1)?,
            seq_items: Array::open(dir, "seqs.items.u32", 4, m.behaviors)?,
            seq_offsets: Array::open(dir, "seqs.offsets.u64", 8, m.users * s + 1)?,
            split: Array::open(dir, "users.split.u8", 1, m.users)?,
            dir: dir.to_path_buf(),
            user_ids,
            manifest,
        };
        if ds.user_ids.len() as u64 != ds.manifest.users {
            return Err(ClueError::bad_file(
                &users_path,
                "user count differs from the manifest",
                "run clue prepare again",
            ));
        }
        if verify {
            ds.verify()?;
        }
        Ok(ds)
    }

    /// Compare every data file and the tokenizer with the SHA-256 the manifest records.
    fn verify(&self) -> Result<()> {
        let expected = DATA_FILES
            .iter()
            .map(|name| (*name, self.manifest.files.get(*name)))
            .chain([(TOKENIZER, Some(&self.manifest.tokenizer_sha256))]);
        let files: Vec<(&str, Option<&String>)> = expected.collect();
        let bytes: u64 = files
            .iter()
            .filter_map(|(name, _)| std::fs::metadata(self.dir.join(name)).ok())
            .map(|m| m.len())
            .sum();
        let bar = ui::bar(bytes, "verify", true);
        for (name, want) in files {
            let path = self.dir.join(name);
            let got = sha256_file(&path)?;
            bar.inc(std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0));
            if want != Some(&got) {
                bar.finish_and_clear();
                return Err(ClueError::bad_file(
                    &path,
                    "its SHA-256 differs from the one in manifest.json: the file was changed or damaged after `clue prepare`",
                    "run clue prepare again (or pass --no-verify to skip this check, at your own risk)",
                ));
            }
        }
        bar.finish_and_clear();
        Ok(())
    }

    pub fn num_users(&self) -> usize {
        self.manifest.users as usize
    }

    pub fn num_services(&self) -> usize {
        self.manifest.services.len()
    }

    pub fn num_items(&self) -> usize {
        self.manifest.items as usize
    }

    /// Item indices of one user in one service, oldest first.
    pub fn sequence(&self, user: usize, service: usize) -> Vec<u32> {
        let k = user * self.num_services() + service;
        let (a, b) = (
            self.seq_offsets.u64(k) as usize,
            self.seq_offsets.u64(k + 1) as usize,
        );
        (a..b).map(|i| self.seq_items.u32(i)).collect()
    }

    /// Token ids of one item (service prefix first).
    pub fn item_tokens(&self, item: u32) -> Vec<u32> {
        let (a, b) = (
            self.item_offsets.u64(item as usize) as usize,
            self.item_offsets.u64(item as usize + 1) as usize,
        );
        (a..b).map(|i| self.item_tokens.u32(i)).collect()
    }

    pub fn split_of(&self, user: usize) -> Split {
        match self.split.bytes()[user] {
            0 => Split::Train,
            1 => Split::Valid,
            _ => Split::Test,
        }
    }

    /// Users of one split, in row order.
    pub fn users_in(&self, split: Split) -> Vec<u32> {
        (0..self.num_users() as u32)
            .filter(|&u| self.split_of(u as usize) == split)
            .collect()
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(TOKENIZER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a killed writer left (no living PID owns it) is cleaned by the next writer, and an
    /// output moved aside by a publish cut short between its two renames is put back.
    #[cfg(target_os = "linux")]
    #[test]
    fn leftovers_of_dead_writers_are_cleaned_and_a_replaced_output_restored() {
        let dir = tempfile::tempdir().unwrap();
        let dead = 999_999_999; // above Linux's largest PID
        let out = dir.path().join("p");
        let old = old_dir(&out, dead);
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("manifest.json"), "old").unwrap();
        let stale = dir.path().join(format!(".p.tmp-{dead}"));
        std::fs::create_dir(&stale).unwrap();
        let alive = dir.path().join(format!(".p.tmp-{}", std::process::id()));
        let tmp = temp_dir_beside(&out).unwrap();
        assert_eq!(tmp, alive);
        assert!(!stale.exists() && !old.exists());
        assert_eq!(
            std::fs::read_to_string(out.join("manifest.json")).unwrap(),
            "old"
        );

        let file = dir.path().join("emb.users.csv");
        let stale = dir.path().join(format!("emb.users.tmp-{dead}"));
        let other = dir.path().join(format!("emb.tmp-{dead}"));
        std::fs::write(&stale, "x").unwrap();
        std::fs::write(&other, "x").unwrap();
        write_atomic(&file, b"new").unwrap();
        assert!(!stale.exists(), "its own leftover is removed");
        assert!(
            other.exists(),
            "another file's leftover is that writer's to clean"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        let other_name = dir.path().join(format!("emb2.tmp-{dead}"));
        std::fs::write(&other_name, "x").unwrap();
        write_atomic(&dir.path().join("emb.npy"), b"npy").unwrap();
        assert!(!other.exists() && other_name.exists(), "only `emb`'s own");
    }
}
