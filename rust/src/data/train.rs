//! Training a tokenizer from a corpus, for pre-training from scratch: byte-level BPE as
//! LLaMA 3 has it (its split regex, ByteLevel pre-tokenizer and decoder, so every input is
//! encodable), `<|begin_of_text|>` / `<|end_of_text|>` as BOS / EOS, fed streaming from the
//! corpus readers and saved as `tokenizer.json` + `tokenizer_config.json` into a folder that
//! must be new or empty (built beside it and renamed into place: no user file is replaced).

use super::corpus::{self, Docs};
use super::progress::Progress;
use super::tokenizer::Tokenizer;
use crate::hf::folder::Staging;
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;
use std::sync::Mutex;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::sequence::Sequence as PostSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, TokenizerImpl};

pub const BOS: &str = "<|begin_of_text|>";
pub const EOS: &str = "<|end_of_text|>";
/// LLaMA 3's pre-tokenizer split.
pub const SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What to train: JSON from the host.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    pub inputs: Vec<String>,
    pub vocab_size: usize,
    #[serde(default)]
    pub text_field: Option<String>,
    pub out: String,
}

fn lib_err(what: &str) -> impl Fn(tokenizers::Error) -> Error + '_ {
    move |e| Error::invalid(format!("{what}: {}", e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")))
}

/// Trains, saves into `spec.out`, and opens the result.
pub fn train(spec: &TrainSpec, progress: Option<&Progress>) -> Result<Tokenizer> {
    // 256 byte symbols and the two specials come first; merges fill the rest.
    if spec.vocab_size < 259 || spec.vocab_size > 1 << 24 {
        return Err(Error::invalid(format!("vocab_size {}: must be in [259, 16777216] (256 bytes + BOS + EOS + merges)", spec.vocab_size)));
    }
    if spec.inputs.is_empty() {
        return Err(Error::invalid("tokenizer training: no inputs given"));
    }
    let mut inputs = vec![];
    for i in &spec.inputs {
        inputs.extend(corpus::list(Path::new(i))?);
    }
    if let Some(p) = progress {
        p.set_total(inputs.iter().map(|i| i.size).sum());
    }
    let field = spec.text_field.clone().unwrap_or_else(|| corpus::TEXT_FIELD.into());
    // Checked before training: a folder holding anything is refused before hours are spent.
    let dir = Path::new(&spec.out);
    let stage = Staging::named(dir, "tokenizer training")?;
    let split = Split::new(SplitPattern::Regex(SPLIT.into()), SplitDelimiterBehavior::Isolated, false).map_err(lib_err("split regex"))?;
    let pre = Sequence::new(vec![PreTokenizerWrapper::Split(split), PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false))]);
    let mut tk: TokenizerImpl<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper> = TokenizerImpl::new(BPE::default());
    tk.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(pre)));
    tk.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    let mut trainer = BpeTrainer::builder()
        .vocab_size(spec.vocab_size)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    // The trainer takes an iterator of texts; a reader error ends it and is reported after.
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let mut docs = Docs::new(inputs, &field, progress);
    let mut count = 0u64;
    let texts = std::iter::from_fn(|| match docs.next()? {
        Ok(d) => {
            count += 1;
            Some(d.text)
        }
        Err(e) => {
            *failure.lock().unwrap() = Some(e);
            None
        }
    });
    tk.train(&mut trainer, texts).map_err(lib_err("tokenizer training"))?;
    if let Some(e) = failure.into_inner().unwrap() {
        return Err(e);
    }
    if count == 0 {
        return Err(Error::invalid(format!("{}: empty corpus (no documents)", spec.inputs.join(", "))));
    }
    let bos = tk.token_to_id(BOS).ok_or_else(|| Error::backend("trained tokenizer lacks BOS"))?;
    let template = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .and_then(|b| b.try_pair(format!("{BOS} $A {BOS} $B")))
        .map_err(|e| Error::backend(format!("template: {e}")))?
        .special_tokens(vec![(BOS.to_string(), bos)])
        .build()
        .map_err(|e| Error::backend(format!("template: {e}")))?;
    tk.with_post_processor(Some(PostProcessorWrapper::Sequence(PostSequence::new(vec![
        PostProcessorWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        PostProcessorWrapper::Template(template),
    ]))));
    let json = tk.to_string(false).map_err(lib_err("tokenizer serialization"))?;
    stage.write("tokenizer.json", json.as_bytes())?;
    let cfg = serde_json::json!({
        "bos_token": BOS, "eos_token": EOS, "add_bos_token": true, "add_eos_token": false,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000_000_000_000_000u64,
    });
    stage.write("tokenizer_config.json", serde_json::to_string_pretty(&cfg).unwrap().as_bytes())?;
    stage.commit()?;
    if let Some(p) = progress {
        p.finish();
    }
    Tokenizer::open(dir)
}
