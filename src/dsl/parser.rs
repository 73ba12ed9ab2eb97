//! Text → AST. pest pairs are consumed here and never leave this module.
//!
//! Parsing never fails: each top-level item is parsed on its own, and after a syntax error the
//! parser skips to the next line that starts a declaration, so one mistake does not hide the
//! others. Naming follows the house contract: `parse_*` builds, `expect_*` reports a user error,
//! `presume_*` marks something the grammar guarantees (a bug if it does not hold).

use pest::Parser;
use pest::error::{ErrorVariant, InputLocation};
use pest::iterators::Pair;

use crate::dsl::ast::{
    Arg, Block, Body, Call, Decl, DeclKind, Entry, Expr, ExprKind, Field, FieldValue, File, Ident,
    Import, Item, Key, KeyKind, StrLit,
};
use crate::dsl::diagnostic::{Code, Diagnostic};
use crate::dsl::span::{FileId, Span};

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/vlmpipe.pest"]
struct VlmParser;

/// Parses one file's text into its items plus every syntax diagnostic.
pub fn parse_file(file: FileId, text: &str) -> (File, Vec<Diagnostic>) {
    let mut builder = Builder {
        file,
        offset: 0,
        diagnostics: Vec::new(),
    };
    let mut items = Vec::new();
    let mut broken = Vec::new();
    let mut pos = 0;
    loop {
        pos += gap_len(&text[pos..]);
        if pos >= text.len() {
            break;
        }
        builder.offset = pos;
        match VlmParser::parse(Rule::item, &text[pos..]) {
            Ok(mut pairs) => {
                let Some(pair) = pairs.next() else { break };
                let end = pair.as_span().end();
                if let Some(item) = builder.parse_item(pair) {
                    items.push(item);
                }
                // An empty match cannot happen (every item starts with a keyword); guard anyway
                // so a grammar change can never make this loop spin.
                pos += end.max(1);
            }
            Err(error) => {
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
                if let Some(name) = builder.broken_name(&text[pos..]) {
                    broken.push(name);
                }
                // Resume at the next declaration after the start of the broken one: when an unclosed
                // bracket swallowed the next declaration, the error lies inside that one.
                pos = resync(text, pos);
            }
        }
    }
    (File { items, broken }, builder.diagnostics)
}

/// Length of the blanks and comments at the start of `text`.
fn gap_len(text: &str) -> usize {
    VlmParser::parse(Rule::gap, text)
        .ok()
        .and_then(|mut p| p.next())
        .map_or(0, |p| p.as_span().end())
}

/// The start of the first line after the one holding `at` that begins (in column 1) a declaration.
fn resync(text: &str, at: usize) -> usize {
    let mut line_start = match text.get(at..).and_then(|rest| rest.find('\n')) {
        Some(i) => at + i + 1,
        None => return text.len(),
    };
    while line_start < text.len() {
        let rest = &text[line_start..];
        if VlmParser::parse(Rule::decl_head, rest).is_ok() {
            return line_start;
        }
        match rest.find('\n') {
            Some(i) => line_start += i + 1,
            None => break,
        }
    }
    text.len()
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
    let runs_into_next = found == "end of file"
        || (DeclKind::from_keyword(word).is_some()
            && !expected.iter().any(|e| e.starts_with("a declaration")));
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
    }
    d
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

    /// The name of a declaration that failed to parse, so that its uses are not reported as
    /// unknown references on top of the syntax error.
    fn broken_name(&self, rest: &str) -> Option<Ident> {
        let head = VlmParser::parse(Rule::decl_head, rest).ok()?.next()?;
        let name = head.into_inner().find(|p| p.as_rule() == Rule::name)?;
        Some(self.ident(&name))
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
                for p in pair.into_inner() {
                    match p.as_rule() {
                        Rule::callee => callee = Some(self.ident(&p)),
                        Rule::args => args = self.parse_args(p),
                        _ => {}
                    }
                }
                match callee {
                    Some(callee) => ExprKind::Call(Call { callee, args }),
                    None => ExprKind::Invalid,
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
