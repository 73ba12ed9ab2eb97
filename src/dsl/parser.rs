//! Text → AST. pest pairs are consumed here and never leave this module.
//!
//! Parsing never fails: each top-level item is parsed on its own, and after a syntax error the
//! parser skips to the next line that starts a declaration, so one mistake does not hide the
//! others. Those lines are found first, in one pass that skips strings and comments
//! ([`Outline`]), and pest is only ever handed the text from an item to the next of them: pest
//! builds an error by searching its whole input, so handing it the rest of the file made each
//! error cost the rest of the file (issue 14 item 8: quadratic). Work is linear in the text; the
//! tests bound it through [`ParseStats`].
//!
//! Naming follows the house contract: `parse_*` builds, `expect_*` reports a user error,
//! `presume_*` marks something the grammar guarantees (a bug if it does not hold).

use pest::Parser;
use pest::error::{ErrorVariant, InputLocation};
use pest::iterators::Pair;

use crate::dsl::ast::{
    Arg, Block, Body, Call, Decl, DeclKind, Entry, Expr, ExprKind, Field, FieldValue, File, Ident,
    Import, Item, Key, KeyKind, StrLit,
};
use crate::dsl::diagnostic::{Code, Diagnostic, did_you_mean};
use crate::dsl::span::{FileId, Span};

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/vlmpipe.pest"]
struct VlmParser;

/// Parses one file's text into its items plus every syntax diagnostic.
pub(crate) fn parse_file(file: FileId, text: &str) -> (File, Vec<Diagnostic>) {
    let (file, diagnostics, _) = parse_file_with_stats(file, text);
    (file, diagnostics)
}

/// The work one [`parse_file_with_stats`] did, for tests that bound it (issue 14 item 8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParseStats {
    /// Calls into pest.
    pub pest_calls: usize,
    /// Bytes those calls cost: a call that fails scans all the text it was given (pest builds its
    /// error from the line holding the failure, searching back from the end of that text); a call
    /// that succeeds costs the bytes it matched.
    pub pest_bytes: usize,
}

/// Like [`parse_file`], also saying how much work it did.
pub fn parse_file_with_stats(file: FileId, text: &str) -> (File, Vec<Diagnostic>, ParseStats) {
    let mut builder = Builder {
        file,
        offset: 0,
        diagnostics: Vec::new(),
    };
    let mut stats = ParseStats::default();
    let mut items = Vec::new();
    let mut broken = Vec::new();
    let outline = Outline::scan(text);
    let mut next_head = 0;
    let mut next_deep = 0;
    let mut pos = 0;
    loop {
        pos = gap_end(text, pos);
        if pos >= text.len() {
            break;
        }
        // pest only ever sees the text up to the next declaration: it builds each error from the
        // end of the text it was given, so handing it the rest of the file made recovery quadratic.
        while outline.heads.get(next_head).is_some_and(|&h| h <= pos) {
            next_head += 1;
        }
        let cut = outline.heads.get(next_head).copied().unwrap_or(text.len());
        while outline.deep.get(next_deep).is_some_and(|&d| d < pos) {
            next_deep += 1;
        }
        if let Some(&deep) = outline.deep.get(next_deep).filter(|&&d| d < cut) {
            builder.diagnostics.push(
                Diagnostic::error(
                    Code::Syntax,
                    format!("brackets are nested more than {MAX_NESTING} deep"),
                )
                .at(Span::new(file, deep, deep + 1))
                .with_hint("name the inner values with their own declarations"),
            );
            if let Some(head) = head_at(text, pos).and_then(|h| h.name) {
                broken.push(builder.ident_in(text, head));
            }
            pos = cut;
            continue;
        }
        builder.offset = pos;
        stats.pest_calls += 1;
        match VlmParser::parse(Rule::item, &text[pos..cut]) {
            Ok(mut pairs) => {
                let Some(pair) = pairs.next() else { break };
                let end = pair.as_span().end();
                stats.pest_bytes += end;
                if let Some(item) = builder.parse_item(pair) {
                    items.push(item);
                }
                // An empty match cannot happen (every item starts with a keyword); guard anyway
                // so a grammar change can never make this loop spin.
                pos += end.max(1);
            }
            Err(error) => {
                stats.pest_bytes += cut - pos;
                let at = match error.location {
                    InputLocation::Pos(p) => p,
                    InputLocation::Span((s, _)) => s,
                } + pos;
                let expected = match &error.variant {
                    ErrorVariant::ParsingError { positives, .. } => expected_words(positives),
                    ErrorVariant::CustomError { .. } => Vec::new(),
                };
                builder
                    .diagnostics
                    .push(syntax_error(file, text, pos, at, &expected));
                match head_at(text, pos) {
                    Some(head) => broken.extend(head.name.map(|n| builder.ident_in(text, n))),
                    // A misspelt keyword (`datset pets {`): its name is broken too, not unknown.
                    None if at == pos => {
                        broken.extend(
                            misspelt_head_name(text, pos).map(|n| builder.ident_in(text, n)),
                        );
                    }
                    None => {}
                }
                // Resume at the next declaration: the text up to it belongs to the broken one.
                pos = cut;
            }
        }
    }
    (File { items, broken }, builder.diagnostics, stats)
}

/// How deep brackets may nest; deeper text is refused before pest (and the recursive AST
/// builder and analyzer after it) could run out of stack.
pub(crate) const MAX_NESTING: usize = 64;

/// Where the declarations of a file start, found in one pass that skips strings and comments.
struct Outline {
    /// Starts of the lines (outside strings and comments) that begin a declaration.
    heads: Vec<usize>,
    /// Brackets that open one level deeper than [`MAX_NESTING`] (depth counted from the last head).
    deep: Vec<usize>,
}

impl Outline {
    fn scan(text: &str) -> Outline {
        let b = text.as_bytes();
        let mut heads = Vec::new();
        let mut deep = Vec::new();
        let mut depth = 0usize;
        let mut line_start = true;
        let mut i = 0;
        while i < b.len() {
            if line_start {
                line_start = false;
                if head_at(text, i).is_some() {
                    heads.push(i);
                    depth = 0;
                }
            }
            match b[i] {
                b'\n' => {
                    line_start = true;
                    i += 1;
                }
                b'/' if b.get(i + 1) == Some(&b'/') => {
                    i = memchr_newline(b, i);
                }
                b'"' if b[i..].starts_with(b"\"\"\"") => {
                    // Lines inside a triple-quoted string never start a declaration.
                    i = text[i + 3..]
                        .find("\"\"\"")
                        .map_or(b.len(), |e| i + 3 + e + 3);
                }
                b'"' => {
                    i += 1;
                    while i < b.len() {
                        match b[i] {
                            // An escape may hide a newline (pest's `escape` takes any char).
                            b'\\' => i += 2,
                            b'"' => {
                                i += 1;
                                break;
                            }
                            b'\n' => break,
                            _ => i += 1,
                        }
                    }
                }
                b'{' | b'(' | b'[' => {
                    depth += 1;
                    if depth == MAX_NESTING + 1 {
                        deep.push(i);
                    }
                    i += 1;
                }
                b'}' | b')' | b']' => {
                    depth = depth.saturating_sub(1);
                    i += 1;
                }
                _ => i += 1,
            }
        }
        Outline { heads, deep }
    }
}

/// The index of the next `\n` at or after `from` (or the end).
fn memchr_newline(b: &[u8], from: usize) -> usize {
    b[from..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(b.len(), |p| from + p)
}

/// The end of the blanks and comments that start at `at` (the grammar's `WHITESPACE` and
/// `COMMENT`).
fn gap_end(text: &str, mut at: usize) -> usize {
    let b = text.as_bytes();
    loop {
        let rest = &text[at..];
        if rest.starts_with("//") {
            at = memchr_newline(b, at);
        } else if let Some(c) = rest
            .chars()
            .next()
            .filter(|c| matches!(c, ' ' | '\t' | '\r' | '\n' | '\u{FEFF}'))
        {
            at += c.len_utf8();
        } else {
            return at;
        }
    }
}

/// The declaration keywords, as the grammar's `kind` and `kw_import` spell them.
pub(crate) const KEYWORDS: &[&str] = &[
    "import", "pipeline", "param", "labels", "dataset", "split", "prompt", "model", "grammar",
    "eval", "finetune", "export", "report", "executor",
];

/// A declaration's start (`decl_head` in the grammar): the range of its name, if it has one.
struct Head {
    name: Option<(usize, usize)>,
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The ident that starts at `at`, as a byte range.
fn ident_at(text: &str, at: usize) -> Option<(usize, usize)> {
    let b = text.as_bytes();
    if !b
        .get(at)
        .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
    {
        return None;
    }
    let len = b[at..].iter().take_while(|c| is_ident_char(**c)).count();
    Some((at, at + len))
}

/// Whether a declaration (`decl_head`) starts at `at`.
fn head_at(text: &str, at: usize) -> Option<Head> {
    let (start, end) = ident_at(text, at)?;
    let word = &text[start..end];
    if word == "import" {
        return Some(Head { name: None });
    }
    if !KEYWORDS.contains(&word) {
        return None;
    }
    let name = ident_at(text, gap_end(text, end))?;
    Some(Head { name: Some(name) })
}

/// The name after a word that is not a keyword but reads like a misspelt one (`datset pets {`).
fn misspelt_head_name(text: &str, at: usize) -> Option<(usize, usize)> {
    let (_, end) = ident_at(text, at)?;
    did_you_mean(&text[at..end], KEYWORDS.iter().copied())?;
    ident_at(text, gap_end(text, end))
}

/// The things pest tried at the error position, in words, deduplicated and in a stable order.
fn expected_words(rules: &[Rule]) -> Vec<&'static str> {
    let mut words: Vec<&'static str> = Vec::new();
    for rule in rules {
        let word = match rule {
            Rule::item
            | Rule::decl
            | Rule::kind
            | Rule::kw_import
            | Rule::decl_head
            | Rule::import => "a declaration (`dataset`, `model`, `eval`, ...)",
            Rule::name => "a name",
            Rule::field | Rule::field_name => "a field name",
            Rule::block | Rule::lbrace => "`{`",
            Rule::rbrace => "`}`",
            Rule::expr
            | Rule::float
            | Rule::int
            | Rule::bool
            | Rule::json_type
            | Rule::kw_json
            | Rule::call
            | Rule::callee
            | Rule::list
            | Rule::map
            | Rule::path
            | Rule::ident
            | Rule::arg
            | Rule::arg_key
            | Rule::args => "a value",
            Rule::entry | Rule::map_key => "a map key",
            Rule::eq => "`=`",
            Rule::arrow => "`->`",
            Rule::lparen => "`(`",
            Rule::rparen => "`)`",
            Rule::lbracket => "`[`",
            Rule::rbracket => "`]`",
            Rule::colon => "`:`",
            Rule::comma => "`,`",
            Rule::optional_mark => "`?`",
            Rule::EOI => "end of file",
            Rule::exponent | Rule::escape => "a number",
            Rule::string | Rule::triple_string | Rule::plain_string => "a string",
            _ => continue,
        };
        if !words.contains(&word) {
            words.push(word);
        }
    }
    // `->` and `?` may follow almost any value; listing them everywhere is noise.
    if words.iter().any(|w| !matches!(*w, "`->`" | "`?`")) {
        words.retain(|w| !matches!(*w, "`->`" | "`?`"));
    }
    words
}

/// A syntax error at `at` in the item that starts at `item_start`.
fn syntax_error(
    file: FileId,
    text: &str,
    item_start: usize,
    at: usize,
    expected: &[&str],
) -> Diagnostic {
    let at = floor_char_boundary(text, at);
    let rest = &text[at..];
    let (found, len) = describe_found(rest);
    let message = if expected.is_empty() {
        format!("unexpected {found}")
    } else {
        format!("expected {}, found {found}", join_or(expected))
    };
    let mut d = Diagnostic::error(Code::Syntax, message).at(Span::new(file, at, at + len));
    let word = found.trim_matches('`');
    let wants_declaration = expected.iter().any(|e| e.starts_with("a declaration"));
    let runs_into_next = found == "end of file"
        || ((DeclKind::from_keyword(word).is_some() || word == "import") && !wants_declaration);
    if runs_into_next {
        match unclosed_bracket(text.get(item_start..at).unwrap_or("")) {
            Some((offset, bracket)) => {
                let open = item_start + offset;
                d = d
                    .also(
                        Span::new(file, open, open + 1),
                        format!("this `{bracket}` is never closed"),
                    )
                    .with_hint(if found == "end of file" {
                        format!("close the `{bracket}` before the end of the file")
                    } else {
                        format!("close the `{bracket}` before the next declaration")
                    });
            }
            None if found != "end of file" => {
                d = d.with_hint(format!(
                    "`{word}` starts a new declaration: is a bracket or block above left open?"
                ));
            }
            None => {}
        }
    } else if found == "an unterminated string" {
        d = d.with_hint(
            "strings end on the line they start; use `\"\"\"` for text over several lines",
        );
    } else if let Some(name) = non_ascii_name(text, at) {
        d = d.with_hint(format!(
            "`{name}` is not a name: names are ASCII letters, digits and `_`, starting with a letter or `_`"
        ));
    } else if let Some(suggestion) = did_you_mean(word, KEYWORDS.iter().copied())
        .filter(|_| wants_declaration && at == item_start)
    {
        d = d.with_hint(format!(
            "{suggestion} (a declaration starts with its keyword)"
        ));
    }
    d
}

/// The whole word around `at` when the text there is a letter outside ASCII (`café`, `naïve`),
/// which the grammar's names cannot hold.
fn non_ascii_name(text: &str, at: usize) -> Option<&str> {
    let c = text.get(at..)?.chars().next()?;
    if c.is_ascii() || !c.is_alphanumeric() {
        return None;
    }
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let start = text[..at]
        .char_indices()
        .rev()
        .take_while(|(_, c)| is_word(*c))
        .last()
        .map_or(at, |(i, _)| i);
    let end = text[at..]
        .char_indices()
        .find(|(_, c)| !is_word(*c))
        .map_or(text.len(), |(i, _)| at + i);
    Some(&text[start..end])
}

/// The innermost bracket of `text` left open (offset and character), skipping strings and
/// comments; used to point at the cause when a declaration runs into the next one.
fn unclosed_bracket(text: &str) -> Option<(usize, char)> {
    let mut open: Vec<(usize, char)> = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' | '(' | '[' => open.push((i, c)),
            '}' | ')' | ']' => {
                open.pop();
            }
            '/' if text[i..].starts_with("//") => {
                while chars.next_if(|(_, c)| *c != '\n').is_some() {}
            }
            '"' if text[i..].starts_with("\"\"\"") => {
                let end = text[i + 3..]
                    .find("\"\"\"")
                    .map_or(text.len(), |e| i + 3 + e + 3);
                while chars.next_if(|(j, _)| *j < end).is_some() {}
            }
            '"' => {
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' | '\n' => break,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    open.pop()
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// How the text at an error reads in a message, and how many bytes to underline.
fn describe_found(rest: &str) -> (String, usize) {
    let Some(first) = rest.chars().next() else {
        return ("end of file".to_owned(), 0);
    };
    if first.is_alphanumeric() || first == '_' {
        let word: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '.')
            .collect();
        return (format!("`{word}`"), word.len());
    }
    if first == '"' {
        let line = rest.lines().next().unwrap_or(rest);
        let closed = !rest.starts_with("\"\"\"") && line[1..].contains('"');
        let what = if closed || rest.starts_with("\"\"\"") {
            "a string"
        } else {
            "an unterminated string"
        };
        return (what.to_owned(), line.len());
    }
    if first == '\n' || first == '\r' {
        return ("end of line".to_owned(), 0);
    }
    (format!("`{first}`"), first.len_utf8())
}

/// `a`, `a or b`, `a, b or c`.
pub(crate) fn join_or(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

struct Builder {
    file: FileId,
    /// Byte offset of the parsed slice in the file.
    offset: usize,
    diagnostics: Vec<Diagnostic>,
}

impl Builder {
    fn span(&self, pair: &Pair<'_, Rule>) -> Span {
        let s = pair.as_span();
        Span::new(self.file, s.start() + self.offset, s.end() + self.offset)
    }

    fn ident(&self, pair: &Pair<'_, Rule>) -> Ident {
        Ident {
            name: pair.as_str().to_owned(),
            span: self.span(pair),
        }
    }

    /// The ident at a byte range of the file (the builder's offset does not apply).
    fn ident_in(&self, text: &str, (start, end): (usize, usize)) -> Ident {
        Ident {
            name: text[start..end].to_owned(),
            span: Span::new(self.file, start, end),
        }
    }

    fn parse_item(&mut self, pair: Pair<'_, Rule>) -> Option<Item> {
        let inner = presume_child(pair)?;
        match inner.as_rule() {
            Rule::import => {
                let span = self.span(&inner);
                let string = inner.into_inner().find(|p| p.as_rule() == Rule::string)?;
                Some(Item::Import(Import {
                    path: self.parse_string(string),
                    span,
                }))
            }
            Rule::decl => self.parse_decl(inner).map(Item::Decl),
            _ => None,
        }
    }

    fn parse_decl(&mut self, pair: Pair<'_, Rule>) -> Option<Decl> {
        let span = self.span(&pair);
        let mut kind = None;
        let mut name = None;
        let mut body = None;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::kind => kind = DeclKind::from_keyword(p.as_str()).map(|k| (k, self.span(&p))),
                Rule::name => name = Some(self.ident(&p)),
                Rule::block => body = Some(Body::Block(self.parse_block(p))),
                Rule::expr => body = Some(Body::Value(self.parse_expr(p))),
                _ => {}
            }
        }
        let (kind, kind_span) = kind?;
        Some(Decl {
            kind,
            kind_span,
            name: name?,
            body: body?,
            span,
        })
    }

    fn parse_block(&mut self, pair: Pair<'_, Rule>) -> Block {
        let span = self.span(&pair);
        let fields = pair
            .into_inner()
            .filter(|p| p.as_rule() == Rule::field)
            .filter_map(|p| self.parse_field(p))
            .collect();
        Block { fields, span }
    }

    fn parse_field(&mut self, pair: Pair<'_, Rule>) -> Option<Field> {
        let span = self.span(&pair);
        let mut name = None;
        let mut value = None;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::field_name => name = Some(self.ident(&p)),
                Rule::expr => value = Some(FieldValue::Expr(self.parse_expr(p))),
                Rule::block => value = Some(FieldValue::Block(self.parse_block(p))),
                _ => {}
            }
        }
        Some(Field {
            name: name?,
            value: value?,
            span,
        })
    }

    fn parse_expr(&mut self, pair: Pair<'_, Rule>) -> Expr {
        let span = self.span(&pair);
        let mut base = None;
        let mut mapping = None;
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::arrow => {}
                Rule::map if base.is_some() => mapping = Some(self.parse_entries(p)),
                _ => base = Some(self.parse_primary(p)),
            }
        }
        let base = base.unwrap_or(Expr {
            kind: ExprKind::Invalid,
            span,
        });
        match mapping {
            Some(entries) => Expr {
                kind: ExprKind::Mapping {
                    base: Box::new(base),
                    entries,
                },
                span,
            },
            None => base,
        }
    }

    fn parse_primary(&mut self, pair: Pair<'_, Rule>) -> Expr {
        let span = self.span(&pair);
        let kind = match pair.as_rule() {
            Rule::string => ExprKind::Str(self.parse_string(pair)),
            Rule::int => match pair.as_str().parse::<i64>() {
                Ok(i) => ExprKind::Int(i),
                Err(_) => {
                    self.diagnostics.push(
                        Diagnostic::error(
                            Code::BadValue,
                            format!("integer `{}` is out of range", pair.as_str()),
                        )
                        .at(span)
                        .with_hint("integers must fit in 64 bits"),
                    );
                    ExprKind::Invalid
                }
            },
            Rule::float => match pair.as_str().parse::<f64>() {
                Ok(f) if f.is_finite() => ExprKind::Float(f),
                _ => {
                    self.diagnostics.push(
                        Diagnostic::error(
                            Code::BadValue,
                            format!("number `{}` is out of range", pair.as_str()),
                        )
                        .at(span),
                    );
                    ExprKind::Invalid
                }
            },
            Rule::bool => ExprKind::Bool(pair.as_str() == "true"),
            Rule::list => ExprKind::List(
                pair.into_inner()
                    .filter(|p| p.as_rule() == Rule::expr)
                    .map(|p| self.parse_expr(p))
                    .collect(),
            ),
            Rule::map => ExprKind::Map(self.parse_entries(pair)),
            Rule::path => ExprKind::Path(
                pair.into_inner()
                    .filter(|p| p.as_rule() == Rule::ident)
                    .map(|p| self.ident(&p))
                    .collect(),
            ),
            Rule::call => {
                let mut callee = None;
                let mut args = Vec::new();
                let mut fields = None;
                for p in pair.into_inner() {
                    match p.as_rule() {
                        Rule::callee => callee = Some(self.ident(&p)),
                        Rule::args => args = self.parse_args(p),
                        Rule::map => fields = Some((self.span(&p), self.parse_entries(p))),
                        _ => {}
                    }
                }
                match (callee, fields) {
                    (Some(callee), None) => ExprKind::Call(Call { callee, args }),
                    (Some(callee), Some((_, fields))) if callee.name == "json" => {
                        ExprKind::Json { args, fields }
                    }
                    (Some(callee), Some((at, _))) => {
                        self.diagnostics.push(
                            Diagnostic::error(
                                Code::Syntax,
                                format!("unexpected `{{` after `{}(...)`", callee.name),
                            )
                            .at(Span::new(at.file, at.start as usize, at.start as usize + 1))
                            .with_hint("only `json(...)` takes a `{ ... }` of fields"),
                        );
                        ExprKind::Invalid
                    }
                    (None, _) => ExprKind::Invalid,
                }
            }
            Rule::json_type => {
                let mut args = Vec::new();
                let mut fields = Vec::new();
                for p in pair.into_inner() {
                    match p.as_rule() {
                        Rule::args => args = self.parse_args(p),
                        Rule::map => fields = self.parse_entries(p),
                        _ => {}
                    }
                }
                ExprKind::Json { args, fields }
            }
            _ => ExprKind::Invalid,
        };
        Expr { kind, span }
    }

    fn parse_args(&mut self, pair: Pair<'_, Rule>) -> Vec<Arg> {
        let mut args = Vec::new();
        for arg in pair.into_inner().filter(|p| p.as_rule() == Rule::arg) {
            let mut key = None;
            let mut value = None;
            for p in arg.into_inner() {
                match p.as_rule() {
                    Rule::arg_key => key = Some(self.ident(&p)),
                    Rule::expr => value = Some(self.parse_expr(p)),
                    _ => {}
                }
            }
            if let Some(value) = value {
                args.push(Arg { key, value });
            }
        }
        args
    }

    fn parse_entries(&mut self, pair: Pair<'_, Rule>) -> Vec<Entry> {
        let mut entries = Vec::new();
        for entry in pair.into_inner().filter(|p| p.as_rule() == Rule::entry) {
            let span = self.span(&entry);
            let mut key = None;
            let mut value = None;
            let mut optional = false;
            for p in entry.into_inner() {
                match p.as_rule() {
                    Rule::map_key => key = self.parse_key(p),
                    Rule::expr => value = Some(self.parse_expr(p)),
                    Rule::optional_mark => optional = true,
                    _ => {}
                }
            }
            if let (Some(key), Some(value)) = (key, value) {
                entries.push(Entry {
                    key,
                    value,
                    optional,
                    span,
                });
            }
        }
        entries
    }

    fn parse_key(&mut self, pair: Pair<'_, Rule>) -> Option<Key> {
        let span = self.span(&pair);
        let inner = presume_child(pair)?;
        let kind = match inner.as_rule() {
            Rule::string => KeyKind::Str(self.parse_string(inner).value),
            Rule::int => match inner.as_str().parse::<i64>() {
                Ok(i) => KeyKind::Int(i),
                Err(_) => {
                    self.diagnostics.push(
                        Diagnostic::error(
                            Code::BadValue,
                            format!("integer `{}` is out of range", inner.as_str()),
                        )
                        .at(span),
                    );
                    return None;
                }
            },
            _ => KeyKind::Name(inner.as_str().to_owned()),
        };
        Some(Key { kind, span })
    }

    fn parse_string(&mut self, pair: Pair<'_, Rule>) -> StrLit {
        let span = self.span(&pair);
        let Some(inner) = presume_child(pair) else {
            return StrLit {
                value: String::new(),
                span,
                origin: Vec::new(),
            };
        };
        let raw = inner.as_str();
        let start = span.start as usize;
        if inner.as_rule() == Rule::triple_string {
            let body = raw
                .strip_prefix("\"\"\"")
                .and_then(|r| r.strip_suffix("\"\"\""))
                .unwrap_or("");
            let (value, origin) = dedent(body, start + 3);
            StrLit {
                value,
                span,
                origin,
            }
        } else {
            let body = raw
                .strip_prefix('"')
                .and_then(|r| r.strip_suffix('"'))
                .unwrap_or("");
            self.unescape(body, start + 1, span)
        }
    }

    fn unescape(&mut self, body: &str, file_start: usize, span: Span) -> StrLit {
        let mut value = String::with_capacity(body.len());
        let mut origin = vec![(0, to_u32(file_start))];
        let mut chars = body.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c != '\\' {
                value.push(c);
                continue;
            }
            let Some((j, e)) = chars.next() else { break };
            let replacement = match e {
                'n' => Some('\n'),
                't' => Some('\t'),
                'r' => Some('\r'),
                '0' => Some('\0'),
                '\\' => Some('\\'),
                '"' => Some('"'),
                '\'' => Some('\''),
                _ => None,
            };
            match replacement {
                Some(r) => value.push(r),
                None => {
                    let at = file_start + i;
                    self.diagnostics.push(
                        Diagnostic::error(
                            Code::Syntax,
                            format!("unknown escape `\\{e}` in a string"),
                        )
                        .at(Span::new(span.file, at, at + 1 + e.len_utf8()))
                        .with_hint("known escapes: `\\n`, `\\t`, `\\r`, `\\0`, `\\\\`, `\\\"`"),
                    );
                }
            }
            origin.push((to_u32(value.len()), to_u32(file_start + j + e.len_utf8())));
        }
        StrLit {
            value,
            span,
            origin,
        }
    }
}

/// Strips the common indentation of a triple-quoted string's lines, and a first and last line
/// that hold only blanks (the ones beside the quotes). Returns the text and its origin runs.
fn dedent(body: &str, file_start: usize) -> (String, Vec<(u32, u32)>) {
    let mut lines: Vec<(usize, &str)> = Vec::new();
    let mut at = 0;
    for line in body.split('\n') {
        lines.push((at, line));
        at += line.len() + 1;
    }
    if lines.first().is_some_and(|(_, l)| l.trim().is_empty()) && lines.len() > 1 {
        lines.remove(0);
    }
    if lines.last().is_some_and(|(_, l)| l.trim().is_empty()) && lines.len() > 1 {
        lines.pop();
    }
    let indent = lines
        .iter()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(_, l)| l.len() - l.trim_start_matches([' ', '\t']).len())
        .min()
        .unwrap_or(0);
    let mut value = String::new();
    let mut origin = Vec::new();
    for (n, (line_at, line)) in lines.iter().enumerate() {
        if n > 0 {
            value.push('\n');
        }
        let line = line.strip_suffix('\r').unwrap_or(line);
        let leading = line.len() - line.trim_start_matches([' ', '\t']).len();
        let cut = indent.min(leading);
        origin.push((to_u32(value.len()), to_u32(file_start + line_at + cut)));
        value.push_str(&line[cut..]);
    }
    (value, origin)
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The single child the grammar guarantees (`None` would be a grammar bug; callers skip it).
fn presume_child(pair: Pair<'_, Rule>) -> Option<Pair<'_, Rule>> {
    pair.into_inner().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (File, Vec<Diagnostic>) {
        parse_file(FileId(0), text)
    }

    #[test]
    fn triple_quoted_strings_are_dedented() {
        let (file, diags) = parse("prompt p {\n  user = \"\"\"\n    a\n      b\n    \"\"\"\n}\n");
        assert!(diags.is_empty(), "{diags:?}");
        let Some(Item::Decl(decl)) = file.items.first() else {
            panic!("no decl")
        };
        let Body::Block(block) = &decl.body else {
            panic!("no block")
        };
        let FieldValue::Expr(Expr {
            kind: ExprKind::Str(s),
            ..
        }) = &block.fields[0].value
        else {
            panic!("no string")
        };
        assert_eq!(s.value, "a\n  b");
        // "b" is on line 4, after 6 spaces of which 4 are stripped.
        let b = s.value.find('b').unwrap_or(0);
        assert_eq!(
            s.span_of_offset(b).start as usize,
            "prompt p {\n  user = \"\"\"\n    a\n      ".len()
        );
    }

    #[test]
    fn dedent_keeps_relative_indentation_and_single_line_strings() {
        assert_eq!(dedent("abc", 0).0, "abc");
        assert_eq!(dedent("\n  a\n\n    b\n  ", 0).0, "a\n\n  b");
        let (value, origin) = dedent("\n\t x\n\t y\n", 10);
        assert_eq!(value, "x\ny");
        assert_eq!(origin, vec![(0, 13), (2, 17)]);
    }

    #[test]
    fn unknown_escapes_are_reported() {
        let (_, diags) = parse("labels l = [\"a\\qb\"]");
        assert_eq!(diags.len(), 1);
        assert_eq!(diags[0].message, "unknown escape `\\q` in a string");
        assert_eq!(
            diags[0].primary_span().map(|s| (s.start, s.end)),
            Some((14, 16))
        );
    }

    #[test]
    fn escapes_are_processed() {
        let (file, diags) = parse("labels l = [\"a\\n\\\"b\\\"\"]");
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(file.items.len(), 1);
    }

    #[test]
    fn only_json_calls_take_fields() {
        let (file, diags) = parse("grammar g = json(whitespace: \"compact\") { a: string }");
        assert!(diags.is_empty(), "{diags:?}");
        let Some(Item::Decl(Decl {
            body: Body::Value(value),
            ..
        })) = file.items.first()
        else {
            panic!("no decl")
        };
        assert!(
            matches!(&value.kind, ExprKind::Json { args, fields } if args.len() == 1 && fields.len() == 1)
        );
        let (_, diags) = parse("grammar g = regex(\"a\") { a: string }");
        let msgs: Vec<&str> = diags.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(msgs, ["unexpected `{` after `regex(...)`"]);
    }

    #[test]
    fn declaration_lines_are_found_outside_strings_and_comments() {
        let text = "labels a = [\"x\"]\nprompt p { user = \"\"\"\ndataset d {\n\"\"\" }\n// model m\nmodel\n  m = hf(\"a\\\nmodel n\")\nsplit s = x\n";
        let heads: Vec<&str> = Outline::scan(text)
            .heads
            .iter()
            .map(|&h| text[h..].lines().next().unwrap_or(""))
            .collect();
        assert_eq!(
            heads,
            [
                "labels a = [\"x\"]",
                "prompt p { user = \"\"\"",
                "model",
                "split s = x"
            ]
        );
        // pest agrees with the hand-written test on each line start.
        for (at, _) in text.match_indices('\n').map(|(i, c)| (i + 1, c)) {
            let by_hand = head_at(text, at).is_some();
            let by_pest = VlmParser::parse(Rule::decl_head, &text[at..]).is_ok();
            assert_eq!(by_hand, by_pest, "at {at}: {:?}", &text[at..]);
        }
    }

    #[test]
    fn errors_in_two_declarations_are_both_reported() {
        let (file, diags) = parse(
            "model m = hf(\"a\"\nlabels l = [\"a\"]\neval e { model = }\nreport r { compare = [e] }\n",
        );
        let msgs: Vec<&str> = diags.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(diags.len(), 2, "{msgs:?}");
        assert_eq!(file.items.len(), 2, "{:#?}", file.items);
        assert_eq!(diags[0].message, "expected `)` or `,`, found `labels`");
        assert_eq!(diags[1].message, "expected a value, found `}`");
    }
}
