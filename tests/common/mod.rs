//! Helpers shared by the integration tests: small logs written on the spot.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Run the `clue` binary of this build in `dir` and collect its output.
pub fn clue(dir: &Path, args: &[&str]) -> std::process::Output {
    clue_with(dir, args, &[])
}

/// [`clue`] with these environment variables set.
pub fn clue_with(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_clue"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .unwrap()
}

/// Write `rows` under the canonical header to `dir/name`.
pub fn write_log(dir: &Path, name: &str, rows: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let mut text = String::from("user_id,service,timestamp,text\n");
    for r in rows {
        text.push_str(r);
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// A legal log of two services (`news`, `shop`) for users u0.. (3 rows each per service),
/// then `extra` appended.
pub fn log_text(users: usize, extra: &str) -> String {
    let mut text = String::from("user_id,service,timestamp,text\n");
    for u in 0..users {
        for (s, t) in [("news", "tennis final report"), ("shop", "racket strings")] {
            for k in 0..3 {
                text.push_str(&format!("u{u},{s},{},{t} {k}\n", 1_700_000_000 + k));
            }
        }
    }
    text.push_str(extra);
    text
}

/// Every file of a directory with its bytes, sorted by name.
pub fn dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// `clue synth` (`<root>/s`) and `clue prepare` (`<root>/p`) of `users` synthetic users, made
/// once per test process for each set of arguments and shared by the tests that ask for it
/// (read-only: tests write their own outputs elsewhere).
pub fn fixture(users: usize, seed: u64, max_items: usize, max_item_tokens: usize) -> PathBuf {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Key = (usize, u64, usize, usize);
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    static MADE: OnceLock<Mutex<HashMap<Key, PathBuf>>> = OnceLock::new();
    let root = ROOT.get_or_init(|| tempfile::tempdir().unwrap()).path();
    let mut made = MADE.get_or_init(Default::default).lock().unwrap();
    let key = (users, seed, max_items, max_item_tokens);
    if let Some(dir) = made.get(&key) {
        return dir.clone();
    }
    let dir = root.join(format!("{users}-{seed}-{max_items}-{max_item_tokens}"));
    clue::data::synth::synth(
        &dir.join("s"),
        &clue::data::synth::SynthOptions::new(users, seed),
    )
    .unwrap();
    let options = clue::data::prepare::PrepareOptions {
        max_items,
        max_item_tokens,
        ..Default::default()
    };
    clue::data::prepare::prepare(&[dir.join("s/logs")], &dir.join("p"), &options).unwrap();
    made.insert(key, dir.clone());
    dir
}

/// Largest absolute difference of two equally long lists.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The small model the model-level tests share: d 32, one layer per Transformer, 16 items of
/// 12 tokens, 24-wide projection.
pub fn small_model(vocab: usize) -> clue::model::ModelConfig {
    clue::model::ModelConfig {
        vocab_size: vocab,
        d_model: 32,
        d_ff: 64,
        heads: 4,
        item_layers: 1,
        service_layers: 1,
        max_items: 16,
        max_item_tokens: 12,
        output_dim: 24,
        ..Default::default()
    }
}

/// `clue fit`'s options for a fresh run of `config` on `data` into `out` (ndarray, f32, one
/// device, data checked).
pub fn fit_options(
    config: clue::train::config::RunConfig,
    data: PathBuf,
    out: PathBuf,
) -> clue::train::fit::FitOptions {
    clue::train::fit::FitOptions {
        config,
        data,
        out,
        tui: false,
        resume: false,
        backend: "ndarray".into(),
        precision: "f32".into(),
        verify: true,
        devices: None,
        cluster: None,
    }
}

/// Every tensor of a run's exported model, as f32s by name.
pub fn weights(run: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(run.join("model/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, v)
        })
        .collect()
}
