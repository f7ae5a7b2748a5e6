//! Rendering a model's own Jinja chat template the way Hugging Face's `apply_chat_template` does.
//!
//! The refusal direction is read at the last prompt token, so the prompt must be byte-for-byte what
//! the model saw in training: the default system prompt the template inserts, the newline after
//! `<|im_start|>assistant`, and so on. Hugging Face renders with Jinja2 (`trim_blocks=True`,
//! `lstrip_blocks=True`, loop controls, a `raise_exception` global, a `tojson` filter built on
//! Python's `json.dumps`), and templates call Python string methods (`.strip()`, `.startswith()`).
//! minijinja with minijinja-contrib's pycompat covers the methods; the rest is set up here so that
//! the output matches, including where minijinja's defaults differ from Jinja2's (how `none` and
//! booleans print, HTML escaping in `tojson`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};

use super::ChatMessage;
use crate::error::{Error, Result};

const TEMPLATE_NAME: &str = "chat_template";

/// The special-token strings a template may refer to (`{{ bos_token }}`); Hugging Face passes its
/// special-token map, and leaves out the ones a tokenizer does not have.
#[derive(Debug, Clone, Default)]
pub(crate) struct TemplateTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub unk: Option<String>,
    pub pad: Option<String>,
}

/// A chat template, compiled once. A template minijinja cannot parse does not make the tokenizer
/// unusable (encoding still works); the parse error is kept and reported when rendering.
pub(crate) struct ChatTemplate {
    source: String,
    env: std::result::Result<Environment<'static>, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("compiled", &self.env.is_ok())
            .finish()
    }
}

impl ChatTemplate {
    pub(crate) fn new(source: String) -> Self {
        let env = build_env(&source).map_err(|e| describe(&e));
        ChatTemplate { source, env }
    }

    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (no tools, no documents: both are passed as `none`, as Hugging Face does
    /// when none are given).
    pub(crate) fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tokens: &TemplateTokens,
    ) -> Result<String> {
        let env = self
            .env
            .as_ref()
            .map_err(|e| Error::ChatTemplate(format!("the template does not compile: {e}")))?;
        let tmpl = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::ChatTemplate(describe(&e)))?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        for (name, tok) in [
            ("bos_token", &tokens.bos),
            ("eos_token", &tokens.eos),
            ("unk_token", &tokens.unk),
            ("pad_token", &tokens.pad),
        ] {
            if let Some(t) = tok {
                ctx.insert(name, Value::from(t.as_str()));
            }
        }
        tmpl.render(&ctx)
            .map_err(|e| Error::ChatTemplate(describe(&e)))
    }
}

/// minijinja's error plus its cause chain (the message of `raise_exception` lives there).
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        let _ = write!(s, ": {inner}");
        src = inner.source();
    }
    s
}

fn build_env(source: &str) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    // Whitespace handling is fixed when a template is compiled, so set it before adding it.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // Jinja2 drops a single trailing newline of the template source; minijinja's default agrees,
    // but say so: it changes the last byte of every prompt.
    env.set_keep_trailing_newline(false);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.set_formatter(python_formatter);
    env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(source))?;
    Ok(env)
}

/// Templates call `raise_exception("...")` to reject a conversation (e.g. roles out of order).
fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// Prints values the way Jinja2 (i.e. Python's `str`) does where minijinja differs: `None`, `True`,
/// `False`. Everything else goes through minijinja's own formatting.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None => out.write_str("None")?,
        ValueKind::Bool => out.write_str(if value.is_true() { "True" } else { "False" })?,
        _ => minijinja::escape_formatter(out, state, value)?,
    }
    Ok(())
}

/// Hugging Face's `{% generation %}` / `{% endgeneration %}` marks the assistant's span for
/// training masks and renders nothing; minijinja does not know the tag, so drop it.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let after = &rest[open + 2..];
        let inner = after.trim_start_matches(['-', '+']).trim_start();
        let word_len = inner
            .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .unwrap_or(inner.len());
        let word = &inner[..word_len];
        if word == "generation" || word == "endgeneration" {
            let tail = inner[word_len..]
                .trim_start()
                .trim_start_matches(['-', '+']);
            if let Some(end) = tail.strip_prefix("%}") {
                out.push_str(&rest[..open]);
                rest = end;
                continue;
            }
        }
        out.push_str(&rest[..open + 2]);
        rest = after;
    }
    out.push_str(rest);
    out
}

/// `tojson` as Hugging Face defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`. minijinja's own filter escapes `<`, `>`, `&` and
/// `'` for HTML and uses no spaces after `,` and `:`, which would change tool prompts.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(n.max(0) as usize)),
            None => Some(v.as_str().unwrap_or_default().to_string()),
        },
    };
    let (item_sep, key_sep) = match separators.filter(|s| !s.is_none()) {
        Some(s) => {
            let a = s.get_item_by_index(0)?;
            let b = s.get_item_by_index(1)?;
            (
                a.as_str().unwrap_or(",").to_string(),
                b.as_str().unwrap_or(":").to_string(),
            )
        }
        // Python's default: ", " on one line, "," when indenting (the newline separates).
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&mut out, value, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn write(
        &self,
        out: &mut String,
        v: &Value,
        depth: usize,
    ) -> std::result::Result<(), minijinja::Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone())?;
                    out.push_str(&python_float(f));
                }
            }
            ValueKind::String => self.string(out, v.as_str().unwrap_or_default()),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    // JSON keys are strings; Python converts numbers and booleans the same way.
                    match k.as_str() {
                        Some(s) => self.string(out, s),
                        None => self.string(out, &k.to_string()),
                    }
                    out.push_str(&self.key_sep);
                    self.write(out, &v.get_item(k)?, depth + 1)?;
                }
                self.newline(out, depth);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.write(out, item, depth + 1)?;
                }
                self.newline(out, depth);
                out.push(']');
            }
            _ => self.string(out, &v.to_string()),
        }
        Ok(())
    }

    /// A JSON string as Python writes it: short escapes for `\n` and friends, `\u00XX` for other
    /// control characters, non-ASCII kept unless `ensure_ascii`.
    fn string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0C}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)` for the common cases: `1.0`, `0.5`, `1e-07`, `1e+20`, `NaN`, `Infinity`.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Rust's `{:e}` gives "1e-7" / "1.5e20"; Python pads the exponent to two digits and signs it.
        let s = format!("{f:e}");
        if let Some((mant, exp)) = s.split_once('e') {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            return format!("{mant}e{sign}{digits:0>2}");
        }
        return s;
    }
    if f.fract() == 0.0 {
        format!("{f:.1}")
    } else {
        // Rust's shortest round-trip form, like Python's repr.
        format!("{f}")
    }
}

/// `strftime_now(format)`: Llama-3 templates put today's date in the system prompt. Hugging Face
/// uses local time; we use UTC (no time-zone database here), which only differs near midnight.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Year, month (1..=12), day (1..=31) of a count of days since 1970-01-01, in the proleptic
/// Gregorian calendar (the usual era-of-400-years arithmetic).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A small `strftime` over the directives chat templates use; unknown ones are copied through.
fn strftime_utc(format: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, (sod / 60) % 60, sod % 60);
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let wd = (days + 3).rem_euclid(7) as usize;
    let month = MONTHS[(m - 1) as usize];
    let yday: i64 = (1..m).map(|mi| days_in_month(y, mi)).sum::<i64>() + i64::from(d);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => {
                let _ = write!(out, "{y}");
            }
            Some('y') => {
                let _ = write!(out, "{:02}", y.rem_euclid(100));
            }
            Some('m') => {
                let _ = write!(out, "{m:02}");
            }
            Some('d') => {
                let _ = write!(out, "{d:02}");
            }
            Some('e') => {
                let _ = write!(out, "{d:>2}");
            }
            Some('B') => out.push_str(month),
            Some('b') | Some('h') => out.push_str(&month[..3]),
            Some('A') => out.push_str(WEEKDAYS[wd]),
            Some('a') => out.push_str(&WEEKDAYS[wd][..3]),
            Some('H') => {
                let _ = write!(out, "{hh:02}");
            }
            Some('I') => {
                let _ = write!(out, "{:02}", if hh % 12 == 0 { 12 } else { hh % 12 });
            }
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('M') => {
                let _ = write!(out, "{mm:02}");
            }
            Some('S') => {
                let _ = write!(out, "{ss:02}");
            }
            Some('j') => {
                let _ = write!(out, "{yday:03}");
            }
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

fn days_in_month(y: i64, m: u32) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ => {
            if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 {
                29
            } else {
                28
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, messages: &[ChatMessage], gen: bool) -> Result<String> {
        let t = ChatTemplate::new(src.to_string());
        let tokens = TemplateTokens {
            bos: Some("<s>".into()),
            eos: Some("</s>".into()),
            ..Default::default()
        };
        t.render(messages, gen, &tokens)
    }

    #[test]
    fn trim_and_lstrip_blocks_like_hf() {
        // With trim_blocks + lstrip_blocks, block lines vanish entirely, as in Jinja2.
        let src = "{{ bos_token }}\n{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\nA:{% endif %}\n";
        let got = render(src, &[ChatMessage::user("hi")], true).unwrap();
        assert_eq!(got, "<s>\n[hi]\nA:");
    }

    #[test]
    fn python_string_methods_work() {
        let src = "{{ messages[0].content.strip().upper() }}|{{ messages[0]['content'].startswith(' x') }}";
        let got = render(src, &[ChatMessage::user(" xy ")], false).unwrap();
        assert_eq!(got, "XY|True");
    }

    #[test]
    fn raise_exception_is_a_chat_template_error() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}";
        let err = render(src, &[ChatMessage::assistant("x")], false).unwrap_err();
        match err {
            Error::ChatTemplate(m) => {
                assert!(m.contains("Conversation roles must alternate"), "{m}")
            }
            e => panic!("wrong error {e:?}"),
        }
    }

    #[test]
    fn none_and_bools_print_like_python() {
        let got = render("{{ tools }} {{ add_generation_prompt }}", &[], true).unwrap();
        assert_eq!(got, "None True");
    }

    #[test]
    fn tojson_matches_json_dumps() {
        let got = render(
            "{{ messages[0].content | tojson }} {{ {'b': [1, 2.5, none], 'a': true} | tojson(sort_keys=true) }}",
            &[ChatMessage::user("<a> \"q\"\n é")],
            false,
        )
        .unwrap();
        assert_eq!(
            got,
            "\"<a> \\\"q\\\"\\n é\" {\"a\": true, \"b\": [1, 2.5, null]}"
        );
        let got = render("{{ [1, {'k': 'v'}] | tojson(indent=2) }}", &[], false).unwrap();
        assert_eq!(got, "[\n  1,\n  {\n    \"k\": \"v\"\n  }\n]");
    }

    #[test]
    fn generation_tags_are_dropped() {
        let src = "{% for m in messages %}{% generation %}{{ m.content }}{%- endgeneration -%}{% endfor %}";
        assert_eq!(
            strip_generation_tags(src),
            "{% for m in messages %}{{ m.content }}{% endfor %}"
        );
        assert_eq!(render(src, &[ChatMessage::user("x")], false).unwrap(), "x");
    }

    #[test]
    fn bad_template_fails_at_render_not_load() {
        let t = ChatTemplate::new("{% if %}".into());
        assert!(matches!(
            t.render(&[], false, &TemplateTokens::default()),
            Err(Error::ChatTemplate(_))
        ));
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-07-26 12:34:56 UTC was a Friday.
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 12 * 3600 + 34 * 60 + 56;
        assert_eq!(
            strftime_utc("%d %b %Y %H:%M:%S %A %j %%", t),
            "26 Jul 2024 12:34:56 Friday 208 %"
        );
        assert_eq!(strftime_utc("%Y-%m-%d", 0), "1970-01-01");
        assert_eq!(strftime_utc("%Y-%m-%d %a", 951_782_400), "2000-02-29 Tue");
    }

    #[test]
    fn python_float_forms() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.1), "0.1");
        assert_eq!(python_float(1e-7), "1e-07");
        assert_eq!(python_float(1.5e20), "1.5e+20");
    }
}
