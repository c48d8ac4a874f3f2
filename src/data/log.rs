//! Reading canonical behaviour logs: CSV with header `user_id,service,timestamp,text`.
//!
//! Files are streamed row by row; nothing here keeps rows. Bad rows either stop the read with
//! `file:line: what is wrong` or, with `skip_bad_rows`, are counted by kind.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use crate::error::{ClueError, Result};

/// The four columns of the canonical log, in the order the header names them.
pub const COLUMNS: [&str; 4] = ["user_id", "service", "timestamp", "text"];

/// One behaviour: a user acted on an item (described by `text`) in a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behavior<'a> {
    pub user: &'a str,
    pub service: &'a str,
    /// Unix seconds; `None` when the log leaves it empty (file order is then time order).
    pub timestamp: Option<i64>,
    pub text: &'a str,
}

/// Why a row was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BadRowKind {
    ColumnCount,
    Timestamp,
    EmptyField,
    InvalidUtf8,
}

impl BadRowKind {
    pub const ALL: [BadRowKind; 4] = [
        BadRowKind::ColumnCount,
        BadRowKind::Timestamp,
        BadRowKind::EmptyField,
        BadRowKind::InvalidUtf8,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BadRowKind::ColumnCount => "wrong column count",
            BadRowKind::Timestamp => "unparseable timestamp",
            BadRowKind::EmptyField => "empty user, service or text",
            BadRowKind::InvalidUtf8 => "invalid UTF-8",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            BadRowKind::ColumnCount => {
                "each row needs exactly the header's columns; quote texts that contain commas, or pass --skip-bad-rows"
            }
            BadRowKind::Timestamp => {
                "use Unix seconds (1700000000), RFC 3339 (2023-11-14T22:13:20Z) or leave it empty; or pass --skip-bad-rows"
            }
            BadRowKind::EmptyField => {
                "every row needs a user_id, a service and a text; or pass --skip-bad-rows"
            }
            BadRowKind::InvalidUtf8 => {
                "the file is not UTF-8 (Latin-1?): convert it with `iconv -f latin1 -t utf-8`, or pass --skip-bad-rows"
            }
        }
    }
}

/// Bad rows seen while reading, by kind, with the first few places of each.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BadRows {
    pub counts: [u64; 4],
    /// Up to [`BadRows::KEEP`] `(kind, file, line)` per kind.
    pub first: Vec<(BadRowKind, PathBuf, u64)>,
}

impl BadRows {
    pub const KEEP: usize = 5;

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn count(&self, kind: BadRowKind) -> u64 {
        self.counts[kind as usize]
    }

    fn record(&mut self, kind: BadRowKind, path: &Path, line: u64) {
        self.counts[kind as usize] += 1;
        if self.counts[kind as usize] as usize <= Self::KEEP {
            self.first.push((kind, path.to_path_buf(), line));
        }
    }

    /// One line per kind seen: "3 × invalid UTF-8 (a.csv:4, a.csv:9, ...)".
    pub fn describe(&self) -> Vec<String> {
        BadRowKind::ALL
            .iter()
            .filter(|k| self.count(**k) > 0)
            .map(|&k| {
                let places: Vec<String> = self
                    .first
                    .iter()
                    .filter(|(kind, _, _)| *kind == k)
                    .map(|(_, p, l)| format!("{}:{l}", p.display()))
                    .collect();
                let more = if self.count(k) as usize > places.len() {
                    ", ..."
                } else {
                    ""
                };
                format!(
                    "{} × {} ({}{more})",
                    self.count(k),
                    k.name(),
                    places.join(", ")
                )
            })
            .collect()
    }
}

/// What a read saw.
#[derive(Debug, Default, Clone)]
pub struct ReadStats {
    pub files: usize,
    pub rows: u64,
    pub bytes: u64,
    pub bad: BadRows,
}

/// Parse a timestamp: empty → `None`, Unix seconds, or RFC 3339.
pub fn parse_timestamp(field: &str) -> Option<Option<i64>> {
    let field = field.trim();
    if field.is_empty() {
        return Some(None);
    }
    if let Ok(secs) = field.parse::<i64>() {
        return Some(Some(secs));
    }
    chrono::DateTime::parse_from_rfc3339(field)
        .ok()
        .map(|t| Some(t.timestamp()))
}

/// Expand files and directories into the list of log files, sorted for a deterministic order.
/// A directory contributes its `*.csv` files (not recursively).
pub fn list_log_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| ClueError::io(input, e))?;
        if meta.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(input)
                .map_err(|e| ClueError::io(input, e))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("csv")))
                .collect();
            if found.is_empty() {
                return Err(ClueError::bad_file(
                    input,
                    "directory holds no .csv file",
                    "point at the directory that holds the behaviour logs, or name the files",
                ));
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(input.clone());
        }
    }
    if files.is_empty() {
        return Err(ClueError::config(
            "no log file given",
            "name at least one CSV file or directory",
        ));
    }
    Ok(files)
}

/// Total size in bytes of `files` (for progress bars).
pub fn total_bytes(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

/// Stream every good row of `files` to `on_row`, in file order. `on_progress` receives the bytes
/// read so far now and then.
pub fn read_logs(
    files: &[PathBuf],
    skip_bad_rows: bool,
    mut on_row: impl FnMut(Behavior<'_>),
    mut on_progress: impl FnMut(u64),
) -> Result<ReadStats> {
    let mut stats = ReadStats::default();
    for path in files {
        let file = File::open(path).map_err(|e| ClueError::io(path, e))?;
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .has_headers(true)
            .from_reader(BufReader::with_capacity(1 << 20, file));
        let columns = header_columns(path, &mut reader)?;
        let mut record = csv::ByteRecord::new();
        let base = stats.bytes;
        loop {
            match reader.read_byte_record(&mut record) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    let line = e.position().map(|p| p.line()).unwrap_or(0);
                    return Err(ClueError::BadRow {
                        path: path.clone(),
                        line,
                        message: format!("cannot parse CSV: {e}"),
                        hint: "check the quoting of this line",
                    });
                }
            }
            stats.rows += 1;
            let line = record.position().map(|p| p.line()).unwrap_or(0);
            match parse_row(&record, &columns) {
                Ok(b) => on_row(b),
                Err(kind) if skip_bad_rows => stats.bad.record(kind, path, line),
                Err(kind) => {
                    return Err(ClueError::BadRow {
                        path: path.clone(),
                        line,
                        message: match kind {
                            BadRowKind::ColumnCount => format!(
                                "{} (expected {}, found {})",
                                kind.name(),
                                columns.len,
                                record.len()
                            ),
                            BadRowKind::InvalidUtf8 => {
                                "this file is not valid UTF-8 (first invalid byte on this line)"
                                    .to_string()
                            }
                            _ => kind.name().to_string(),
                        },
                        hint: kind.hint(),
                    });
                }
            }
            if stats.rows % 65_536 == 0 {
                on_progress(base + record.position().map(|p| p.byte()).unwrap_or(0));
            }
        }
        stats.bytes = base + reader.position().byte();
        stats.files += 1;
        on_progress(stats.bytes);
    }
    Ok(stats)
}

/// Read a CSV table with a header, calling `on_row(line, fields)` with the named `columns` in the
/// order asked (other columns are ignored). A missing column, a short row, a CSV error or invalid
/// UTF-8 stops with the file and line.
pub fn read_table(
    path: &Path,
    columns: &[&str],
    mut on_row: impl FnMut(u64, &[&str]) -> Result<()>,
) -> Result<u64> {
    let file = File::open(path).map_err(|e| ClueError::io(path, e))?;
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(BufReader::with_capacity(1 << 20, file));
    let header = header_names(path, reader.byte_headers(), "check the file".into())?;
    let index = columns
        .iter()
        .map(|c| {
            header.iter().position(|h| h == c).ok_or_else(|| {
                ClueError::bad_file(
                    path,
                    format!(
                        "the header has no `{c}` column (found: {})",
                        header.join(",")
                    ),
                    format!("the first line must name the columns {}", columns.join(",")),
                )
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    let mut record = csv::ByteRecord::new();
    let mut rows = 0;
    loop {
        let more = reader
            .read_byte_record(&mut record)
            .map_err(|e| ClueError::BadRow {
                path: path.to_path_buf(),
                line: e.position().map(|p| p.line()).unwrap_or(0),
                message: format!("cannot parse CSV: {e}"),
                hint: "check the quoting of this line",
            })?;
        if !more {
            break;
        }
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        let bad = |message: String, hint: &'static str| ClueError::BadRow {
            path: path.to_path_buf(),
            line,
            message,
            hint,
        };
        let mut fields: Vec<&str> = Vec::with_capacity(columns.len());
        for &i in &index {
            let raw = record.get(i).ok_or_else(|| {
                bad(
                    format!("expected {} columns, found {}", header.len(), record.len()),
                    "each row needs the header's columns",
                )
            })?;
            fields.push(std::str::from_utf8(raw).map_err(|_| {
                bad(
                    "this file is not valid UTF-8".into(),
                    "convert it, e.g. iconv -f latin1 -t utf-8",
                )
            })?);
        }
        on_row(line, &fields)?;
        rows += 1;
    }
    Ok(rows)
}

/// Positions of the four canonical columns in a file's header, and its width.
struct Columns {
    index: [usize; 4],
    len: usize,
}

/// Column names of a CSV header, trimmed, without a UTF-8 byte-order mark.
fn header_names(
    path: &Path,
    header: csv::Result<&csv::ByteRecord>,
    hint: String,
) -> Result<Vec<String>> {
    let header = header
        .map_err(|e| ClueError::bad_file(path, format!("cannot read the header: {e}"), hint))?;
    Ok(header
        .iter()
        .map(|h| {
            String::from_utf8_lossy(h)
                .trim()
                .trim_start_matches('\u{feff}')
                .to_string()
        })
        .collect())
}

fn header_columns<R: std::io::Read>(path: &Path, reader: &mut csv::Reader<R>) -> Result<Columns> {
    let names = header_names(path, reader.byte_headers(), header_hint())?;
    let mut index = [0usize; 4];
    for (slot, column) in COLUMNS.iter().enumerate() {
        index[slot] = names.iter().position(|n| n == column).ok_or_else(|| {
            ClueError::bad_file(
                path,
                format!(
                    "the header has no `{column}` column (found: {})",
                    names.join(",")
                ),
                header_hint(),
            )
        })?;
    }
    Ok(Columns {
        index,
        len: names.len(),
    })
}

fn header_hint() -> String {
    format!("the first line must be the header `{}`", COLUMNS.join(","))
}

fn parse_row<'r>(
    record: &'r csv::ByteRecord,
    columns: &Columns,
) -> std::result::Result<Behavior<'r>, BadRowKind> {
    if record.len() != columns.len {
        return Err(BadRowKind::ColumnCount);
    }
    let field = |slot: usize| {
        std::str::from_utf8(&record[columns.index[slot]]).map_err(|_| BadRowKind::InvalidUtf8)
    };
    let (user, service, timestamp, text) = (field(0)?, field(1)?, field(2)?, field(3)?);
    let (user, service, text) = (user.trim(), service.trim(), text.trim());
    if user.is_empty() || service.is_empty() || text.is_empty() {
        return Err(BadRowKind::EmptyField);
    }
    let timestamp = parse_timestamp(timestamp).ok_or(BadRowKind::Timestamp)?;
    Ok(Behavior {
        user,
        service,
        timestamp,
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_in_all_three_forms() {
        assert_eq!(parse_timestamp(""), Some(None));
        assert_eq!(parse_timestamp(" 1700000000 "), Some(Some(1_700_000_000)));
        assert_eq!(
            parse_timestamp("2023-11-14T22:13:20Z"),
            Some(Some(1_700_000_000))
        );
        assert_eq!(
            parse_timestamp("2023-11-14T23:13:20+01:00"),
            Some(Some(1_700_000_000))
        );
        assert_eq!(parse_timestamp("14/11/2023"), None);
        assert_eq!(parse_timestamp("2023-11-14"), None);
    }
}
