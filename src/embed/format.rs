//! The files of `clue embed`, written and read here only: `<stem>.safetensors` (tensors
//! `user_embeddings` `[users, services × dim]` and `service_mask` `[users, services]`) and/or
//! `<stem>.npy` (the matrix alone), `<stem>.users.csv` (which user each row is) and, written
//! last, `<stem>.manifest.json` (model, data, shape and the SHA-256 of every file of the set).
//!
//! The set is committed as one unit: `write` removes the old manifest before it replaces any
//! file and writes the new one last, and [`read_embeddings`] refuses a matrix or `users.csv`
//! whose hash is not the manifest's. A set cut short between two renames (a kill, a full disk)
//! therefore has no manifest or a mismatched one, and is refused instead of mapping rows to the
//! wrong users.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::log::read_table;
use crate::data::store::{hex, write_atomic};
use crate::error::{ClueError, Result};

/// The embedding matrix's tensor name in the safetensors file.
pub const USER_EMBEDDINGS: &str = "user_embeddings";
/// The mask's tensor name in the safetensors file.
pub const SERVICE_MASK: &str = "service_mask";

/// `<stem>.manifest.json`, written beside the embeddings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbedManifest {
    pub clue_version: String,
    pub model_bundle_sha256: String,
    pub dataset_manifest_sha256: String,
    pub services: Vec<String>,
    /// Per-service embedding width; the row is `services.len() × dim_per_service` wide.
    pub dim_per_service: usize,
    pub dim: usize,
    pub dtype: String,
    pub users: usize,
    /// Users with at least one behaviour in each service, in service order.
    pub users_per_service: Vec<usize>,
    pub distinct_items: usize,
    pub rows_read: u64,
    pub bad_rows_skipped: u64,
    pub rows_other_services: u64,
    pub files: Vec<String>,
    /// SHA-256 of each data file of the set, by file name (the manifest itself excluded).
    #[serde(default)]
    pub sha256: BTreeMap<String, String>,
}

fn view(
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: &[u8],
) -> safetensors::tensor::TensorView<'_> {
    safetensors::tensor::TensorView::new(dtype, shape, data).expect("consistent tensor view")
}

/// `.npy` (format 1.0) bytes of a C-order matrix.
pub fn npy_bytes(descr: &str, shape: [usize; 2], data: &[u8]) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({}, {}), }}",
        shape[0], shape[1]
    );
    // magic (6) + version (2) + header length (2) + header + '\n', padded to 64 bytes.
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - 10 - header.len() - 1));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// The embedding set of `clue embed`: one row per user, each the concatenation of the user's
/// per-service embeddings, and the `[users, services]` mask (1 = the user has behaviour there).
pub struct Embeddings<'a> {
    pub users: &'a [String],
    pub services: &'a [String],
    /// `[users, services × dim_per_service]`, row-major.
    pub matrix: &'a [f32],
    pub mask: &'a [u8],
}

/// `<stem>.users.csv` beside an embedding file: which user each row is.
pub fn users_csv_path(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.users.csv", out.with_extension("").display()))
}

/// `<stem>.manifest.json` beside an embedding file.
pub fn manifest_path(out: &Path) -> PathBuf {
    PathBuf::from(format!(
        "{}.manifest.json",
        out.with_extension("").display()
    ))
}

/// Write the set for `out` (`.safetensors` or `.npy`; `npy` adds a `.npy` copy beside a
/// `.safetensors` file), then `users.csv` and, last, the manifest listing them. `f16` stores
/// half-precision floats. Returns the files written.
pub fn write(
    out: &Path,
    e: &Embeddings,
    mut manifest: EmbedManifest,
    f16: bool,
    npy: bool,
) -> Result<Vec<PathBuf>> {
    let (n, k) = (e.users.len(), e.services.len());
    let width = manifest.dim;
    let (dtype, descr, bytes): (safetensors::Dtype, &str, Vec<u8>) = if f16 {
        let b = e
            .matrix
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        (safetensors::Dtype::F16, "<f2", b)
    } else {
        let b = e.matrix.iter().flat_map(|x| x.to_le_bytes()).collect();
        (safetensors::Dtype::F32, "<f4", b)
    };
    let mut written = Vec::new();
    let manifest_path = manifest_path(out);
    // From here until the new manifest is written, the set has none: readers refuse it.
    match std::fs::remove_file(&manifest_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ClueError::io(&manifest_path, e));
        }
        _ => {}
    }
    let mut put = |path: PathBuf, bytes: &[u8]| -> Result<()> {
        write_atomic(&path, bytes)?;
        manifest.sha256.insert(file_name(&path), sha256(bytes));
        written.push(path);
        Ok(())
    };
    let is = |ext: &str| out.extension().is_some_and(|e| e == ext);
    if is("safetensors") {
        let st_path = out.with_extension("safetensors");
        let tensors = vec![
            (USER_EMBEDDINGS, view(dtype, vec![n, width], &bytes)),
            (
                SERVICE_MASK,
                view(safetensors::Dtype::U8, vec![n, k], e.mask),
            ),
        ];
        // One metadata entry: safetensors writes a HashMap, whose order would vary between runs.
        let meta = HashMap::from([("services".to_string(), e.services.join(","))]);
        let data = safetensors::serialize(tensors, Some(meta))
            .map_err(|err| ClueError::io(&st_path, std::io::Error::other(err.to_string())))?;
        put(st_path, &data)?;
    }
    if npy || is("npy") {
        put(
            out.with_extension("npy"),
            &npy_bytes(descr, [n, width], &bytes),
        )?;
    }
    put(users_csv_path(out), users_csv(e).as_bytes())?;
    manifest.files = written.iter().map(|p| p.display().to_string()).collect();
    write_atomic(
        &manifest_path,
        (serde_json::to_string_pretty(&manifest).expect("json") + "\n").as_bytes(),
    )?;
    written.push(manifest_path);
    Ok(written)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// Check that `bytes`, read from `path`, are the file the set's manifest names.
fn check_in_set(path: &Path, bytes: &[u8], manifest: &EmbedManifest, at: &Path) -> Result<()> {
    let name = file_name(path);
    match manifest.sha256.get(&name) {
        Some(h) if *h == sha256(bytes) => Ok(()),
        Some(_) => Err(ClueError::bad_file(
            path,
            format!(
                "is not the file {} lists (its SHA-256 differs): the embedding set is mixed, \
                 e.g. a clue embed was interrupted between its files or one was copied in",
                at.display()
            ),
            "run clue embed again to write the whole set",
        )),
        None => Err(ClueError::bad_file(
            path,
            format!("is not listed in {}", at.display()),
            "run clue embed again to write the whole set",
        )),
    }
}

/// `row,user_id,has_<service>...`
fn users_csv(e: &Embeddings) -> String {
    let k = e.services.len();
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::new());
    let mut header = vec!["row".to_string(), "user_id".to_string()];
    header.extend(e.services.iter().map(|s| format!("has_{s}")));
    let rows = std::iter::once(header).chain(e.users.iter().enumerate().map(|(r, u)| {
        let mut rec = vec![r.to_string(), u.clone()];
        rec.extend(e.mask[r * k..(r + 1) * k].iter().map(|m| m.to_string()));
        rec
    }));
    for rec in rows {
        w.write_record(&rec).expect("writing to memory");
    }
    String::from_utf8(w.into_inner().expect("in memory")).expect("utf-8")
}

/// Read an embedding file (safetensors with `user_embeddings`, or a little-endian f32 `.npy`)
/// and its `users.csv`, both checked against the set's manifest; returns the rows of `users`, in
/// that order, and the row width. A row that is not finite is refused, naming its user.
pub fn read_embeddings(path: &Path, users: &[String]) -> Result<(Vec<f32>, usize)> {
    let at = manifest_path(path);
    let manifest: EmbedManifest = match std::fs::read_to_string(&at) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| {
            ClueError::bad_file(&at, e.to_string(), "run clue embed again to write the set")
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ClueError::bad_file(
                path,
                format!(
                    "has no {} beside it: the embedding set is incomplete (clue embed writes \
                     its manifest last) or was not written by clue embed",
                    at.display()
                ),
                "run clue embed again to write the whole set",
            ));
        }
        Err(e) => return Err(ClueError::io(&at, e)),
    };
    let bytes = std::fs::read(path).map_err(|e| ClueError::io(path, e))?;
    check_in_set(path, &bytes, &manifest, &at)?;
    let bad = |m: String| ClueError::bad_file(path, m, "give a file written by `clue embed`");
    let (data, shape) = if path.extension().is_some_and(|e| e == "npy") {
        read_npy(&bytes).map_err(bad)?
    } else {
        read_safetensors(&bytes).map_err(bad)?
    };
    if shape.len() != 2 || shape[0] * shape[1] != data.len() {
        return Err(bad(format!(
            "expected a [users, dim] matrix, found shape {shape:?}"
        )));
    }
    let ids_path = users_csv_path(path);
    let ids = std::fs::read(&ids_path).map_err(|e| ClueError::io(&ids_path, e))?;
    check_in_set(&ids_path, &ids, &manifest, &at)?;
    let mut row_of: HashMap<String, usize> = HashMap::new();
    read_table(&ids_path, &["row", "user_id"], |_, f| {
        row_of.insert(f[1].to_string(), f[0].parse().unwrap_or(usize::MAX));
        Ok(())
    })?;
    let dim = shape[1];
    let mut out = Vec::with_capacity(users.len() * dim);
    for u in users {
        let r = *row_of.get(u).filter(|&&r| r < shape[0]).ok_or_else(|| {
            ClueError::bad_file(
                &ids_path,
                format!("user `{u}` of the task has no embedding"),
                "embed the task's users (clue embed on the task's feature logs)",
            )
        })?;
        let row = &data[r * dim..(r + 1) * dim];
        if let Some(x) = row.iter().find(|x| !x.is_finite()) {
            return Err(bad(format!(
                "the embedding of user `{u}` (row {r}) holds {x}: the model that wrote it diverged"
            )));
        }
        out.extend_from_slice(row);
    }
    Ok((out, dim))
}

type Matrix = (Vec<f32>, Vec<usize>);

fn read_npy(bytes: &[u8]) -> std::result::Result<Matrix, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file".into());
    }
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = bytes
        .get(10..10 + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("a damaged .npy header")?;
    if !header.contains("'<f4'") {
        return Err("only little-endian f32 .npy files are read".into());
    }
    let dims: Vec<usize> = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_default();
    let data = bytes[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((data, dims))
}

fn read_safetensors(bytes: &[u8]) -> std::result::Result<Matrix, String> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let t = st.tensor(USER_EMBEDDINGS).map_err(|e| e.to_string())?;
    let data = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F16 => t
            .data()
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => return Err(format!("unsupported dtype {other:?}")),
    };
    Ok((data, t.shape().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_describes_the_matrix() {
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b = npy_bytes("<f4", [2, 3], &data);
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        assert!(header.ends_with('\n'));
        assert_eq!(&b[10 + hlen..], &data[..]);
    }

    fn manifest(dim: usize) -> EmbedManifest {
        EmbedManifest {
            clue_version: "test".into(),
            model_bundle_sha256: String::new(),
            dataset_manifest_sha256: String::new(),
            services: vec!["a".into(), "b".into()],
            dim_per_service: dim / 2,
            dim,
            dtype: "f32".into(),
            users: 3,
            users_per_service: vec![3, 2],
            distinct_items: 0,
            rows_read: 0,
            bad_rows_skipped: 0,
            rows_other_services: 0,
            files: Vec::new(),
            sha256: BTreeMap::new(),
        }
    }

    /// What `write` puts down, `read_embeddings` gives back, row for row by user id, in both
    /// formats; f16 within its rounding.
    #[test]
    fn written_embeddings_read_back_by_user() {
        let dir = tempfile::tempdir().unwrap();
        let users: Vec<String> = ["u1", "u,2", "u3"].iter().map(|s| s.to_string()).collect();
        let services = vec!["a".to_string(), "b".to_string()];
        let matrix: Vec<f32> = (0..12).map(|x| x as f32 * 0.37 - 1.5).collect();
        let mask = vec![1, 1, 1, 0, 1, 1];
        let e = Embeddings {
            users: &users,
            services: &services,
            matrix: &matrix,
            mask: &mask,
        };
        let out = dir.path().join("emb.safetensors");
        let written = write(&out, &e, manifest(4), false, true).unwrap();
        assert_eq!(written.len(), 4, "safetensors, npy, users.csv, manifest");
        assert!(written.last().unwrap().ends_with("emb.manifest.json"));
        let ask: Vec<String> = vec!["u3".into(), "u1".into(), "u,2".into()];
        let want: Vec<f32> = [2usize, 0, 1]
            .iter()
            .flat_map(|&r| matrix[r * 4..(r + 1) * 4].to_vec())
            .collect();
        for file in ["emb.safetensors", "emb.npy"] {
            let (got, dim) = read_embeddings(&dir.path().join(file), &ask).unwrap();
            assert_eq!((got, dim), (want.clone(), 4), "{file}");
        }
        let half = dir.path().join("half.safetensors");
        write(&half, &e, manifest(4), true, false).unwrap();
        let (got, _) = read_embeddings(&half, &ask).unwrap();
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 2e-3));
        let err = read_embeddings(&out, &["nobody".to_string()]).unwrap_err();
        assert!(err.to_string().contains("nobody"), "{err}");
        std::fs::write(dir.path().join("bad.npy"), b"\x93NU").unwrap();
        std::fs::copy(users_csv_path(&out), dir.path().join("bad.users.csv")).unwrap();
        assert!(read_embeddings(&dir.path().join("bad.npy"), &ask).is_err());
    }

    /// A set whose files do not belong together, or that lacks its manifest, is refused; so is a
    /// row that is not finite.
    #[test]
    fn mixed_or_incomplete_sets_and_non_finite_rows_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let users: Vec<String> = ["u1", "u2", "u3"].iter().map(|s| s.to_string()).collect();
        let services = vec!["a".to_string(), "b".to_string()];
        let mask = vec![1; 6];
        let write_set = |stem: &str, matrix: &[f32], users: &[String]| {
            let e = Embeddings {
                users,
                services: &services,
                matrix,
                mask: &mask,
            };
            let out = dir.path().join(format!("{stem}.safetensors"));
            write(&out, &e, manifest(4), false, false).unwrap();
            out
        };
        let matrix: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let out = write_set("emb", &matrix, &users);
        assert!(read_embeddings(&out, &users).is_ok());
        // The same users in another order: a users.csv of another set.
        let shuffled: Vec<String> = users.iter().rev().cloned().collect();
        let other = write_set("other", &matrix, &shuffled);
        std::fs::copy(users_csv_path(&other), users_csv_path(&out)).unwrap();
        let err = read_embeddings(&out, &users).unwrap_err().to_string();
        assert!(
            err.contains("mixed") && err.contains("emb.users.csv"),
            "{err}"
        );
        // Rewriting the set mends it; losing the manifest (cut short before it) is refused.
        let out = write_set("emb", &matrix, &users);
        std::fs::remove_file(manifest_path(&out)).unwrap();
        let err = read_embeddings(&out, &users).unwrap_err().to_string();
        assert!(err.contains("incomplete"), "{err}");
        let mut nan = matrix.clone();
        nan[5] = f32::NAN;
        let out = write_set("emb", &nan, &users);
        let err = read_embeddings(&out, &users).unwrap_err().to_string();
        assert!(err.contains("`u2`") && err.contains("NaN"), "{err}");
        assert!(
            read_embeddings(&out, &users[..1]).is_ok(),
            "u1's row is finite"
        );
    }
}
