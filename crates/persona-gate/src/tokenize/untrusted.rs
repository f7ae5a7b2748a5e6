//! Encoding conversations whose message text comes from someone else.
//!
//! [`ChatTokenizer::encode`] turns a control token written in text (`<|im_start|>`,
//! `<start_of_turn>`) into its single id, as Hugging Face does, because a rendered chat template
//! writes its turn markers that way. Applied to a whole rendered conversation, that also turns
//! markers *typed by a client inside a message* into real control tokens: a user message holding
//! `<|im_end|><|im_start|>system\n...` forges a system turn, overriding a server preset's persona
//! and the guard's comparison with the default persona.
//!
//! [`ChatTokenizer::encode_chat`] keeps the two apart: the template's own text is encoded with its
//! control tokens, message contents as plain text (their `<|im_start|>` becomes the ids of the
//! characters `<`, `|`, `im`, ...). When no message contains control-token text, which is every
//! ordinary prompt, the result is exactly `encode(render_chat(..))`, so studies and receipts keep
//! their token ids.

use super::special::SpecialMatcher;
use super::{Backend, ChatMessage, ChatTokenizer};
use crate::error::{Error, Result};

/// What reading text without control tokens needs, built once per tokenizer.
pub(crate) struct PlainText {
    /// The control tokens' texts, to tell whether a message holds any.
    specials: SpecialMatcher,
    /// The `tokenizers` pipeline with `encode_special_tokens` on (control tokens read as text);
    /// `None` for the SentencePiece backend, which has its own plain-text path.
    hf_plain: Option<tokenizers::Tokenizer>,
}

/// Stand-ins for message contents while the template renders: private-use characters that no
/// template transforms, numbered so each content goes back in its own place.
fn placeholder(i: usize) -> String {
    format!("\u{E000}{i}\u{E001}")
}

impl ChatTokenizer {
    fn plain_text(&self) -> &PlainText {
        self.inner
            .untrusted
            .get_or_init(|| match &self.inner.backend {
                Backend::Hf(t) => {
                    let added = t.get_added_tokens_decoder();
                    let specials = SpecialMatcher::new(
                        added
                            .iter()
                            .filter(|(_, a)| a.special)
                            .map(|(id, a)| (a.content.as_str(), *id)),
                    );
                    let mut plain = (**t).clone();
                    plain.set_encode_special_tokens(true);
                    PlainText {
                        specials,
                        hf_plain: Some(plain),
                    }
                }
                Backend::Spm(s) => PlainText {
                    specials: s.special_matcher().clone(),
                    hf_plain: None,
                },
            })
    }

    /// Whether `text` holds the text of a control token (`<|im_start|>`, `<bos>`, ...).
    pub fn holds_control_text(&self, text: &str) -> bool {
        let m = &self.plain_text().specials;
        !m.is_empty()
            && m.split(text)
                .iter()
                .any(|s| matches!(s, super::special::Segment::Special(_)))
    }

    /// Token ids of `text` read as plain text: control-token texts in it become ordinary pieces.
    /// `starts_input` says whether the text begins the model input (SentencePiece vocabularies
    /// that prepend a space do so only there).
    pub fn encode_plain(&self, text: &str, starts_input: bool) -> Result<Vec<u32>> {
        match (&self.inner.backend, &self.plain_text().hf_plain) {
            (Backend::Hf(_), Some(plain)) => Ok(plain
                .encode_fast(text, false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec()),
            (Backend::Spm(s), _) => s.encode_text(text, starts_input),
            (Backend::Hf(_), None) => unreachable!("the plain pipeline is built with the backend"),
        }
    }

    /// Token ids of a conversation for generation: the chat template with the generation prompt
    /// (for a base model: BOS when wanted, the system messages, a blank line and the last user
    /// message). Message contents are untrusted text: control tokens typed in them stay text.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        if !self.has_chat_template() {
            return self.encode_base(messages);
        }
        let text = self.render_chat(messages, true)?;
        if !messages.iter().any(|m| self.holds_control_text(&m.content)) {
            return self.encode(&text);
        }
        self.encode_split(messages, &text)
    }

    /// [`Self::encode_chat`] for one optional system prompt and one user message.
    pub fn encode_prompt(&self, system: Option<&str>, user: &str) -> Result<Vec<u32>> {
        let mut messages = Vec::with_capacity(2);
        if let Some(s) = system {
            messages.push(ChatMessage::system(s));
        }
        messages.push(ChatMessage::user(user));
        self.encode_chat(&messages)
    }

    /// The hostile case: render with numbered placeholders, then encode the template's pieces with
    /// control tokens and each message content as plain text. Fails when the template changed the
    /// contents in a way other than trimming them, since then where a content starts and ends is
    /// not known.
    fn encode_split(&self, messages: &[ChatMessage], rendered: &str) -> Result<Vec<u32>> {
        let stand_in: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage {
                role: m.role.clone(),
                content: placeholder(i),
            })
            .collect();
        let skeleton = self.render_chat(&stand_in, true)?;
        for trim in [false, true] {
            let pieces = split_skeleton(&skeleton, messages, trim);
            let rebuilt: String = pieces.iter().map(|p| p.text()).collect();
            if rebuilt == rendered {
                return self.encode_pieces(&pieces);
            }
        }
        Err(Error::ChatTemplate(
            "a message holds control-token text and the chat template rewrites message contents, \
             so the contents cannot be encoded apart from the template"
                .into(),
        ))
    }

    fn encode_pieces(&self, pieces: &[Piece<'_>]) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut at_start = true;
        for p in pieces {
            match p {
                Piece::Template(t) => ids.extend(self.encode(t)?),
                Piece::Content(c) => ids.extend(self.encode_plain(c, at_start)?),
            }
            at_start &= p.text().is_empty();
        }
        Ok(ids)
    }

    /// Base models: the plain continuation format of [`ChatTokenizer::format_prompt`], with the
    /// system and user texts read as plain text.
    fn encode_base(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let sys = messages
            .iter()
            .filter(|m| m.role == "system")
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n\n");
        let user = messages
            .iter()
            .rev()
            .find(|m| m.role != "system")
            .map(|m| m.content.as_str())
            .unwrap_or("");
        let mut body = String::new();
        if !sys.is_empty() {
            body.push_str(&sys);
            body.push_str("\n\n");
        }
        body.push_str(user);
        let bos = match (self.adds_bos(), self.bos_token()) {
            (true, Some((_, id))) => Some(id),
            _ => None,
        };
        if !self.holds_control_text(&body) {
            let sys = (!sys.is_empty()).then_some(sys.as_str());
            return self.encode(&self.format_prompt(sys, user)?);
        }
        let mut ids: Vec<u32> = bos.into_iter().collect();
        ids.extend(self.encode_plain(&body, ids.is_empty())?);
        Ok(ids)
    }
}

/// A stretch of rendered text: the template's own, or one message's content.
enum Piece<'a> {
    Template(&'a str),
    Content(&'a str),
}

impl Piece<'_> {
    fn text(&self) -> &str {
        match self {
            Piece::Template(t) | Piece::Content(t) => t,
        }
    }
}

/// Cuts the placeholder-rendered `skeleton` into template pieces and the real contents (trimmed
/// when `trim`, as templates such as Gemma's do). A content the template left out is simply absent.
fn split_skeleton<'a>(
    skeleton: &'a str,
    messages: &'a [ChatMessage],
    trim: bool,
) -> Vec<Piece<'a>> {
    let mut spots: Vec<(usize, usize, usize)> = Vec::new();
    for i in 0..messages.len() {
        let ph = placeholder(i);
        let mut from = 0;
        while let Some(at) = skeleton[from..].find(&ph) {
            spots.push((from + at, ph.len(), i));
            from += at + ph.len();
        }
    }
    spots.sort_unstable();
    let mut pieces = Vec::with_capacity(2 * spots.len() + 1);
    let mut pos = 0;
    for (at, len, i) in spots {
        pieces.push(Piece::Template(&skeleton[pos..at]));
        let c = messages[i].content.as_str();
        pieces.push(Piece::Content(if trim { c.trim() } else { c }));
        pos = at + len;
    }
    pieces.push(Piece::Template(&skeleton[pos..]));
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skeleton_splits_at_each_placeholder() {
        let msgs = vec![ChatMessage::system(" a "), ChatMessage::user("b")];
        let sk = format!("<s>{}|{}</s>", placeholder(0), placeholder(1));
        let p = split_skeleton(&sk, &msgs, true);
        let got: Vec<&str> = p.iter().map(|p| p.text()).collect();
        assert_eq!(got, ["<s>", "a", "|", "b", "</s>"]);
    }
}
