//! `lightgcn` (He et al., SIGIR 2020), a task-specific model: user and item vectors smoothed over
//! the bipartite user–item graph by `layers` steps of normalised neighbour sums, the final vector
//! the mean of every step's; score = dot product.
//!
//! The graph holds every user's **feature** interactions (all splits: a valid or test user enters
//! the graph through their behaviour before their targets) and the **training** users' targets.
//! A valid or test user's target is never an edge ([`Graph::new`]). A training user's history
//! prefix rows (`prefixes` in a task) are no nodes of their own: each is scored and trained
//! through its user's node, which already holds the prefix's items, so the graph and its
//! degrees are those without prefixes plus the prefix targets as edges of their user.

use std::collections::BTreeSet;
use std::sync::Arc;

use burn::nn::Embedding;
use burn::prelude::*;

use crate::data::store::Split;
use crate::eval::hybrid::{FeatureTower, user_side};
use crate::eval::ids::{IdData, ItemTower, int_tensor};
use crate::eval::probe::Matrix;
use crate::eval::task::LightGcnConfig;
use crate::eval::task_data::TaskData;
use crate::model::init::Init;
use crate::model::ops::{SparseMatrix, sparse_times};

/// The interaction graph: distinct (user node, vocabulary item) edges, as the normalised
/// adjacency `[users, vocab]` of weights 1/√(deg(user)·deg(item)) and its transpose. User nodes
/// are the task's users (at least one); `node` maps every row (prefix rows included) to its
/// user's node.
pub struct Graph {
    to_users: Arc<SparseMatrix>,
    to_items: Arc<SparseMatrix>,
    /// Every vocabulary item's word bag ([`IdData::word_bags`]).
    bags: Arc<SparseMatrix>,
    users: usize,
    node: Vec<usize>,
}

impl Graph {
    pub fn new(ids: &IdData, data: &TaskData) -> Self {
        let users = data.task_users.max(1);
        let node: Vec<usize> = (0..ids.seqs.len()).map(|r| data.owner(r)).collect();
        let mut set = BTreeSet::new();
        for (u, seq) in ids.seqs.iter().enumerate().take(users) {
            set.extend(seq.iter().map(|&i| (u as u32, i)));
        }
        for (r, &n) in node.iter().enumerate() {
            if data.split[r] == Split::Train {
                set.extend(data.targets[r].iter().map(|&i| (n as u32, i as u32)));
            }
        }
        let edges: Vec<(u32, u32)> = set.into_iter().collect();
        let (mut du, mut di) = (vec![0f32; users], vec![0f32; ids.vocab]);
        for &(u, i) in &edges {
            du[u as usize] += 1.0;
            di[i as usize] += 1.0;
        }
        let weighted: Vec<(u32, u32, f32)> = edges
            .iter()
            .map(|&(u, i)| (u, i, 1.0 / (du[u as usize] * di[i as usize]).sqrt()))
            .collect();
        let to_users = SparseMatrix::new(users, ids.vocab, &weighted);
        Self {
            to_items: Arc::new(to_users.transpose()),
            to_users: Arc::new(to_users),
            bags: Arc::new(ids.word_bags()),
            users,
            node,
        }
    }
}

#[derive(Module, Debug)]
pub struct LightGcn<B: Backend> {
    users: Embedding<B>,
    items: ItemTower<B>,
    layers: usize,
    /// `hybrid`: CLUE user features, added to the propagated user vector.
    clue: Option<FeatureTower<B>>,
}

impl<B: Backend> LightGcn<B> {
    /// `clue_cols`: the width of the user features of a `hybrid` (`None`: plain LightGCN).
    pub fn new(
        c: &LightGcnConfig,
        ids: &IdData,
        g: &Graph,
        clue_cols: Option<usize>,
        init: &mut Init<B>,
    ) -> Self {
        Self {
            users: init.embedding(g.users, c.dim),
            items: ItemTower::new(ids, c.dim, init),
            layers: c.layers,
            clue: FeatureTower::new(clue_cols, c.dim, init),
        }
    }

    /// The final vectors `[users.len(), dim]` of the user rows `users`: their user's node
    /// (with a hybrid's projected features of the row itself added).
    fn user_vectors(
        &self,
        g: &Graph,
        all: Tensor<B, 2>,
        clue: Option<&Matrix>,
        users: &[usize],
    ) -> Tensor<B, 2> {
        let device = all.device();
        let n = users.len();
        let nodes = users.iter().map(|&x| g.node[x] as i64);
        let u = all.select(0, int_tensor(nodes, [n], &device));
        match user_side(&self.clue, clue, users) {
            Some(c) => u + c,
            None => u,
        }
    }

    /// Final user `[users, dim]` and item `[vocab, dim]` vectors.
    pub fn propagate(&self, g: &Graph) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let (mut user, mut item) = (self.users.weight.val(), self.items.all(&g.bags));
        let (mut user_sum, mut item_sum) = (user.clone(), item.clone());
        for _ in 0..self.layers {
            (user, item) = (
                sparse_times(&g.to_users, item),
                sparse_times(&g.to_items, user),
            );
            user_sum = user_sum + user.clone();
            item_sum = item_sum + item.clone();
        }
        let k = (self.layers + 1) as f64;
        (user_sum / k, item_sum / k)
    }

    /// Logits `[n]` of (user row, catalogue item) pairs; `clue`: a hybrid's user features.
    pub fn score(
        &self,
        g: &Graph,
        clue: Option<&Matrix>,
        users: &[usize],
        items: &[usize],
    ) -> Tensor<B, 1> {
        let device = self.users.weight.device();
        let (u, i) = self.propagate(g);
        let n = users.len();
        let u = self.user_vectors(g, u, clue, users);
        let i = i.select(0, int_tensor(items.iter().map(|&x| x as i64), [n], &device));
        (u * i).sum_dim(1).reshape([n])
    }

    /// Scores `[rows, n_items]` of the users `rows` over the catalogue.
    pub fn score_catalogue(
        &self,
        ids: &IdData,
        g: &Graph,
        clue: Option<&Matrix>,
        rows: &[usize],
    ) -> Vec<f32> {
        let (u, i) = self.propagate(g);
        let u = self.user_vectors(g, u, clue, rows);
        let i = i.narrow(0, 0, ids.n_items);
        crate::eval::probe::host(u.matmul(i.transpose()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::task::Source;

    fn edges(g: &Graph) -> Vec<(usize, usize)> {
        g.to_users.entries().map(|(u, i, _)| (u, i)).collect()
    }

    #[test]
    fn the_graph_holds_features_of_everyone_and_targets_of_training_users_only() {
        let mut d = TaskData::for_test(
            vec![vec![0], vec![1], vec![2]],
            vec![Split::Train, Split::Valid, Split::Test],
            4,
        );
        d.features.items = vec![(0, "x".into())];
        d.features.seqs = vec![vec![vec![0]]; 3];
        let ids = IdData::new(&d, Source::Logs);
        let g = Graph::new(&ids, &d);
        // Feature item "x" is vocabulary id 4 (after the 4 catalogue items).
        assert_eq!(edges(&g), [(0, 0), (0, 4), (1, 4), (2, 4)]);
        // Item 4 has degree 3, user 0 degree 2.
        let (user, item, w) = g.to_users.entries().nth(1).unwrap();
        assert_eq!((user, item), (0, 4));
        assert!((w - 1.0 / 6f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn prefix_rows_are_scored_through_their_users_node_and_add_no_node_or_feature_edge() {
        use crate::data::history::Histories;
        // History task: a (train) x y z → target w; b (test) y x → target z.
        let mut d = TaskData::for_test(vec![vec![3], vec![2]], vec![Split::Train, Split::Test], 4);
        d.item_texts = ["x", "y", "z", "w"].map(String::from).to_vec();
        d.features = Histories {
            users: d.users.clone(),
            services: vec!["market".into()],
            items: ["x", "y", "z"].map(|t| (0, t.to_string())).to_vec(),
            seqs: vec![vec![vec![0, 1, 2]], vec![vec![1, 0]]],
            ..Default::default()
        };
        d.activity = vec![3, 2];
        let plain = Graph::new(&IdData::new(&d, Source::History), &d);
        d.add_prefix_rows(10);
        assert_eq!(d.counts.prefix_pairs, 2, "a: (x → y), (x y → z)");
        let g = Graph::new(&IdData::new(&d, Source::History), &d);
        assert_eq!((g.users, &g.node[..]), (2, &[0, 1, 0, 0][..]));
        // The prefix targets y and z are already a's items: the graph is the same, and b's
        // target z is no edge.
        assert_eq!(edges(&g), edges(&plain));
        assert_eq!(edges(&g), [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]);
    }
}
