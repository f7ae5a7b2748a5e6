//! Finding special tokens written in text.
//!
//! A chat template writes its turn markers (`<start_of_turn>`, `<bos>`, `<|im_end|>`) as plain text,
//! and the model was trained on them as single ids. Hugging Face cuts such "added tokens" out of the
//! text before anything else runs, taking at each position the longest one that starts there
//! (leftmost-longest). Gemma-3 has about 6,400 of them (mostly `<unusedN>` and runs of whitespace),
//! so a scan that tried every token at every position would be slow; a byte trie makes each position
//! cost only as many steps as the bytes it actually matches.

/// A byte trie over the special tokens' texts.
#[derive(Debug, Clone)]
pub(crate) struct SpecialMatcher {
    nodes: Vec<Node>,
    /// Bytes that start at least one token: lets the scan skip most positions with one lookup.
    first_bytes: [bool; 256],
}

#[derive(Debug, Clone, Default)]
struct Node {
    /// Children sorted by byte, for binary search: most nodes have one or two children.
    children: Vec<(u8, u32)>,
    /// The token that ends at this node, if any.
    token: Option<u32>,
}

/// A piece of input text after special tokens were cut out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment<'a> {
    /// Ordinary text, with its byte offset in the input (SentencePiece's prefix space depends on it).
    Text(&'a str, usize),
    /// A special token, as its id.
    Special(u32),
}

impl SpecialMatcher {
    /// Builds the trie. An empty text is ignored (it would match everywhere); when two ids share a
    /// text, the first one wins, as in a vocabulary lookup.
    pub(crate) fn new<'a>(tokens: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        let mut m = SpecialMatcher {
            nodes: vec![Node::default()],
            first_bytes: [false; 256],
        };
        for (text, id) in tokens {
            let bytes = text.as_bytes();
            let Some(&first) = bytes.first() else {
                continue;
            };
            m.first_bytes[first as usize] = true;
            let mut node = 0usize;
            for &b in bytes {
                node = match m.nodes[node].children.binary_search_by_key(&b, |c| c.0) {
                    Ok(i) => m.nodes[node].children[i].1 as usize,
                    Err(i) => {
                        let next = m.nodes.len();
                        m.nodes.push(Node::default());
                        m.nodes[node].children.insert(i, (b, next as u32));
                        next
                    }
                };
            }
            if m.nodes[node].token.is_none() {
                m.nodes[node].token = Some(id);
            }
        }
        m
    }

    /// Whether no token was registered.
    pub(crate) fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// The longest token starting at byte `pos`: its length in bytes and its id.
    fn longest_at(&self, bytes: &[u8], pos: usize) -> Option<(usize, u32)> {
        if !self.first_bytes[bytes[pos] as usize] {
            return None;
        }
        let mut node = 0usize;
        let mut best = None;
        for (i, &b) in bytes[pos..].iter().enumerate() {
            let children = &self.nodes[node].children;
            match children.binary_search_by_key(&b, |c| c.0) {
                Ok(k) => node = children[k].1 as usize,
                Err(_) => break,
            }
            if let Some(id) = self.nodes[node].token {
                best = Some((i + 1, id));
            }
        }
        best
    }

    /// Cuts `text` into ordinary text and special tokens, leftmost-longest, as Hugging Face's added
    /// vocabulary does. Matches start only at character boundaries; since every token is a whole
    /// string, they also end on one.
    pub(crate) fn split<'a>(&self, text: &'a str) -> Vec<Segment<'a>> {
        let mut out = Vec::new();
        if self.is_empty() {
            if !text.is_empty() {
                out.push(Segment::Text(text, 0));
            }
            return out;
        }
        let bytes = text.as_bytes();
        let mut plain_start = 0usize;
        let mut pos = 0usize;
        while pos < bytes.len() {
            if let Some((len, id)) = self.longest_at(bytes, pos) {
                if plain_start < pos {
                    out.push(Segment::Text(&text[plain_start..pos], plain_start));
                }
                out.push(Segment::Special(id));
                pos += len;
                plain_start = pos;
            } else {
                pos += utf8_len(bytes[pos]);
            }
        }
        if plain_start < bytes.len() {
            out.push(Segment::Text(&text[plain_start..], plain_start));
        }
        out
    }
}

/// Length of the UTF-8 sequence that starts with `lead` (1 for a stray continuation byte, which
/// cannot happen in a `&str` but keeps the scan moving).
fn utf8_len(lead: u8) -> usize {
    match lead {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_match_wins_and_text_keeps_offsets() {
        let m = SpecialMatcher::new([("<a>", 1), ("<a><b>", 2), ("\n", 3), ("\n\n", 4)]);
        let got = m.split("x<a><b>y<a>\n\n\nz");
        assert_eq!(
            got,
            vec![
                Segment::Text("x", 0),
                Segment::Special(2),
                Segment::Text("y", 7),
                Segment::Special(1),
                Segment::Special(4),
                Segment::Special(3),
                Segment::Text("z", 14),
            ]
        );
    }

    #[test]
    fn partial_prefix_is_plain_text() {
        let m = SpecialMatcher::new([("<bos>", 2)]);
        assert_eq!(m.split("<bo"), vec![Segment::Text("<bo", 0)]);
        assert_eq!(
            m.split("é<bos>"),
            vec![Segment::Text("é", 0), Segment::Special(2)]
        );
        assert!(m.split("").is_empty());
    }

    #[test]
    fn first_id_wins_on_duplicate_text() {
        let m = SpecialMatcher::new([("<x>", 5), ("<x>", 9), ("", 1)]);
        assert_eq!(m.split("<x>"), vec![Segment::Special(5)]);
    }
}
