//! Escaping of data-derived text for HTML, embedded JSON and terminals.

/// Escapes text for HTML element content and double- or single-quoted attribute values.
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Makes JSON safe inside `<script type="application/json">`: a `<` can only occur inside JSON
/// strings, where `\u003c` means the same, so `</script>` in model output cannot close the tag.
pub(super) fn script_safe_json(json: &str) -> String {
    json.replace('<', "\\u003c")
}

/// Replaces control characters (newlines, ANSI escapes from model output) with visible escapes so a
/// listing stays one line per sample and cannot restyle the user's terminal.
pub fn terminal_safe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(
            html_escape(r#"<b a="1">'&'</b>"#),
            "&lt;b a=&quot;1&quot;&gt;&#39;&amp;&#39;&lt;/b&gt;"
        );
        assert_eq!(
            script_safe_json(r#"{"a":"</script>"}"#),
            r#"{"a":"\u003c/script>"}"#
        );
        assert_eq!(terminal_safe("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
    }
}
