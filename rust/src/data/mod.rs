//! Text in: tokenizers (the byte tokenizer, or Hugging Face `tokenizer.json` through the
//! `tokenizers` crate), corpus readers (text, JSONL, gzip'd JSONL), and memory-mapped token
//! shards built once per corpus and tokenizer.
//!
//! Layout: `tokenizer` (one type for bytes and Hugging Face), `special` (BOS/EOS as a model
//! folder states them), `train` (BPE training from a corpus), `corpus` (inputs and document
//! readers), `shards` (build, cache, open, read windows), `progress` (a counter the host
//! polls while a long call runs).

pub mod corpus;
pub mod progress;
pub mod shards;
pub mod special;
pub mod tokenizer;
pub mod train;

pub use progress::Progress;
pub use shards::{BuildSpec, Shards, Split};
pub use tokenizer::Tokenizer;
