//! The shape of the source tree: no two library modules import each other (directly or through
//! others), and no source file grows past the size a reader can hold in mind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest source file allowed, in lines (the synthetic word lists of `data/synth.rs` included).
const MAX_LINES: usize = 650;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/model/flex/mod.rs` → `model::flex`; `src/lib.rs` → ``.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts.join("::")
}

/// The modules whose items `text` names through `crate::` or `super::` paths, outside comments
/// and the test module.
fn imports(module: &str, text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let code: String = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
    let mut out = BTreeSet::new();
    for (prefix, base) in [("crate::", String::new()), ("super::", parent.to_string())] {
        for (at, _) in code.match_indices(prefix) {
            let path: String = code[at + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let mut parts: Vec<&str> = base.split("::").filter(|p| !p.is_empty()).collect();
            parts.extend(path.split("::").filter(|p| !p.is_empty()));
            let target = (1..=parts.len())
                .rev()
                .map(|i| parts[..i].join("::"))
                .find(|m| modules.contains(m));
            if let Some(t) = target
                && t != module
                && !module.starts_with(&format!("{t}::"))
            {
                out.insert(t);
            }
        }
    }
    out
}

#[test]
fn library_modules_import_each_other_in_no_circle_and_files_stay_short() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for f in &files {
        let lines = std::fs::read_to_string(f).unwrap().lines().count();
        assert!(lines <= MAX_LINES, "{} has {lines} lines", f.display());
    }
    let library: Vec<&PathBuf> = files
        .iter()
        .filter(|f| !f.starts_with(src.join("bin")))
        .collect();
    let modules: BTreeSet<String> = library.iter().map(|f| module_of(&src, f)).collect();
    let graph: BTreeMap<String, BTreeSet<String>> = library
        .iter()
        .map(|f| {
            let m = module_of(&src, f);
            let deps = imports(&m, &std::fs::read_to_string(f).unwrap(), &modules);
            (m, deps)
        })
        .collect();
    // A module is in a circle when it can reach itself.
    for start in graph.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&String> = graph[start].iter().collect();
        while let Some(m) = todo.pop() {
            assert!(m != start, "module {start} imports itself through others");
            if seen.insert(m) {
                todo.extend(graph.get(m).into_iter().flatten());
            }
        }
    }
    // The check sees imports at all: `embed` reads the bundle and the history reader.
    assert!(graph["embed"].contains("bundle") && graph["embed"].contains("data::history"));
}
