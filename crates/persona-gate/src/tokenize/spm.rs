//! SentencePiece BPE (the "llama" GGUF tokenizer, used by Gemma-3), encoded the way SentencePiece
//! and Hugging Face's Gemma tokenizer do.
//!
//! The GGUF holds no merges, only pieces with scores. SentencePiece's BPE needs nothing more: start
//! from single characters and repeatedly join the adjacent pair whose concatenation is a piece with
//! the highest score (leftmost on ties). Building a merge table from 262k pieces (as a generic BPE
//! would need) is slow and loses that exact rule, so we run the rule directly: a hash map from piece
//! text to id, and a heap of candidate pairs. Characters that are not pieces fall back to their
//! UTF-8 bytes (`<0xNN>`), as SentencePiece's `byte_fallback` does.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::gguf_vocab::{GgufVocab, TokenKind};
use super::special::{Segment, SpecialMatcher};
use crate::error::{Error, Result};

/// SentencePiece writes spaces as U+2581 inside pieces.
const SPACE: char = '\u{2581}';

/// A SentencePiece BPE tokenizer built from GGUF metadata.
#[derive(Debug, Clone)]
pub(crate) struct SpmTokenizer {
    /// Piece text per id, in SentencePiece spelling (spaces as `▁`).
    pieces: Vec<String>,
    kinds: Vec<TokenKind>,
    scores: Vec<f32>,
    /// Pieces a merge may produce: normal ones only. Control, byte and user-defined pieces are
    /// never the result of joining characters (the last are cut out of the text beforehand).
    mergeable: HashMap<String, u32>,
    /// Every other piece (control, user-defined, byte, ...), for lookups by name.
    others: HashMap<String, u32>,
    byte_ids: [Option<u32>; 256],
    unk_id: Option<u32>,
    /// Control and unknown tokens, matched in the raw text (like Hugging Face's non-normalized
    /// added tokens): `<bos>`, `<start_of_turn>`.
    specials: SpecialMatcher,
    /// User-defined pieces, matched in the normalized text, where SentencePiece's prefix matcher
    /// finds them: runs of `▁`, newlines, tabs, Gemma's HTML tags. Matching after normalization
    /// makes a literal `▁` in the input count as a space, as it does for SentencePiece and HF.
    user_defined: SpecialMatcher,
    /// Prepend `▁` to text that starts the input (Llama-2 style); Gemma-3 says no.
    add_space_prefix: bool,
}

/// A user-defined piece back in SentencePiece spelling: llama.cpp writes `▁` as a space in these
/// when converting (Gemma's runs of spaces become "  "), but the vocabulary, and the normalized text
/// they are matched in, spell it `▁▁`.
fn respell(piece: &str, kind: TokenKind) -> String {
    if kind == TokenKind::UserDefined {
        piece.replace(' ', "\u{2581}")
    } else {
        piece.to_string()
    }
}

/// Parses `<0xNN>`.
fn byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// One symbol of the word being merged: a byte range of the normalized text, linked to its
/// neighbours so a merge is O(1).
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    end: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A pair that could be joined. `len` is the joined byte length when it was queued: if either
/// side has changed since, the lengths no longer add up and the candidate is stale.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    /// Highest score first; on a tie the leftmost pair, as in SentencePiece's agenda.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl SpmTokenizer {
    pub(crate) fn from_gguf(v: &GgufVocab) -> Result<Self> {
        let scores = v.scores.clone().ok_or_else(|| Error::MissingMetadata {
            what: "tokenizer.ggml.scores (a SentencePiece tokenizer needs its piece scores)".into(),
        })?;
        let pieces: Vec<String> = v
            .tokens
            .iter()
            .zip(&v.kinds)
            .map(|(t, k)| respell(t, *k))
            .collect();
        let mut mergeable = HashMap::with_capacity(pieces.len());
        let mut others = HashMap::new();
        let mut byte_ids = [None; 256];
        for (id, (p, k)) in pieces.iter().zip(&v.kinds).enumerate() {
            let id = id as u32;
            if *k == TokenKind::Normal {
                mergeable.entry(p.clone()).or_insert(id);
                continue;
            }
            others.entry(p.clone()).or_insert(id);
            if *k == TokenKind::Byte {
                if let Some(b) = byte_piece(p) {
                    byte_ids[b as usize].get_or_insert(id);
                }
            }
        }
        let matcher = |want: fn(TokenKind) -> bool| {
            SpecialMatcher::new(
                pieces
                    .iter()
                    .zip(&v.kinds)
                    .enumerate()
                    .filter(|(_, (_, k))| want(**k))
                    .map(|(id, (t, _))| (t.as_str(), id as u32)),
            )
        };
        let specials = matcher(TokenKind::is_special);
        let user_defined = matcher(|k| k == TokenKind::UserDefined);
        Ok(SpmTokenizer {
            pieces,
            kinds: v.kinds.clone(),
            scores,
            mergeable,
            others,
            byte_ids,
            unk_id: v.unk_id,
            specials,
            user_defined,
            add_space_prefix: v.add_space_prefix.unwrap_or(false),
        })
    }

    pub(crate) fn id_to_token(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    pub(crate) fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.mergeable
            .get(tok)
            .or_else(|| self.others.get(tok))
            .copied()
    }

    pub(crate) fn kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// Encodes text; special tokens written in it become their single ids; no BOS is added.
    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        for seg in self.specials.split(text) {
            match seg {
                Segment::Special(id) => out.push(id),
                Segment::Text(s, offset) => self.encode_plain(s, offset == 0, &mut out)?,
            }
        }
        Ok(out)
    }

    /// Encodes text with control-token texts read as ordinary characters (untrusted message
    /// content); `starts_input` says whether it begins the model input.
    pub(crate) fn encode_text(&self, text: &str, starts_input: bool) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_plain(text, starts_input, &mut out)?;
        Ok(out)
    }

    /// The control tokens' texts.
    pub(crate) fn special_matcher(&self) -> &SpecialMatcher {
        &self.specials
    }

    /// One stretch of text that holds no control token: normalize, cut out user-defined pieces,
    /// and merge the rest.
    fn encode_plain(&self, text: &str, starts_input: bool, out: &mut Vec<u32>) -> Result<()> {
        // Normalize: spaces become `▁` (and, for Llama-2 style models, one is prepended to text at
        // the start of the input, like Hugging Face's Metaspace with prepend_scheme "first").
        let mut norm = String::with_capacity(text.len() + 3);
        if self.add_space_prefix && starts_input {
            norm.push(SPACE);
        }
        for c in text.chars() {
            norm.push(if c == ' ' { SPACE } else { c });
        }
        for seg in self.user_defined.split(&norm) {
            match seg {
                Segment::Special(id) => out.push(id),
                Segment::Text(s, _) => self.merge(s, out)?,
            }
        }
        Ok(())
    }

    /// SentencePiece BPE over normalized text: join the best-scoring adjacent pair until none is a
    /// piece.
    fn merge(&self, norm: &str, out: &mut Vec<u32>) -> Result<()> {
        if norm.is_empty() {
            return Ok(());
        }
        let mut syms: Vec<Symbol> = Vec::with_capacity(norm.len());
        for (i, (start, c)) in norm.char_indices().enumerate() {
            syms.push(Symbol {
                start,
                end: start + c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }

        let mut agenda = BinaryHeap::new();
        let push = |agenda: &mut BinaryHeap<Candidate>, syms: &[Symbol], l: usize, r: usize| {
            let piece = &norm[syms[l].start..syms[r].end];
            if let Some(&id) = self.mergeable.get(piece) {
                agenda.push(Candidate {
                    score: self.scores[id as usize],
                    left: l,
                    right: r,
                    len: piece.len(),
                });
            }
        };
        for i in 1..syms.len() {
            push(&mut agenda, &syms, i - 1, i);
        }

        while let Some(c) = agenda.pop() {
            let (l, r) = (c.left, c.right);
            // Stale if either side was merged away or grew since the pair was queued.
            if syms[l].next != Some(r)
                || syms[l].end - syms[l].start + syms[r].end - syms[r].start != c.len
            {
                continue;
            }
            syms[l].end = syms[r].end;
            syms[l].next = syms[r].next;
            if let Some(n) = syms[r].next {
                syms[n].prev = Some(l);
            }
            // Mark the right symbol dead: it can never again be the `next` of anything.
            syms[r].prev = None;
            syms[r].next = None;
            syms[r].end = syms[r].start;
            if let Some(p) = syms[l].prev {
                push(&mut agenda, &syms, p, l);
            }
            if let Some(n) = syms[l].next {
                push(&mut agenda, &syms, l, n);
            }
        }

        let mut cur = Some(0usize);
        while let Some(i) = cur {
            let piece = &norm[syms[i].start..syms[i].end];
            match self.mergeable.get(piece) {
                Some(&id) => out.push(id),
                None => self.byte_fallback(piece, out)?,
            }
            cur = syms[i].next;
        }
        Ok(())
    }

    /// A symbol that is not a piece: its UTF-8 bytes as `<0xNN>` pieces, else the unknown token.
    fn byte_fallback(&self, piece: &str, out: &mut Vec<u32>) -> Result<()> {
        let bytes: Option<Vec<u32>> = piece.bytes().map(|b| self.byte_ids[b as usize]).collect();
        match (bytes, self.unk_id) {
            (Some(ids), _) => out.extend(ids),
            (None, Some(unk)) => out.push(unk),
            (None, None) => {
                return Err(Error::Tokenizer(format!(
                    "cannot encode {piece:?}: not in the vocabulary, and the vocabulary has \
                     neither byte pieces nor an unknown token"
                )))
            }
        }
        Ok(())
    }

    /// Decodes like Hugging Face's Gemma decoder (`▁` to space, byte fallback, fuse). Ids outside
    /// the vocabulary are skipped, as Hugging Face does: a model may sample a padding row.
    pub(crate) fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut out = String::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut first = true;
        for &id in ids {
            let (Some(piece), Some(kind)) = (self.pieces.get(id as usize), self.kind(id)) else {
                continue;
            };
            if skip_special && kind.is_special() {
                continue;
            }
            if kind == TokenKind::Byte {
                if let Some(b) = byte_piece(piece) {
                    pending.push(b);
                    first = false;
                    continue;
                }
            }
            flush_bytes(&mut pending, &mut out);
            let text = piece.replace(SPACE, " ");
            if first && self.add_space_prefix {
                out.push_str(text.strip_prefix(' ').unwrap_or(&text));
            } else {
                out.push_str(&text);
            }
            first = false;
        }
        flush_bytes(&mut pending, &mut out);
        out
    }
}

/// A run of byte pieces becomes text if it is valid UTF-8, else one U+FFFD per byte (Hugging
/// Face's `ByteFallback` decoder does exactly this).
fn flush_bytes(pending: &mut Vec<u8>, out: &mut String) {
    if pending.is_empty() {
        return;
    }
    match std::str::from_utf8(pending) {
        Ok(s) => out.push_str(s),
        Err(_) => out.extend(std::iter::repeat_n('\u{FFFD}', pending.len())),
    }
    pending.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy SentencePiece vocabulary; scores make "▁ab" beat "ab▁".
    fn toy(add_space_prefix: bool) -> SpmTokenizer {
        let mut tokens: Vec<(String, f32, TokenKind)> = vec![
            ("<unk>".into(), 0.0, TokenKind::Unknown),
            ("<bos>".into(), 0.0, TokenKind::Control),
            ("<turn>".into(), 0.0, TokenKind::Control),
            ("  ".into(), 0.0, TokenKind::UserDefined),
            ("\n".into(), 0.0, TokenKind::UserDefined),
            ("a".into(), -10.0, TokenKind::Normal),
            ("b".into(), -11.0, TokenKind::Normal),
            ("▁".into(), -12.0, TokenKind::Normal),
            ("ab".into(), -1.0, TokenKind::Normal),
            ("▁a".into(), -2.0, TokenKind::Normal),
            ("▁ab".into(), -3.0, TokenKind::Normal),
            ("b▁".into(), -0.5, TokenKind::Normal),
        ];
        for b in 0..=255u8 {
            tokens.push((format!("<0x{b:02X}>"), 0.0, TokenKind::Byte));
        }
        let v = GgufVocab {
            model: "llama".into(),
            pre: None,
            tokens: tokens.iter().map(|t| t.0.clone()).collect(),
            kinds: tokens.iter().map(|t| t.2).collect(),
            scores: Some(tokens.iter().map(|t| t.1).collect()),
            merges: None,
            bos_id: Some(1),
            eos_id: None,
            eot_id: None,
            eom_id: None,
            pad_id: None,
            unk_id: Some(0),
            add_bos: Some(true),
            add_space_prefix: Some(add_space_prefix),
            chat_template: None,
        };
        SpmTokenizer::from_gguf(&v).unwrap()
    }

    #[test]
    fn highest_score_merges_first() {
        let t = toy(false);
        // "b▁" (-0.5) beats "ab" (-1.0): a|b▁|a  ->  a, b▁, a.
        assert_eq!(t.encode("ab a").unwrap(), vec![5, 11, 5]);
        // Without the competing pair: "ab" then nothing else.
        assert_eq!(t.encode("ab").unwrap(), vec![8]);
        // "ab" (-1) beats "▁a" (-2); then "▁" + "ab" joins into "▁ab".
        assert_eq!(t.encode(" ab").unwrap(), vec![10]);
    }

    #[test]
    fn specials_and_user_defined_are_whole() {
        let t = toy(false);
        assert_eq!(t.encode("<bos>a<turn>\nb").unwrap(), vec![1, 5, 2, 4, 6]);
        // A run of two spaces is one user-defined piece, respelled as SentencePiece writes it.
        assert_eq!(t.encode("a  b").unwrap(), vec![5, 3, 6]);
        assert_eq!(t.id_to_token(3), Some("▁▁"));
        // A literal `▁` in the input is a space once normalized, as in SentencePiece.
        assert_eq!(t.encode("a▁ b").unwrap(), vec![5, 3, 6]);
    }

    #[test]
    fn unknown_chars_fall_back_to_bytes() {
        let t = toy(false);
        let ids = t.encode("aé").unwrap();
        assert_eq!(ids, vec![5, 12 + 0xC3, 12 + 0xA9]);
        assert_eq!(t.decode(&ids, false), "aé");
        // An invalid byte run decodes to one replacement character per byte.
        assert_eq!(t.decode(&[12 + 0xC3, 5], false), "\u{FFFD}a");
    }

    #[test]
    fn space_prefix_only_at_input_start() {
        let t = toy(true);
        assert_eq!(t.encode("ab").unwrap(), vec![10]);
        assert_eq!(t.encode("<bos>ab").unwrap(), vec![1, 8]);
        assert_eq!(t.decode(&[10], false), "ab");
    }

    #[test]
    fn decode_skips_special_on_request() {
        let t = toy(false);
        let ids = t.encode("<bos>a b\n").unwrap();
        assert_eq!(t.decode(&ids, false), "<bos>a b\n");
        assert_eq!(t.decode(&ids, true), "a b\n");
        assert_eq!(t.decode(&[9999], false), "");
    }
}
