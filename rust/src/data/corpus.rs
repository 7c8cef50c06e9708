//! Corpus inputs and document readers. `--data` is a text file, a JSONL file (one document
//! per line, text in a chosen field), gzip'd JSONL as C4 ships it, or a folder of such files
//! (recursive, sorted by path). Documents stream: memory holds one piece at a time.
//!
//! A text file is one document. A document longer than [`PIECE`] bytes is handed out in
//! pieces (so memory stays bounded and pieces tokenize in parallel); pieces keep the
//! document's index, and only its first piece gets BOS, its last EOS. Where a piece ends is
//! the tokenizer's [`CutRule`], chosen so that the pieces' ids equal the whole text's:
//!
//! - `Newline`: after a newline followed by a non-space. A byte-level split regex such as
//!   LLaMA 3's (and the byte tokenizer) cuts there anyway, so the ids are exact for those;
//!   for other pre-tokenizers this is not proven.
//! - `Pairs`, for a BPE without pre-tokenizer (SentencePiece-style, as LLaMA 2's
//!   `tokenizer.json`): the whole text is one BPE word, and merges only ever join symbols
//!   into tokens of the vocabulary. So between two characters that no token holds side by
//!   side no merge can cross, the whole text's encoding has a boundary there, and encoding
//!   the two sides apart gives the same ids (BPE's merges on one side never depend on the
//!   other). Cuts are also kept away from added tokens and from characters outside the
//!   vocabulary (byte fallback). Pieces after the first are encoded without the
//!   normalizer's `Prepend`, which the whole text gets only once. When no such point exists
//!   in a piece's last half (a vocabulary holding nearly every pair), the piece is cut at a
//!   character boundary and its ids at that cut may differ from the whole's.
//!
//! A JSONL line is read whole (it is one JSON value), so a line longer than [`LINE_MAX`] is
//! refused rather than read: a gzip'd line can expand without bound. A text file is read in
//! pieces, so its memory stays bounded whatever its size.

use super::progress::Progress;
use crate::error::{Error, Result};
use serde_json::Value;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::path::{Path, PathBuf};

/// Pieces of a long document are at most about this many bytes.
pub const PIECE: usize = 1 << 20;
/// The longest JSONL line read (bytes, newline excluded). A line is held twice while it is
/// parsed (its bytes and the decoded text), so this bounds a reader's memory near 512 MiB.
pub const LINE_MAX: usize = 256 << 20;
/// The JSONL field holding a document's text unless the caller names another.
pub const TEXT_FIELD: &str = "text";

/// Where a long document may be cut (see the module doc).
#[derive(Clone, Debug, Default)]
pub enum CutRule {
    #[default]
    Newline,
    Pairs(std::sync::Arc<Pairs>),
}

/// What a BPE without pre-tokenizer can never merge across.
#[derive(Clone, Debug, Default)]
pub struct Pairs {
    /// Adjacent characters of any token (normalized form) or added token (as written).
    pub joined: HashSet<(char, char)>,
    /// Characters that are tokens by themselves (others fall back to bytes).
    pub singles: HashSet<char>,
    /// First and last characters of added tokens: no cut beside them.
    pub added_edges: HashSet<char>,
    /// The normalizer's character replacements (`Replace` of one character).
    pub replace: Vec<(char, String)>,
}

impl Pairs {
    fn norm(&self, c: char) -> String {
        self.replace.iter().find(|(from, _)| *from == c).map_or_else(|| c.to_string(), |(_, to)| to.clone())
    }

    /// Whether the text may be cut between `a` and `b` with ids unchanged.
    pub fn may_cut(&self, a: char, b: char) -> bool {
        let (na, nb) = (self.norm(a), self.norm(b));
        let (Some(la), Some(fb)) = (na.chars().last(), nb.chars().next()) else { return false };
        na.chars().chain(nb.chars()).all(|c| self.singles.contains(&c))
            && !self.joined.contains(&(la, fb))
            && !self.joined.contains(&(a, b))
            && !self.added_edges.contains(&a)
            && !self.added_edges.contains(&b)
    }
}

#[derive(Clone, Debug)]
pub struct Input {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: u128,
    pub jsonl: bool,
    pub gz: bool,
}

fn kind(path: &Path) -> Option<(bool, bool)> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    let (stem, gz) = match name.strip_suffix(".gz") {
        Some(s) => (s.to_string(), true),
        None => (name, false),
    };
    if stem.ends_with(".jsonl") || stem.ends_with(".json") {
        Some((true, gz))
    } else if stem.ends_with(".txt") {
        Some((false, gz))
    } else {
        None
    }
}

fn input(path: &Path, jsonl: bool, gz: bool) -> Result<Input> {
    let md = std::fs::metadata(path).map_err(|e| Error::invalid(format!("{}: cannot read ({e})", path.display())))?;
    let mtime_ns = md.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    Ok(Input { path: path.to_path_buf(), size: md.len(), mtime_ns, jsonl, gz })
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::invalid(format!("{}: cannot list ({e})", dir.display())))?;
    for entry in rd {
        let entry = entry.map_err(|e| Error::invalid(format!("{}: cannot list ({e})", dir.display())))?;
        let p = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if p.is_dir() {
            walk(&p, out)?;
        } else if kind(&p).is_some() {
            out.push(p);
        }
    }
    Ok(())
}

/// The files of `data`: the file itself (a name other than .jsonl/.json(.gz) is text), or
/// every .txt, .jsonl, .json, and their .gz, under the folder, sorted by path.
pub fn list(data: &Path) -> Result<Vec<Input>> {
    let md = std::fs::metadata(data).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::invalid(format!("{}: not found", data.display())),
        _ => Error::invalid(format!("{}: cannot read ({e})", data.display())),
    })?;
    if md.is_dir() {
        let mut files = vec![];
        walk(data, &mut files)?;
        files.sort();
        if files.is_empty() {
            return Err(Error::invalid(format!("{}: no .txt, .jsonl, .json, .jsonl.gz or .json.gz files in this folder", data.display())));
        }
        files.iter().map(|p| kind(p).map(|(j, g)| input(p, j, g)).unwrap()).collect()
    } else {
        let (jsonl, gz) = kind(data).unwrap_or((false, false));
        Ok(vec![input(data, jsonl, gz)?])
    }
}

/// A document, or a piece of one.
#[derive(Clone, Debug)]
pub struct Doc {
    /// Position of the document in the corpus (0-based, empty documents skipped).
    pub index: u64,
    pub text: String,
    pub first: bool,
    pub last: bool,
}

/// Counts the bytes read from a file into the progress.
struct Counting<'p, R> {
    inner: R,
    progress: Option<&'p Progress>,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(p) = self.progress {
            p.add(n as u64);
        }
        Ok(n)
    }
}

struct Open<'p> {
    reader: Box<dyn BufRead + Send + 'p>,
    path: PathBuf,
    gz: bool,
    jsonl: bool,
    /// Lines read (JSONL) or bytes handed out (text).
    at: u64,
    /// Unsent bytes of a text file.
    carry: Vec<u8>,
    /// Pieces already handed out of the current text document.
    pieces: u32,
}

/// Streams the documents of `inputs` in order.
pub struct Docs<'p> {
    inputs: Vec<Input>,
    field: String,
    progress: Option<&'p Progress>,
    next_file: usize,
    open: Option<Open<'p>>,
    /// A long JSONL document being handed out in pieces, and the byte its next piece starts at.
    long: Option<(Doc, usize)>,
    index: u64,
    failed: bool,
    line_max: usize,
    cut: CutRule,
}

impl<'p> Docs<'p> {
    pub fn new(inputs: Vec<Input>, field: &str, progress: Option<&'p Progress>) -> Self {
        Docs { inputs, field: field.to_string(), progress, next_file: 0, open: None, long: None, index: 0, failed: false, line_max: LINE_MAX, cut: CutRule::Newline }
    }

    /// The same reader cutting long documents by `cut` (the tokenizer's).
    pub fn with_cut(mut self, cut: CutRule) -> Self {
        self.cut = cut;
        self
    }

    /// The same reader with another line limit than [`LINE_MAX`] (tests use a small one).
    pub fn with_line_max(mut self, n: usize) -> Self {
        self.line_max = n;
        self
    }

    fn read_error(path: &Path, gz: bool, e: std::io::Error) -> Error {
        let p = path.display();
        if gz {
            match e.kind() {
                ErrorKind::UnexpectedEof => Error::invalid(format!("{p}: gzip stream ends early (truncated file?)")),
                _ => Error::invalid(format!("{p}: corrupt gzip data ({e})")),
            }
        } else {
            Error::invalid(format!("{p}: cannot read ({e})"))
        }
    }

    fn open_next(&mut self) -> Result<bool> {
        let Some(inp) = self.inputs.get(self.next_file) else { return Ok(false) };
        self.next_file += 1;
        let f = File::open(&inp.path).map_err(|e| Error::invalid(format!("{}: cannot open ({e})", inp.path.display())))?;
        let counted = Counting { inner: f, progress: self.progress };
        let reader: Box<dyn BufRead + Send + 'p> = if inp.gz {
            Box::new(BufReader::with_capacity(1 << 16, flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, counted))))
        } else {
            Box::new(BufReader::with_capacity(1 << 16, counted))
        };
        self.open = Some(Open { reader, path: inp.path.clone(), gz: inp.gz, jsonl: inp.jsonl, at: 0, carry: vec![], pieces: 0 });
        Ok(true)
    }

    /// Next JSONL document of the open file, or None at its end.
    fn next_json(&mut self) -> Result<Option<Doc>> {
        let o = self.open.as_mut().unwrap();
        let max = self.line_max;
        let mut line = Vec::new();
        loop {
            line.clear();
            // At most one byte past the limit is read: enough to know the line is too long.
            let n = (&mut o.reader).take(max as u64 + 1).read_until(b'\n', &mut line).map_err(|e| Self::read_error(&o.path, o.gz, e))?;
            if n == 0 {
                return Ok(None);
            }
            o.at += 1;
            if line.len() - (line.last() == Some(&b'\n')) as usize > max {
                return Err(Error::invalid(format!("{}: line {}: longer than {}", o.path.display(), o.at, size_text(max))));
            }
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let (p, no) = (o.path.display(), o.at);
            let text = std::str::from_utf8(&line).map_err(|e| Error::invalid(format!("{p}: line {no}: not UTF-8 (byte {} of the line)", e.valid_up_to() + 1)))?;
            let v: Value = serde_json::from_str(text).map_err(|e| Error::invalid(format!("{p}: line {no}: not JSON ({e})")))?;
            let Value::Object(mut obj) = v else { return Err(Error::invalid(format!("{p}: line {no}: not a JSON object"))) };
            match obj.remove(&self.field) {
                Some(Value::String(s)) if s.is_empty() => continue,
                Some(Value::String(s)) => return Ok(Some(Doc { index: 0, text: s, first: true, last: true })),
                Some(_) => return Err(Error::invalid(format!("{p}: line {no}: field {:?} is not a string", self.field))),
                None => return Err(Error::invalid(format!("{p}: line {no}: no {:?} field", self.field))),
            }
        }
    }

    /// Next piece of the open text file, or None at its end.
    fn next_text(&mut self) -> Result<Option<Doc>> {
        let o = self.open.as_mut().unwrap();
        let mut eof = false;
        while o.carry.len() < PIECE + 1 {
            let (path, gz) = (&o.path, o.gz);
            let buf = o.reader.fill_buf().map_err(|e| Self::read_error(path, gz, e))?;
            if buf.is_empty() {
                eof = true;
                break;
            }
            let n = buf.len().min(PIECE + 1 - o.carry.len());
            o.carry.extend_from_slice(&buf[..n]);
            o.reader.consume(n);
        }
        if o.carry.is_empty() {
            return Ok(None);
        }
        let cut = if eof { o.carry.len() } else { cut_point(&o.carry, &self.cut) };
        let bytes: Vec<u8> = o.carry.drain(..cut).collect();
        let start = o.at;
        o.at += cut as u64;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::invalid(format!("{}: not UTF-8 (byte {})", o.path.display(), start + e.utf8_error().valid_up_to() as u64))
        })?;
        let first = o.pieces == 0;
        o.pieces += 1;
        Ok(Some(Doc { index: 0, text, first, last: eof }))
    }

    fn next_doc(&mut self) -> Result<Option<Doc>> {
        if let Some((doc, at)) = self.long.take() {
            let (piece, next) = next_piece(&doc, at, &self.cut);
            if next < doc.text.len() {
                self.long = Some((doc, next));
            }
            return Ok(Some(piece));
        }
        loop {
            if let Some(p) = self.progress {
                if p.cancelled() {
                    return Err(Error::invalid("cancelled"));
                }
            }
            if self.open.is_none() && !self.open_next()? {
                return Ok(None);
            }
            let jsonl = self.open.as_ref().unwrap().jsonl;
            let doc = if jsonl { self.next_json()? } else { self.next_text()? };
            let Some(mut doc) = doc else {
                self.open = None;
                continue;
            };
            doc.index = self.index;
            if doc.last {
                self.index += 1;
            }
            if jsonl && doc.text.len() > PIECE {
                // handed out one piece at a time: the document is not copied whole again
                self.long = Some((doc, 0));
                return self.next_doc();
            }
            return Ok(Some(doc));
        }
    }
}

impl Iterator for Docs<'_> {
    type Item = Result<Doc>;
    fn next(&mut self) -> Option<Result<Doc>> {
        if self.failed {
            return None;
        }
        let r = self.next_doc().transpose();
        if matches!(r, Some(Err(_))) {
            self.failed = true;
        }
        r
    }
}

/// Where to end a piece of a full buffer, by `rule`; else at the last character boundary.
fn cut_point(buf: &[u8], rule: &CutRule) -> usize {
    match rule {
        CutRule::Newline => newline_cut(buf),
        CutRule::Pairs(p) => pair_cut(buf, p).unwrap_or_else(|| newline_cut(buf)),
    }
}

/// The last point of the buffer's second half between two characters `pairs` may cut.
fn pair_cut(buf: &[u8], pairs: &Pairs) -> Option<usize> {
    let valid = match std::str::from_utf8(buf) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&buf[..e.valid_up_to()]).unwrap(),
    };
    let mut next: Option<(usize, char)> = None;
    for (i, c) in valid.char_indices().rev() {
        if let Some((j, b)) = next {
            if j < buf.len() / 2 {
                break;
            }
            if pairs.may_cut(c, b) {
                return Some(j);
            }
        }
        next = Some((i, c));
    }
    None
}

/// After the last newline followed by a non-space, else at the last character boundary.
fn newline_cut(buf: &[u8]) -> usize {
    let n = buf.len();
    for i in (0..n - 1).rev() {
        if buf[i] == b'\n' && !buf[i + 1].is_ascii_whitespace() {
            return i + 1;
        }
    }
    let mut j = n - 1;
    while j > 0 && (buf[j] & 0xC0) == 0x80 {
        j -= 1;
    }
    if j == 0 { n } else { j }
}

/// The piece of `doc` starting at byte `at`, and where the next one starts.
fn next_piece(doc: &Doc, at: usize, rule: &CutRule) -> (Doc, usize) {
    let bytes = doc.text.as_bytes();
    let end = if bytes.len() - at <= PIECE { bytes.len() } else { at + cut_point(&bytes[at..at + PIECE + 1], rule) };
    (Doc { index: doc.index, text: doc.text[at..end].to_string(), first: at == 0, last: end == bytes.len() }, end)
}

/// `n` bytes as the largest whole unit: "256 MiB", "1 KiB", "100 bytes".
fn size_text(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

#[cfg(test)]
fn split_long(doc: Doc) -> Vec<Doc> {
    let (mut out, mut at) = (vec![], 0);
    while at < doc.text.len() {
        let (piece, next) = next_piece(&doc, at, &CutRule::Newline);
        out.push(piece);
        at = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_after_newline_before_text() {
        assert_eq!(cut_point(b"ab\ncd\n  ef", &CutRule::Newline), 3);
        assert_eq!(cut_point("aé".as_bytes(), &CutRule::Newline), 1);
        // "ab", "bc", "da" are tokens: the only cut is between c and d (in the second half).
        let p = Pairs { joined: [('a', 'b'), ('b', 'c'), ('d', 'a')].into(), singles: "abcd".chars().collect(), ..Default::default() };
        assert_eq!(pair_cut(b"abcdab", &p), Some(3));
        assert_eq!(pair_cut(b"cdabc", &p), None, "c|d is in the first half");
    }

    #[test]
    fn long_json_document_in_pieces() {
        let text = "line of text\n".repeat(PIECE / 6);
        let pieces = split_long(Doc { index: 7, text: text.clone(), first: true, last: true });
        assert!(pieces.len() >= 2);
        assert!(pieces.iter().all(|p| p.index == 7 && p.text.len() <= PIECE + 1));
        assert!(pieces[0].first && !pieces[0].last && pieces.last().unwrap().last);
        assert_eq!(pieces.iter().map(|p| p.text.as_str()).collect::<String>(), text);
    }

    fn jsonl_input(name: &str, bytes: &[u8]) -> Input {
        let p = std::env::temp_dir().join(format!("qg-corpus-{name}-{}.jsonl", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        input(&p, true, false).unwrap()
    }

    #[test]
    fn a_line_over_the_limit_is_refused_after_reading_the_limit() {
        let ok = format!("{{\"text\": \"{}\"}}\n", "a".repeat(90));
        let long = format!("{{\"text\": \"{}\"}}\n", "b".repeat(200));
        let inp = jsonl_input("limit", format!("{ok}{ok}{long}{ok}").as_bytes());
        let path = inp.path.clone();
        let mut docs = Docs::new(vec![inp], TEXT_FIELD, None).with_line_max(ok.len() - 1);
        assert_eq!(docs.next().unwrap().unwrap().text.len(), 90);
        assert_eq!(docs.next().unwrap().unwrap().text.len(), 90);
        let e = docs.next().unwrap().unwrap_err().msg;
        assert_eq!(e, format!("{}: line 3: longer than {} bytes", path.display(), ok.len() - 1));
        assert!(docs.next().is_none());
        // A line exactly at the limit, without a final newline, is read.
        let inp = jsonl_input("exact", ok.trim_end().as_bytes());
        let mut docs = Docs::new(vec![inp.clone()], TEXT_FIELD, None).with_line_max(ok.len() - 1);
        assert_eq!(docs.next().unwrap().unwrap().text.len(), 90);
        assert!(docs.next().is_none());
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&inp.path).unwrap();
        assert_eq!(size_text(LINE_MAX), "256 MiB");
    }
}
