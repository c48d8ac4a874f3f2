//! Reading canonical behaviour logs: CSV with header `user_id,service,timestamp,text`.
//!
//! Files are streamed row by row; nothing here keeps rows. Bad rows either stop the read with
//! `file:line: what is wrong` or, with `skip_bad_rows`, are counted by kind.

use std::cell::Cell;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

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
        let mut rows = Rows::open(path)?;
        let columns = header_columns(path, &mut rows.reader)?;
        let mut record = csv::ByteRecord::new();
        let base = stats.bytes;
        while rows.next(&mut record)? {
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
        stats.bytes = base + rows.reader.position().byte();
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
    let mut rows = Rows::open(path)?;
    let header = header_names(path, rows.reader.byte_headers(), "check the file".into())?;
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
    let mut count = 0;
    while rows.next(&mut record)? {
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
        count += 1;
    }
    Ok(count)
}

/// Default of `--max-row-bytes`.
pub const DEFAULT_MAX_ROW_BYTES: u64 = 64 * 1024;

static MAX_ROW_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_MAX_ROW_BYTES);

/// The longest CSV row (in bytes) the readers accept (`--max-row-bytes`).
pub fn set_max_row_bytes(bytes: u64) {
    MAX_ROW_BYTES.store(bytes.max(1), Ordering::Relaxed);
}

/// The error a [`RowBound`] reader stops with.
#[derive(Debug)]
struct RowTooLong;

impl std::fmt::Display for RowTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("row too long")
    }
}

impl std::error::Error for RowTooLong {}

/// A reader that fails once it is asked for more than `limit` bytes past the start of the row
/// being read, so a quote that is never closed cannot pull the rest of a file into one row.
struct RowBound<R> {
    inner: R,
    read: u64,
    row_start: Rc<Cell<u64>>,
    limit: u64,
}

impl<R: Read> Read for RowBound<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.read > self.row_start.get() + self.limit {
            return Err(std::io::Error::other(RowTooLong));
        }
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// The CSV records of one file, each at most `--max-row-bytes` long, with a check at the end
/// that the last row does not hold a quote that was never closed.
struct Rows {
    reader: csv::Reader<RowBound<BufReader<File>>>,
    path: PathBuf,
    row_start: Rc<Cell<u64>>,
    limit: u64,
    /// (first line, start byte, end byte) of the last row read.
    last: Option<(u64, u64, u64)>,
}

impl Rows {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ClueError::io(path, e))?;
        let limit = MAX_ROW_BYTES.load(Ordering::Relaxed);
        let row_start = Rc::new(Cell::new(0));
        let bound = RowBound {
            inner: BufReader::with_capacity(1 << 20, file),
            read: 0,
            row_start: row_start.clone(),
            // csv reads ahead in pieces of its buffer: allow one beyond the row.
            limit: limit + CSV_BUFFER as u64,
        };
        let reader = csv::ReaderBuilder::new()
            .flexible(true)
            .buffer_capacity(CSV_BUFFER)
            .from_reader(bound);
        Ok(Self {
            reader,
            path: path.to_path_buf(),
            row_start,
            limit,
            last: None,
        })
    }

    /// Read the next row into `record`; `false` at the end of the file.
    fn next(&mut self, record: &mut csv::ByteRecord) -> Result<bool> {
        let at = self.reader.position().clone();
        self.row_start.set(at.byte());
        let more = self.reader.read_byte_record(record).map_err(|e| {
            let too_long = matches!(e.kind(), csv::ErrorKind::Io(io)
                if io.get_ref().is_some_and(|inner| inner.is::<RowTooLong>()));
            if too_long {
                self.too_long(at.line())
            } else {
                ClueError::BadRow {
                    path: self.path.clone(),
                    line: e.position().map(|p| p.line()).unwrap_or(at.line()),
                    message: format!("cannot parse CSV: {e}"),
                    hint: "check the quoting of this line",
                }
            }
        })?;
        if !more {
            return match self.last {
                Some((line, start, end)) if self.ends_inside_quotes(start, end)? => {
                    Err(ClueError::BadRow {
                        path: self.path.clone(),
                        line,
                        message: "a quoted text that opens on this line is never closed: it runs to the end of the file".into(),
                        hint: "close the quote (a quote inside a quoted text is written \"\")",
                    })
                }
                _ => Ok(false),
            };
        }
        let (start, end) = (
            record.position().map_or(at.byte(), |p| p.byte()),
            self.reader.position().byte(),
        );
        if end - start > self.limit {
            return Err(self.too_long(at.line()));
        }
        let first_line = record.position().map_or(at.line(), |p| p.line());
        self.last = Some((first_line, start, end));
        Ok(true)
    }

    fn too_long(&self, line: u64) -> ClueError {
        ClueError::BadRow {
            path: self.path.clone(),
            line,
            message: format!(
                "the row that starts on this line is longer than {} bytes: most likely a quoted text whose closing quote is missing swallowed the lines after it",
                self.limit
            ),
            hint: "close the quote (a quote inside a quoted text is written \"\"), or raise --max-row-bytes if rows really are this long",
        }
    }

    /// Whether the row at bytes `start..end` of the file (its last) ends inside a quoted field.
    fn ends_inside_quotes(&self, start: u64, end: u64) -> Result<bool> {
        let io = |e| ClueError::io(&self.path, e);
        let mut file = File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        let mut bytes = Vec::new();
        file.take(end - start).read_to_end(&mut bytes).map_err(io)?;
        Ok(inside_quotes_at_end(&bytes))
    }
}

/// Whether CSV text ends inside a quoted field, read as the csv crate reads it: a quote opens
/// a quoted field only at the field's start, `""` inside one is a literal quote, and any other
/// quote closes it.
fn inside_quotes_at_end(bytes: &[u8]) -> bool {
    let (mut quoted, mut at_field_start) = (false, true);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if quoted {
            if b == b'"' {
                if bytes.get(i + 1) == Some(&b'"') {
                    i += 1;
                } else {
                    quoted = false;
                }
            }
        } else if b == b'"' && at_field_start {
            quoted = true;
        }
        at_field_start = !quoted && matches!(b, b',' | b'\n' | b'\r');
        i += 1;
    }
    quoted
}

/// csv's own buffer (its default).
const CSV_BUFFER: usize = 8 * 1024;

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
        text: cut_text(text, MAX_TEXT_BYTES),
    })
}

/// Item texts are cut to this many bytes when read, before anything stores or tokenises them:
/// items keep at most `max_item_tokens` tokens, so a longer text only costs memory and time
/// (a 10 MB text cost ~1.8 GB in the tokenizer). 16 KiB holds 512 tokens of 32 bytes each;
/// texts that agree on their first 16 KiB are one item.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn cut_text(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_cut_at_a_character_boundary() {
        assert_eq!(cut_text("short", 16), "short");
        assert_eq!(cut_text("abcdef", 4), "abcd");
        // `é` is two bytes: a cut inside it moves back before it.
        assert_eq!(cut_text("abcé", 4), "abc");
        assert_eq!(cut_text("abcé", 5), "abcé");
        assert_eq!(cut_text("日本", 2), "");
    }

    #[test]
    fn a_row_ends_inside_quotes_only_when_a_quoted_field_is_left_open() {
        for (text, open) in [
            ("u,s,1,plain\n", false),
            ("u,s,1,\"two\nlines\"\n", false),
            ("u,s,1,\"say \"\"hi\"\"\"\n", false),
            ("u,s,1,12\" pizza\n", false),
            ("u\"1,s,1,\"a\nb\"\n", false),
            ("u,s,1,\"unclosed\n", true),
            ("u,s,1,\"unclosed", true),
            ("u,s,1,\"a \"\"quote\"\" and more\nlines\n", true),
        ] {
            assert_eq!(inside_quotes_at_end(text.as_bytes()), open, "{text:?}");
        }
    }

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
