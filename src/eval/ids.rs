//! A task's behaviour as ids, for the task-specific models that learn everything from scratch
//! (paper §4.2: DeepFM, BST, LightGCN): one item vocabulary (the task's catalogue first, then the
//! feature items that are not in it), each user's feature items as vocabulary ids, and each
//! item's text as word ids. The [`ItemTower`] every such model shares embeds an item as its id's
//! vector plus the mean of its words' vectors, both trained on the task alone.

use std::collections::HashMap;
use std::sync::Arc;

use burn::nn::Embedding;
use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;

use crate::eval::task::Source;
use crate::eval::task_data::TaskData;
use crate::model::init::Init;
use crate::model::ops::{SparseMatrix, sparse_times};

/// Words kept per item text (distinct, in order).
pub const MAX_WORDS: usize = 16;

/// The id view of a task.
pub struct IdData {
    /// Catalogue items: vocabulary ids `0..n_items`, in the task's item order.
    pub n_items: usize,
    /// Catalogue items plus the feature items outside it.
    pub vocab: usize,
    /// Word ids (1-based; 0 is padding) of every vocabulary item, at most [`MAX_WORDS`].
    pub words: Vec<Vec<u32>>,
    /// Distinct words plus the padding id.
    pub n_words: usize,
    /// Each user's feature items as vocabulary ids: services in the task's order, each oldest
    /// first.
    pub seqs: Vec<Vec<u32>>,
}

impl IdData {
    /// `source = "history"`: feature items are the task's own items (matched by text), so a
    /// model sees the same id in a history and as a target. `source = "logs"`: they are items of
    /// other services and get ids of their own after the catalogue.
    pub fn new(data: &TaskData, source: Source) -> Self {
        let n_items = data.item_ids.len();
        let mut by_text: HashMap<&str, u32> = HashMap::new();
        for (i, t) in data.item_texts.iter().enumerate() {
            by_text.entry(t.as_str()).or_insert(i as u32);
        }
        let mut texts: Vec<&str> = data.item_texts.iter().map(String::as_str).collect();
        let feature_id: Vec<u32> = data
            .features
            .items
            .iter()
            .map(|(_, text)| match (source, by_text.get(text.as_str())) {
                (Source::History, Some(&i)) => i,
                _ => {
                    texts.push(text);
                    (texts.len() - 1) as u32
                }
            })
            .collect();
        let seqs = data
            .features
            .seqs
            .iter()
            .map(|per| {
                per.iter()
                    .flatten()
                    .map(|&f| feature_id[f as usize])
                    .collect()
            })
            .collect();
        let (words, n_words) = word_ids(&texts);
        Self {
            n_items,
            vocab: texts.len(),
            words,
            n_words,
            seqs,
        }
    }

    /// Every vocabulary item's word bag as a `[vocab, n_words]` matrix of weights 1/|bag|, so
    /// that its product with a word table gives every item's mean word vector
    /// ([`ItemTower::all`]).
    pub fn word_bags(&self) -> SparseMatrix {
        let mut entries = Vec::new();
        for (i, bag) in self.words.iter().enumerate() {
            entries.extend(bag.iter().map(|&w| (i as u32, w, 1.0 / bag.len() as f32)));
        }
        SparseMatrix::new(self.vocab, self.n_words, &entries)
    }
}

/// Lower-cased alphanumeric words of every text as ids; a word must occur in two texts to get
/// an id (a word of one item says nothing its id does not). Ids follow first appearance.
fn word_ids(texts: &[&str]) -> (Vec<Vec<u32>>, usize) {
    let split = |t: &str| -> Vec<String> {
        t.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let tokenised: Vec<Vec<String>> = texts.iter().map(|t| split(t)).collect();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for words in &tokenised {
        let mut seen: Vec<&str> = words.iter().map(String::as_str).collect();
        seen.sort_unstable();
        seen.dedup();
        for w in seen {
            *count.entry(w).or_default() += 1;
        }
    }
    let mut id: HashMap<&str, u32> = HashMap::new();
    let ids = tokenised
        .iter()
        .map(|words| {
            let mut out: Vec<u32> = Vec::new();
            for w in words {
                if count[w.as_str()] < 2 {
                    continue;
                }
                let next = id.len() as u32 + 1;
                let i = *id.entry(w.as_str()).or_insert(next);
                if !out.contains(&i) && out.len() < MAX_WORDS {
                    out.push(i);
                }
            }
            out
        })
        .collect();
    (ids, id.len() + 1)
}

/// An item's vector: its id's embedding plus the mean of its words' embeddings.
#[derive(Module, Debug)]
pub struct ItemTower<B: Backend> {
    id: Embedding<B>,
    word: Embedding<B>,
}

impl<B: Backend> ItemTower<B> {
    pub fn new(ids: &IdData, dim: usize, init: &mut Init<B>) -> Self {
        Self {
            id: init.embedding(ids.vocab, dim),
            word: init.embedding(ids.n_words, dim),
        }
    }

    /// `[items.len(), dim]`.
    pub fn forward(&self, ids: &IdData, items: &[usize]) -> Tensor<B, 2> {
        let device = self.id.weight.device();
        let n = items.len();
        let id = self
            .id
            .forward(int_tensor(items.iter().map(|&i| i as i64), [1, n], &device))
            .reshape([n, self.id.weight.dims()[1]]);
        id + bag_mean(
            self.word.weight.val(),
            items.iter().map(|&i| &ids.words[i][..]),
        )
    }

    /// `[vocab, dim]`: every vocabulary item's vector, the whole id table plus the word bags
    /// `bags` ([`IdData::word_bags`]) times the word table: the same as `forward` over all items,
    /// without gathering the id table or scattering its gradient.
    pub fn all(&self, bags: &Arc<SparseMatrix>) -> Tensor<B, 2> {
        self.id.weight.val() + sparse_times(bags, self.word.weight.val())
    }
}

/// Row `r` of the result: the mean of the rows of `table` that bag `r` lists (0 for an empty
/// bag), as one gather and one scatter-add (differentiable, no padding).
pub fn bag_mean<'a, B: Backend>(
    table: Tensor<B, 2>,
    bags: impl ExactSizeIterator<Item = &'a [u32]>,
) -> Tensor<B, 2> {
    let (n, d) = (bags.len(), table.dims()[1]);
    let device = table.device();
    let (mut rows, mut idx, mut weight) = (Vec::new(), Vec::new(), Vec::new());
    for (r, bag) in bags.enumerate() {
        for &t in bag {
            rows.push(r as i64);
            idx.push(t as i64);
            weight.push(1.0 / bag.len() as f32);
        }
    }
    let out = Tensor::<B, 2>::zeros([n, d], &device);
    if idx.is_empty() {
        return out;
    }
    let m = idx.len();
    let weight = Tensor::<B, 1>::from_data(TensorData::new(weight, [m]), &device).reshape([m, 1]);
    let values = table.select(0, int_tensor(idx, [m], &device)) * weight;
    out.select_assign(
        0,
        int_tensor(rows, [m], &device),
        values,
        IndexingUpdateOp::Add,
    )
}

/// An integer tensor of the given shape from host values.
pub fn int_tensor<B: Backend, const D: usize>(
    values: impl IntoIterator<Item = i64>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D, Int> {
    let v: Vec<i64> = values.into_iter().collect();
    let n = v.len();
    Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), device).reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::history::Histories;
    use crate::data::store::Split;

    #[test]
    fn history_items_share_the_catalogue_ids_and_log_items_get_their_own() {
        let mut d = TaskData::for_test(vec![vec![0], vec![1]], vec![Split::Train; 2], 3);
        d.item_texts = vec!["Red apple".into(), "green apple".into(), "plum".into()];
        d.features = Histories {
            users: d.users.clone(),
            services: vec!["market".into()],
            items: vec![(0, "plum".into()), (0, "red APPLE".into())],
            seqs: vec![vec![vec![1, 0]], vec![vec![0]]],
            ..Default::default()
        };
        let h = IdData::new(&d, Source::History);
        // "plum" is catalogue item 2; "red APPLE" is no catalogue text: a new id 3.
        assert_eq!((h.n_items, h.vocab), (3, 4));
        assert_eq!(h.seqs, [vec![3, 2], vec![2]]);
        let l = IdData::new(&d, Source::Logs);
        assert_eq!(l.vocab, 5);
        assert_eq!(l.seqs, [vec![4, 3], vec![3]]);
        // Words in two texts: "red" (items 0, 3), "apple" (0, 1, 3); "plum" twice in `l`.
        assert_eq!(h.words[0], [1, 2]);
        assert_eq!(h.words[1], [2]);
        assert_eq!(h.words[2], Vec::<u32>::new(), "plum is one text in h");
        assert_eq!(h.words[3], [1, 2]);
        assert_eq!(h.n_words, 3);
        assert_eq!(l.words[3], [3]);
    }

    #[test]
    fn the_whole_vocabulary_at_once_matches_the_tower_item_by_item() {
        use burn::backend::{Flex, NdArray};
        fn check<B: Backend>(ids: &IdData) {
            let tower = ItemTower::<B>::new(ids, 4, &mut Init::new(3, &Default::default()));
            let all: Vec<usize> = (0..ids.vocab).collect();
            let want: Vec<f32> = tower
                .forward(ids, &all)
                .into_data()
                .convert::<f32>()
                .to_vec()
                .unwrap();
            let bags = Arc::new(ids.word_bags());
            let got: Vec<f32> = tower
                .all(&bags)
                .into_data()
                .convert::<f32>()
                .to_vec()
                .unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
            }
        }
        let mut d = TaskData::for_test(vec![vec![0], vec![1]], vec![Split::Train; 2], 3);
        d.item_texts = vec![
            "red apple pie".into(),
            "green apple pie".into(),
            "plum".into(),
        ];
        d.features.seqs = vec![vec![]; 2];
        let ids = IdData::new(&d, Source::History);
        // Items 0 and 1 hold two words each ("apple", "pie": weights 1/2); item 2 ("plum") none:
        // its vector is its id's alone.
        assert!(ids.words[0].len() == 2 && ids.words[1].len() == 2 && ids.words[2].is_empty());
        check::<NdArray>(&ids);
        check::<Flex>(&ids);
    }
}
