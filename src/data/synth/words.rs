//! The made-up words and the fixed phrases `clue synth`'s texts are built from.

use rand::Rng;
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;

const SYLLABLES: [&str; 40] = [
    "ka", "lo", "mi", "ta", "re", "su", "no", "vi", "ba", "de", "po", "lu", "zi", "fa", "ge", "ho",
    "ri", "sa", "tu", "ne", "mo", "ki", "la", "pe", "do", "ra", "si", "ve", "nu", "ga", "bo", "li",
    "te", "ma", "ju", "co", "xa", "wi", "ye", "qu",
];
pub(super) const MODIFIERS: [&str; 14] = [
    "best", "cheap", "near me", "review", "how to", "price", "vs", "new", "used", "2024", "guide",
    "for kids", "sale", "top 10",
];
pub(super) const ADJECTIVES: [&str; 16] = [
    "Premium",
    "Classic",
    "Compact",
    "Deluxe",
    "Essential",
    "Portable",
    "Lightweight",
    "Pro",
    "Original",
    "Eco",
    "Ultra",
    "Mini",
    "Smart",
    "Soft",
    "Heavy Duty",
    "Vintage",
];
pub(super) const SPECS: [&str; 12] = [
    "Set of 2",
    "500ml",
    "XL",
    "Black",
    "White",
    "1kg",
    "Pack of 10",
    "Large",
    "Size M",
    "Blue",
    "30cm",
    "Gift Box",
];
pub(super) const MARKET_SPECS: [&str; 8] = [
    "50ml",
    "Travel Size",
    "Refill",
    "2-pack",
    "Limited",
    "Trial Kit",
    "No.3",
    "Matte",
];
pub(super) const NEWS_VERBS: [&str; 10] = [
    "surges",
    "faces",
    "meets",
    "unveils",
    "boosts",
    "questions",
    "wins",
    "delays",
    "joins",
    "tops",
];

pub(super) fn word(rng: &mut ChaCha8Rng) -> String {
    let n = rng.random_range(2..=3);
    (0..n)
        .map(|_| *SYLLABLES.choose(rng).expect("non-empty"))
        .collect()
}

pub(super) fn capitalise(w: &str) -> String {
    let mut c = w.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}
