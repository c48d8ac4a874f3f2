//! `clue embed` (byte formats, item cache, padding, missing services) and `clue eval` (protocol).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::backend::{Autodiff, NdArray};
use clue::bundle::{BundleInfo, SplitScore, save_bundle};
use clue::data::store::PreparedDataset;
use clue::embed::{EmbedOptions, embed};
use clue::eval::{EvalOptions, Task, eval, load_task};
use clue::model::init::Init;
use clue::model::{ClueModel, ModelConfig, ModelKind};
use clue::train::config::RunConfig;

mod common;

type B = NdArray;

/// Synthesise and prepare `users` users, and save an untrained (seeded) model bundle on them.
/// Users of the shared synthetic data.
const USERS: usize = 400;

/// The shared synthetic data (`s/` logs and tasks, `p/` prepared) the bundles are made on.
fn data_root() -> PathBuf {
    common::fixture(USERS, 3, 512, 32)
}

fn bundle(dir: &Path) -> PathBuf {
    bundle_of(dir, ModelKind::Stacked)
}

fn bundle_of(dir: &Path, kind: ModelKind) -> PathBuf {
    let data = Arc::new(PreparedDataset::open(&data_root().join("p"), true).unwrap());
    let model_config = ModelConfig {
        kind,
        output_dim: 0,
        ..common::small_model(data.manifest.vocab_size as usize)
    };
    let device = Default::default();
    let model = ClueModel::<B>::new(&model_config, &mut Init::new(5, &device));
    let config = RunConfig {
        model: model_config.clone(),
        ..Default::default()
    };
    let info = BundleInfo {
        clue_version: "test".into(),
        services: data.manifest.services.clone(),
        embedding_dim: model_config.embedding_dim(),
        dataset_manifest_sha256: data.manifest.hash(),
        params: model.param_counts(),
        steps: 0,
        flops: 0.0,
        pf_days: 0.0,
        valid: SplitScore {
            loss: 0.0,
            top1_ab: 0.0,
            top1_ba: 0.0,
            top10_ab: None,
            users: 0,
            batch_size: 1,
        },
    };
    let run = dir.join("run");
    save_bundle(
        &model,
        &config,
        &info,
        &data.tokenizer_path(),
        &run.join("model"),
    )
    .unwrap();
    run
}

fn options(inputs: Vec<PathBuf>, out: PathBuf) -> EmbedOptions {
    EmbedOptions {
        inputs,
        out,
        services: None,
        alias: Default::default(),
        f16: false,
        npy: false,
        batch_size: 64,
        item_cache: true,
        skip_bad_rows: false,
    }
}

/// Parse a safetensors file as Python's `safetensors` does: u64 header length, JSON header, data.
fn read_safetensors(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn embed_writes_safetensors_npy_users_and_manifest_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let run = bundle(dir.path());
    let logs = vec![data_root().join("s/logs")];
    let device = Default::default();
    let out = dir.path().join("emb/users.safetensors");
    let o = EmbedOptions {
        npy: true,
        ..options(logs.clone(), out.clone())
    };
    let report = embed::<B>(&run, &device, &o).unwrap();
    assert_eq!(report.manifest.users, USERS);
    assert_eq!(report.manifest.dim, 64, "2 services × 32");

    let (header, data) = read_safetensors(&out);
    let t = &header["user_embeddings"];
    assert_eq!(t["dtype"], "F32");
    assert_eq!(t["shape"], serde_json::json!([USERS, 64]));
    let [start, end] = [0, 1].map(|i| t["data_offsets"][i].as_u64().unwrap() as usize);
    assert_eq!(end - start, USERS * 64 * 4);
    let values = f32s(&data[start..end]);
    assert!(values.iter().all(|v| v.is_finite()) && values.iter().any(|v| *v != 0.0));
    assert_eq!(header["service_mask"]["dtype"], "U8");
    assert_eq!(header["__metadata__"]["services"], "search,shop");

    // The .npy copy holds the same matrix behind a standard header.
    let npy = std::fs::read(dir.path().join("emb/users.npy")).unwrap();
    assert_eq!(&npy[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([npy[8], npy[9]]) as usize;
    let h = std::str::from_utf8(&npy[10..10 + hlen]).unwrap();
    assert!(
        h.contains("'descr': '<f4'") && h.contains(&format!("'shape': ({USERS}, 64)")),
        "{h}"
    );
    assert_eq!(f32s(&npy[10 + hlen..]), values);

    // users.csv maps rows to user ids; the manifest names the model.
    let users = std::fs::read_to_string(dir.path().join("emb/users.users.csv")).unwrap();
    let lines: Vec<&str> = users.lines().collect();
    assert_eq!(lines[0], "row,user_id,has_search,has_shop");
    assert_eq!(lines.len(), USERS + 1);
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("emb/users.manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["model_bundle_sha256"].as_str().unwrap().len(), 64);

    // Same input → same bytes; f16 → half the data, values within f16 precision.
    let again = dir.path().join("emb/again.safetensors");
    embed::<B>(&run, &device, &options(logs.clone(), again.clone())).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
    let half = dir.path().join("emb/half.safetensors");
    embed::<B>(
        &run,
        &device,
        &EmbedOptions {
            f16: true,
            ..options(logs, half.clone())
        },
    )
    .unwrap();
    let (hh, hd) = read_safetensors(&half);
    assert_eq!(hh["user_embeddings"]["dtype"], "F16");
    let h16: Vec<f32> = hd[..USERS * 64 * 2]
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    for (a, b) in h16.iter().zip(&values) {
        assert!((a - b).abs() <= 1e-2 * b.abs().max(1.0), "{a} vs {b}");
    }
}

#[test]
fn item_cache_batching_and_missing_services_do_not_change_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let run = bundle(dir.path());
    let logs = vec![data_root().join("s/logs")];
    let device = Default::default();
    let read = |name: &str, o: EmbedOptions| {
        let out = dir.path().join(name);
        embed::<B>(
            &run,
            &device,
            &EmbedOptions {
                out: out.clone(),
                ..o
            },
        )
        .unwrap();
        let (h, d) = read_safetensors(&out);
        let s = h["user_embeddings"]["data_offsets"][0].as_u64().unwrap() as usize;
        f32s(&d[s..s + USERS * 64 * 4])
    };
    let base = options(logs.clone(), PathBuf::new());
    let cached = read("a.safetensors", base.clone());
    let uncached = read(
        "b.safetensors",
        EmbedOptions {
            item_cache: false,
            ..base.clone()
        },
    );
    let alone = read(
        "c.safetensors",
        EmbedOptions {
            batch_size: 1,
            ..base.clone()
        },
    );
    for (x, y) in cached.iter().zip(&uncached) {
        assert!((x - y).abs() < 1e-5, "cache changes a value: {x} vs {y}");
    }
    for (x, y) in cached.iter().zip(&alone) {
        assert!((x - y).abs() < 1e-4, "batching changes a value: {x} vs {y}");
    }

    // A user with no `shop` behaviour: zeros there and has_shop = 0; their search part unchanged.
    let extra = common::write_log(
        dir.path(),
        "extra.csv",
        &[
            "zz_only_search,search,100,red running shoes",
            "zz_only_search,search,200,trail shoes",
        ],
    );
    let out = dir.path().join("m.safetensors");
    let mut inputs = logs.clone();
    inputs.push(extra);
    embed::<B>(
        &run,
        &device,
        &EmbedOptions {
            out: out.clone(),
            ..options(inputs, PathBuf::new())
        },
    )
    .unwrap();
    let users = std::fs::read_to_string(dir.path().join("m.users.csv")).unwrap();
    let row = users
        .lines()
        .find(|l| l.contains("zz_only_search"))
        .unwrap();
    assert!(row.ends_with(",1,0"), "{row}");
    let r: usize = row.split(',').next().unwrap().parse().unwrap();
    let (h, d) = read_safetensors(&out);
    let s = h["user_embeddings"]["data_offsets"][0].as_u64().unwrap() as usize;
    let v = f32s(&d[s + r * 64 * 4..s + (r + 1) * 64 * 4]);
    assert!(v[32..].iter().all(|x| *x == 0.0));
    assert!(v[..32].iter().any(|x| *x != 0.0));

    // Bad requests are refused with a message.
    let e = embed::<B>(&run, &device, &options(logs, dir.path().join("x.csv"))).unwrap_err();
    assert!(e.to_string().contains(".safetensors or .npy"), "{e}");
}

#[test]
fn eval_features_never_see_behaviour_after_the_first_target() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut items = String::from("item_id,text\n");
    for i in 0..150 {
        items.push_str(&format!("i{i},item number {i}\n"));
    }
    std::fs::write(d.join("items.csv"), items).unwrap();
    let mut inter = String::from("user_id,item_id,timestamp\n");
    let mut logs = vec![];
    for u in 0..60 {
        inter.push_str(&format!(
            "u{u},i{},1000\nu{u},i{},1100\n",
            u % 150,
            (u + 7) % 150
        ));
        logs.push(format!("u{u},search,900,early query {u}"));
        logs.push(format!("u{u},search,1000,query at the target time {u}"));
        logs.push(format!("u{u},shop,1200,late product {u}"));
        logs.push(format!("u{u},shop,,product without a time {u}"));
        logs.push(format!("u{u},shop,500,early product {u}"));
    }
    std::fs::write(d.join("inter.csv"), inter).unwrap();
    let rows: Vec<&str> = logs.iter().map(String::as_str).collect();
    common::write_log(d, "logs.csv", &rows);
    std::fs::write(
        d.join("task.toml"),
        "name = \"t\"\ninteractions = \"inter.csv\"\nitems = \"items.csv\"\n\
         [features]\nsource = \"logs\"\nlogs = [\"logs.csv\"]\nservices = [\"search\", \"shop\"]\n\
         [split]\nseed = 1\nvalid = 0.2\ntest = 0.2\n",
    )
    .unwrap();
    let task = Task::load(&d.join("task.toml")).unwrap();
    let data = load_task(&task, 16).unwrap();
    assert_eq!(data.users.len(), 60);
    assert_eq!(data.counts.feature_rows_dropped_for_leakage, 60 * 3);
    let texts: Vec<&str> = data
        .features
        .items
        .iter()
        .map(|(_, t)| t.as_str())
        .collect();
    assert!(texts.iter().all(|t| t.starts_with("early")), "{texts:?}");
    assert!(data.targets.iter().all(|t| t.len() == 2));
    // Users are split by hash: each split has users, none in two.
    assert!(data.counts.users.iter().all(|&n| n > 0));
    assert_eq!(data.counts.users.iter().sum::<usize>(), 60);

    // A task file with an unknown model or no feature source is refused.
    std::fs::write(d.join("bad.toml"), "name = \"t\"\ninteractions = \"inter.csv\"\nitems = \"items.csv\"\nmodels = [\"xgboost\"]\n[features]\nsource = \"history\"\nservice = \"x\"\n").unwrap();
    let e = Task::load(&d.join("bad.toml")).unwrap_err();
    assert!(e.to_string().contains("unknown model `xgboost`"), "{e}");
}

/// The models the eval test runs (the task-specific models' own tests train bst and deepfm).
const PROBED_MODELS: [&str; 7] = [
    "hybrid",
    "lightgcn",
    "clue",
    "text-mean",
    "noise",
    "toppop",
    "random",
];

#[test]
fn eval_compares_models_on_one_split_and_one_set_of_negatives() {
    let dir = tempfile::tempdir().unwrap();
    let run = bundle(dir.path());
    let task_path = data_root().join("s/tasks/news.toml");
    let mut text = std::fs::read_to_string(&task_path).unwrap();
    text.push_str("\n[probe]\nepochs = 30\npatience = 5\n[model.hybrid]\nbase = \"lightgcn\"\n");
    std::fs::write(&task_path, text).unwrap();
    let out = dir.path().join("eval");
    let o = EvalOptions {
        task: task_path,
        model: run.clone(),
        embeddings: None,
        out: out.clone(),
        seeds: 1,
        batch_size: 64,
        models: Some(PROBED_MODELS.map(String::from).to_vec()),
        // The same run again under another name: `--compare` must give clue's figures exactly.
        compare: vec![("again".into(), run.clone())],
    };
    // A compared name that is taken, or a directory that holds no run, fails before training.
    for (name, model) in [
        ("toppop", o.model.clone()),
        ("other", dir.path().join("nothing")),
    ] {
        let bad = EvalOptions {
            compare: vec![(name.into(), model)],
            out: dir.path().join("bad"),
            ..o.clone()
        };
        let err = eval::<Autodiff<B>>(&Default::default(), &bad).unwrap_err();
        assert!(!bad.out.join("results.json").exists(), "{name}: {err}");
    }
    let r = eval::<Autodiff<B>>(&Default::default(), &o).unwrap();
    let json = |m: &str| serde_json::to_value(r.models[m]).unwrap();
    assert_eq!(json("again"), json("clue"));
    assert_eq!(r.costs["again"].parameters, r.costs["clue"].parameters);
    // The compared run's bundle is recorded by its name: here the same bundle as the model's.
    assert_eq!(r.compared_bundle_sha256.len(), 1);
    assert_eq!(r.compared_bundle_sha256["again"], r.model_bundle_sha256);
    // Table 2's costs: learned models count their parameters, baselines have none.
    for (m, c) in &r.costs {
        let learned = !["toppop", "random"].contains(&m.as_str());
        assert_eq!(c.parameters > 0, learned, "{m}: {c:?}");
        assert!(c.seconds > 0.0 && c.peak_rss_mib > 0.0, "{m}: {c:?}");
    }
    // Table 4's groups: cold and heavy test users, every model scored within each.
    for g in ["cold", "heavy"] {
        let group = &r.groups[g];
        assert!(
            group.users > 0 && group.users < r.counts.users[2],
            "{g}: {group:?}"
        );
        assert_eq!(group.models.len(), 8);
        assert_eq!(group.models["random"].sampled.n, group.positives);
    }
    // The hybrid: the configured base with a projection of the CLUE features added.
    let base = r.hybrid_base.as_deref().unwrap_or_default();
    assert!(base.starts_with("lightgcn + CLUE features"), "{base}");
    assert!(r.costs["hybrid"].parameters > r.costs["lightgcn"].parameters);
    for m in PROBED_MODELS {
        assert!(r.models.contains_key(m), "{m} missing");
        assert_eq!(
            r.models[m].sampled.n, r.counts.positives[2],
            "every model ranks every test positive"
        );
    }
    // negatives.csv: one row per valid/test positive, 100 distinct negatives each.
    let negs = std::fs::read_to_string(out.join("negatives.csv")).unwrap();
    let rows: Vec<&str> = negs.lines().skip(1).collect();
    assert_eq!(rows.len(), r.counts.positives[1] + r.counts.positives[2]);
    for row in &rows {
        let f: Vec<&str> = row.split(',').collect();
        let n: Vec<&str> = f[2].split(' ').collect();
        assert_eq!(n.len(), 100);
        assert!(!n.contains(&f[1]));
    }
    // A random scorer lands near its expectation (HR@10 = 10/101), and the probe on frozen item
    // texts does clearly better than chance.
    let random = r.models["random"].sampled;
    assert!(
        (0.04..0.18).contains(&random.hr10),
        "random HR@10 {}",
        random.hr10
    );
    let best = r.models["text-mean"]
        .sampled
        .mrr
        .max(r.models["clue"].sampled.mrr);
    assert!(
        best > 1.5 * random.mrr,
        "probe MRR {best} vs random {}",
        random.mrr
    );
    // results.json and results.md are written, with the hashes.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert!(json["models"]["clue"]["sampled"]["hr@10"].is_number());
    assert!(json["models"]["clue"]["full"]["mrr"].is_number());
    assert_eq!(json["negatives_sha256"].as_str().unwrap().len(), 64);
    assert!(
        std::fs::read_to_string(out.join("results.md"))
            .unwrap()
            .contains("| task-agnostic | text-mean |")
    );
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    let at = |row: &str| {
        md.find(row)
            .unwrap_or_else(|| panic!("{row} missing:\n{md}"))
    };
    assert!(at("| task-agnostic | noise |") < at("| task-agnostic | again |"));
    assert!(at("| task-agnostic | again |") < at("| hybrid | hybrid |"));
    assert!(at("| hybrid | hybrid |") < at("| baseline | toppop |"));
    assert!(md.contains("hybrid: lightgcn + CLUE features"));

    // A history task with prefix rows cannot take CLUE features from a file of whole users.
    let market = EvalOptions {
        task: data_root().join("s/tasks/market.toml"),
        embeddings: Some(dir.path().join("users.safetensors")),
        models: Some(vec!["clue".into()]),
        compare: Vec::new(),
        out: dir.path().join("market"),
        ..o.clone()
    };
    let err = eval::<Autodiff<B>>(&Default::default(), &market).unwrap_err();
    assert!(err.to_string().contains("`prefixes` rows"), "{err}");
}

/// `clue embed` (its own reader, item cache and inference batches) gives, for every user of the
/// prepared data, the encoder's output on the training batcher's batch of the same users; so
/// does a flat model's (which reads tokens, never the item cache).
#[test]
fn embed_vectors_equal_the_training_paths_encoder_output() {
    embed_equals_training_path(ModelKind::Stacked);
    embed_equals_training_path(ModelKind::Flat);
}

fn embed_equals_training_path(kind: ModelKind) {
    use burn::data::dataloader::batcher::Batcher;
    use burn::data::dataset::Dataset;
    use clue::bundle::Bundle;
    use clue::data::batcher::{UserBatch, UserBatcher, UserDataset};
    let dir = tempfile::tempdir().unwrap();
    let run = bundle_of(dir.path(), kind);
    let device = Default::default();
    let out = dir.path().join("e/users.safetensors");
    embed::<B>(
        &run,
        &device,
        &options(vec![data_root().join("s/logs")], out.clone()),
    )
    .unwrap();

    let data = Arc::new(PreparedDataset::open(&data_root().join("p"), true).unwrap());
    let b = Bundle::<B>::load(&run, &device).unwrap();
    let m = &b.config.model;
    let n = data.num_users().min(48);
    let ds = UserDataset::with_users(
        data.clone(),
        (0..n as u32).collect(),
        m.max_items,
        m.max_item_tokens,
    );
    let samples = (0..n).map(|i| ds.get(i).unwrap()).collect();
    let batch: UserBatch<B> = UserBatcher::default().batch(samples, &device);
    let z: Vec<f32> = b
        .model
        .encoder
        .forward(&batch)
        .into_data()
        .to_vec()
        .unwrap();
    let dim = m.embedding_dim();
    let users: Vec<String> = data.user_ids[..n].to_vec();
    let (embedded, width) = clue::embed::format::read_embeddings(&out, &users).unwrap();
    let services = data.num_services();
    assert_eq!(width, services * dim);
    let mut worst = 0f32;
    for i in 0..n {
        for s in 0..services {
            let train = &z[(s * n + i) * dim..(s * n + i + 1) * dim];
            let emb = &embedded[i * width + s * dim..i * width + (s + 1) * dim];
            for (a, b) in train.iter().zip(emb) {
                worst = worst.max((a - b).abs());
            }
        }
    }
    assert!(worst <= 1e-5, "{kind:?}: max |Δ| = {worst}");
    assert!(z.iter().any(|v| v.abs() > 1e-3), "non-trivial embeddings");
}
