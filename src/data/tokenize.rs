//! Byte-level BPE tokenisation of item texts, and the service-type prefix tokens.
//!
//! Each item becomes `[<svc:NAME>] + BPE(text)`, cut to `max_item_tokens`; id 0 is padding. A
//! tokenizer trained here puts `<pad>` at id 0. An existing `tokenizer.json` whose id 0 is a real
//! token (GPT-2's `!`) gets every id shifted by one (`id_offset = 1`) so that 0 stays free.

use std::path::Path;

use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use crate::error::{ClueError, Result};

pub const PAD_TOKEN: &str = "<pad>";

/// The special token that tells the encoder which service an item comes from.
pub fn service_token(service: &str) -> String {
    format!("<svc:{service}>")
}

/// A default vocabulary size for `n_texts` distinct item texts: large enough to give whole-word
/// tokens for frequent words, never above the paper's 50,257.
pub fn default_vocab_size(n_texts: usize) -> usize {
    (1_000 + n_texts / 2).min(50_257)
}

/// The tokenizer used by one prepared dataset, with the ids of its service prefixes.
pub struct ItemTokenizer {
    pub tokenizer: Tokenizer,
    /// Added to every tokenizer id so that 0 is free for padding.
    pub id_offset: u32,
    /// Prefix token id (offset applied) of each service, in the dataset's service order.
    pub service_ids: Vec<u32>,
}

impl ItemTokenizer {
    /// Train a byte-level BPE on `texts` (each distinct item text once).
    pub fn train<'a>(
        texts: impl Iterator<Item = &'a str> + Send,
        vocab_size: usize,
        services: &[String],
    ) -> Result<Self> {
        let mut special = vec![AddedToken::from(PAD_TOKEN, true)];
        special.extend(
            services
                .iter()
                .map(|s| AddedToken::from(service_token(s), true)),
        );
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(special)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut tokenizer = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None::<tokenizers::NormalizerWrapper>)
            .with_pre_tokenizer(Some(ByteLevel::default()))
            .with_post_processor(Some(ByteLevel::default()))
            .with_decoder(Some(ByteLevel::default()))
            .build()
            .map_err(|e| {
                ClueError::config(
                    format!("cannot build the tokenizer: {e}"),
                    "report this as a bug",
                )
            })?;
        tokenizer.train(&mut trainer, texts).map_err(|e| {
            ClueError::config(
                format!("tokenizer training failed: {e}"),
                "check that the logs hold item texts",
            )
        })?;
        let tokenizer = Tokenizer::from(tokenizer);
        Self::with_services(tokenizer, services, Path::new("<trained>"))
    }

    /// Load an existing `tokenizer.json` and add the service tokens it lacks.
    pub fn load(path: &Path, services: &[String]) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| {
            ClueError::bad_file(
                path,
                format!("cannot load the tokenizer: {e}"),
                "give a tokenizer.json written by Hugging Face tokenizers",
            )
        })?;
        Self::with_services(tokenizer, services, path)
    }

    fn with_services(mut tokenizer: Tokenizer, services: &[String], path: &Path) -> Result<Self> {
        let id_offset = match tokenizer.id_to_token(0) {
            Some(t) if t == PAD_TOKEN || t == "<|padding|>" || t == "[PAD]" || t == "<pad>" => 0,
            _ => 1,
        };
        let missing: Vec<AddedToken> = services
            .iter()
            .map(|s| service_token(s))
            .filter(|t| tokenizer.token_to_id(t).is_none())
            .map(|t| AddedToken::from(t, true))
            .collect();
        tokenizer.add_special_tokens(&missing);
        // Text is only ever text: `<svc:shop>` or `<pad>` written in a log is encoded as its
        // characters, never as the reserved token (the prefix is added by id).
        tokenizer.set_encode_special_tokens(true);
        let service_ids = services
            .iter()
            .map(|s| {
                tokenizer
                    .token_to_id(&service_token(s))
                    .map(|id| id + id_offset)
                    .ok_or_else(|| {
                        ClueError::bad_file(
                            path,
                            format!("service token for `{s}` missing"),
                            "report this as a bug",
                        )
                    })
            })
            .collect::<Result<Vec<u32>>>()?;
        Ok(Self {
            tokenizer,
            id_offset,
            service_ids,
        })
    }

    /// Vocabulary size the model's embedding table needs (ids `0..vocab_size()`).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true) + self.id_offset as usize
    }

    /// Token ids of many items in parallel: `[service prefix] + BPE(text)` cut to `max_tokens`.
    pub fn encode_items(
        &self,
        items: &[(usize, &str)],
        max_tokens: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let texts: Vec<(Option<u32>, &str)> = items
            .iter()
            .map(|(s, t)| (Some(self.service_ids[*s]), *t))
            .collect();
        self.encode_texts(&texts, max_tokens)
    }

    /// Token ids of texts with an optional prefix token id each, cut to `max_tokens`.
    pub fn encode_texts(
        &self,
        items: &[(Option<u32>, &str)],
        max_tokens: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let texts: Vec<&str> = items.iter().map(|(_, t)| *t).collect();
        let encodings = self.tokenizer.encode_batch(texts, false).map_err(|e| {
            ClueError::config(format!("tokenisation failed: {e}"), "report this as a bug")
        })?;
        Ok(items
            .iter()
            .zip(encodings)
            .map(|((prefix, _), enc)| {
                prefix
                    .iter()
                    .copied()
                    .chain(enc.get_ids().iter().map(|id| id + self.id_offset))
                    .take(max_tokens)
                    .collect()
            })
            .collect())
    }

    /// Write `tokenizer.json` (loadable by Python's `tokenizers.Tokenizer.from_file`).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.tokenizer
            .save(path, false)
            .map_err(|e| ClueError::io(path, std::io::Error::other(e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trained() -> ItemTokenizer {
        let texts = [
            "red running shoes",
            "blue running shirt",
            "red shirt",
            "green shoes for running",
        ];
        let services = vec!["search".to_string(), "shop".to_string()];
        ItemTokenizer::train(texts.iter().copied().cycle().take(40), 300, &services).unwrap()
    }

    #[test]
    fn pad_is_zero_and_items_start_with_their_service_prefix() {
        let tok = trained();
        assert_eq!(tok.id_offset, 0);
        assert_eq!(tok.tokenizer.token_to_id(PAD_TOKEN), Some(0));
        let items = tok
            .encode_items(&[(0, "red shoes"), (1, "red shoes")], 32)
            .unwrap();
        assert_eq!(items[0][0], tok.service_ids[0]);
        assert_eq!(items[1][0], tok.service_ids[1]);
        assert_ne!(tok.service_ids[0], tok.service_ids[1]);
        assert_eq!(items[0][1..], items[1][1..], "same text, same BPE tokens");
        assert!(
            items.iter().flatten().all(|&id| id != 0),
            "0 is reserved for padding"
        );
    }

    #[test]
    fn reserved_tokens_cannot_come_from_text() {
        let tok = trained();
        let ids = tok
            .encode_items(&[(0, "<svc:shop> red <pad> shoes")], 64)
            .unwrap();
        assert_eq!(ids[0][0], tok.service_ids[0], "the item's own prefix");
        assert!(
            !ids[0][1..].contains(&tok.service_ids[1]) && !ids[0][1..].contains(&0),
            "{:?}",
            ids[0]
        );
    }

    #[test]
    fn items_are_cut_to_max_tokens() {
        let tok = trained();
        let long = "red running shoes blue running shirt green shoes for running red shirt";
        let ids = tok.encode_items(&[(0, long)], 5).unwrap();
        assert_eq!(ids[0].len(), 5);
    }

    #[test]
    fn saved_tokenizer_round_trips_text() {
        let tok = trained();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let back = Tokenizer::from_file(&path).unwrap();
        let enc = back.encode("blue running shoes", false).unwrap();
        assert_eq!(
            back.decode(enc.get_ids(), true).unwrap().trim(),
            "blue running shoes"
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(json["model"]["type"], "BPE");
        assert_eq!(json["pre_tokenizer"]["type"], "ByteLevel");
    }

    #[test]
    fn external_tokenizer_without_pad_gets_shifted_ids() {
        let tok = trained();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        // A tokenizer whose id 0 is a real token, as GPT-2's is.
        let mut json: serde_json::Value =
            serde_json::from_str(&tok.tokenizer.to_string(false).unwrap()).unwrap();
        json["added_tokens"] = serde_json::json!([]);
        let vocab = json["model"]["vocab"].as_object_mut().unwrap();
        vocab.remove(PAD_TOKEN);
        vocab.insert("!".into(), 0.into());
        std::fs::write(&path, json.to_string()).unwrap();
        let services = vec!["news".to_string()];
        let ext = ItemTokenizer::load(&path, &services).unwrap();
        assert_eq!(ext.id_offset, 1);
        let ids = ext.encode_items(&[(0, "!")], 8).unwrap();
        assert_eq!(ids[0][0], ext.service_ids[0]);
        assert!(ids[0].iter().all(|&id| id != 0));
        assert!(ids[0].iter().all(|&id| (id as usize) < ext.vocab_size()));
    }
}
