//! The task files `clue synth` writes beside its task data.

/// The split and negatives of both synthetic tasks.
pub(super) const TASK_PROTOCOL: &str = "
[split]
seed = 7
valid = 0.1
test = 0.2

[negatives]
count = 100
seed = 13
";

/// `tasks/news.toml`: the paper's setting (features from the pretraining services).
pub(super) const NEWS_TASK: &str = r#"# Written by `clue synth`. Run: clue eval --task <this file> --model runs/<name> --out DIR
name = "news"
description = "News a user reads next: a held-out service of the same company. User features: the user's search and shop logs strictly before their first news read."
interactions = "news/interactions.csv"
items = "news/items.csv"
models = ["bst", "lightgcn", "deepfm", "clue", "text-mean", "untrained", "noise", "hybrid", "toppop", "random"]

[features]
source = "logs"
logs = ["../logs"]
services = ["search", "shop"]
"#;

/// `tasks/market.toml`: inter-company transfer (features from the task's own history).
pub(super) const MARKET_TASK: &str = r#"# Written by `clue synth`. Run: clue eval --task <this file> --model runs/<name> --out DIR
name = "market"
description = "Next product at another company (other user ids, other title templates). User features: the frozen encoder reads the user's earlier products there as one service (inter-company transfer)."
interactions = "market/interactions.csv"
items = "market/items.csv"
models = ["bst", "lightgcn", "deepfm", "clue", "text-mean", "untrained", "noise", "hybrid", "toppop", "random"]

[features]
source = "history"
service = "market"
as_service = "shop"
items_as_service = "shop"
targets = 1
# Training users also learn from (earlier products → the next one) pairs, their last 10.
prefixes = 10
"#;
