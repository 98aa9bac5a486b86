//! Simple syntax-aware highlighting for the diff: each line of a unified
//! diff is classed (added, removed, hunk, header, context), and the code in
//! it is cut into keywords, strings, comments and numbers by a small
//! per-language table chosen by the file's extension. Line by line only: a
//! string or comment spanning lines is coloured on its first line alone,
//! which is enough to read a change by.

/// What a diff line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineKind {
    Added,
    Removed,
    Context,
    Hunk,
    /// `diff --git`, `---`, `+++`, modes, "Binary files … differ".
    Header,
}

impl LineKind {
    pub(crate) fn class(self) -> &'static str {
        match self {
            LineKind::Added => "add",
            LineKind::Removed => "del",
            LineKind::Context => "ctx",
            LineKind::Hunk => "hunk",
            LineKind::Header => "hdr",
        }
    }
}

/// The kind of each line of one file's unified diff, and the code part of
/// it (after the `+`, `-` or space) when it has one.
pub(crate) fn classify(text: &str) -> Vec<(LineKind, &str, &str)> {
    let mut in_hunk = false;
    text.lines()
        .map(|line| {
            if line.starts_with("@@") {
                in_hunk = true;
                return (LineKind::Hunk, line, "");
            }
            if !in_hunk || line.starts_with("diff --git ") {
                in_hunk = false;
                return (LineKind::Header, line, "");
            }
            match line.as_bytes().first() {
                Some(b'+') => (LineKind::Added, "+", &line[1..]),
                Some(b'-') => (LineKind::Removed, "-", &line[1..]),
                Some(b' ') => (LineKind::Context, " ", &line[1..]),
                // "\ No newline at end of file"
                _ => (LineKind::Header, line, ""),
            }
        })
        .collect()
}

/// A piece of a code line and how to colour it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    Plain,
    Keyword,
    String,
    Comment,
    Number,
}

impl Token {
    pub(crate) fn class(self) -> Option<&'static str> {
        match self {
            Token::Plain => None,
            Token::Keyword => Some("k"),
            Token::String => Some("s"),
            Token::Comment => Some("c"),
            Token::Number => Some("n"),
        }
    }
}

/// How one language is coloured.
#[derive(Debug)]
pub(crate) struct Lang {
    keywords: &'static [&'static str],
    line_comments: &'static [&'static str],
    quotes: &'static [char],
}

static RUST: Lang = Lang {
    keywords: &[
        "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else", "enum", "extern",
        "false", "fn", "for", "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref",
        "return", "self", "Self", "static", "struct", "super", "trait", "true", "type", "unsafe", "use",
        "where", "while",
    ],
    line_comments: &["//"],
    quotes: &['"'],
};

static PYTHON: Lang = Lang {
    keywords: &[
        "and", "as", "assert", "async", "await", "break", "class", "continue", "def", "del", "elif", "else",
        "except", "False", "finally", "for", "from", "global", "if", "import", "in", "is", "lambda", "None",
        "nonlocal", "not", "or", "pass", "raise", "return", "True", "try", "while", "with", "yield",
    ],
    line_comments: &["#"],
    quotes: &['"', '\''],
};

static JS: Lang = Lang {
    keywords: &[
        "async",
        "await",
        "break",
        "case",
        "catch",
        "class",
        "const",
        "continue",
        "default",
        "delete",
        "do",
        "else",
        "export",
        "extends",
        "false",
        "finally",
        "for",
        "from",
        "function",
        "if",
        "import",
        "in",
        "instanceof",
        "interface",
        "let",
        "new",
        "null",
        "return",
        "switch",
        "this",
        "throw",
        "true",
        "try",
        "type",
        "typeof",
        "undefined",
        "var",
        "void",
        "while",
        "yield",
    ],
    line_comments: &["//"],
    quotes: &['"', '\'', '`'],
};

static C: Lang = Lang {
    keywords: &[
        "auto",
        "bool",
        "break",
        "case",
        "char",
        "class",
        "const",
        "continue",
        "default",
        "delete",
        "do",
        "double",
        "else",
        "enum",
        "extern",
        "false",
        "float",
        "for",
        "goto",
        "if",
        "include",
        "inline",
        "int",
        "long",
        "namespace",
        "new",
        "nullptr",
        "private",
        "public",
        "return",
        "short",
        "signed",
        "sizeof",
        "static",
        "struct",
        "switch",
        "template",
        "true",
        "typedef",
        "union",
        "unsigned",
        "void",
        "volatile",
        "while",
    ],
    line_comments: &["//"],
    quotes: &['"', '\''],
};

static GO: Lang = Lang {
    keywords: &[
        "break",
        "case",
        "chan",
        "const",
        "continue",
        "default",
        "defer",
        "else",
        "false",
        "for",
        "func",
        "go",
        "goto",
        "if",
        "import",
        "interface",
        "map",
        "nil",
        "package",
        "range",
        "return",
        "select",
        "struct",
        "switch",
        "true",
        "type",
        "var",
    ],
    line_comments: &["//"],
    quotes: &['"', '`'],
};

static SHELL: Lang = Lang {
    keywords: &[
        "case", "do", "done", "elif", "else", "esac", "exit", "export", "fi", "for", "function", "if", "in",
        "local", "return", "set", "then", "until", "while",
    ],
    line_comments: &["#"],
    quotes: &['"', '\''],
};

static JAVA: Lang = Lang {
    keywords: &[
        "abstract",
        "boolean",
        "break",
        "case",
        "catch",
        "class",
        "continue",
        "default",
        "do",
        "else",
        "enum",
        "extends",
        "false",
        "final",
        "finally",
        "for",
        "if",
        "implements",
        "import",
        "instanceof",
        "int",
        "interface",
        "new",
        "null",
        "package",
        "private",
        "protected",
        "public",
        "return",
        "static",
        "super",
        "switch",
        "this",
        "throw",
        "throws",
        "true",
        "try",
        "void",
        "while",
    ],
    line_comments: &["//"],
    quotes: &['"', '\''],
};

static RUBY: Lang = Lang {
    keywords: &[
        "begin", "class", "def", "do", "else", "elsif", "end", "ensure", "false", "if", "module", "nil",
        "require", "rescue", "return", "self", "then", "true", "unless", "until", "when", "while", "yield",
    ],
    line_comments: &["#"],
    quotes: &['"', '\''],
};

/// TOML, YAML, INI and similar: comments, strings, numbers and booleans.
static CONFIG: Lang = Lang {
    keywords: &["true", "false", "yes", "no", "null", "on", "off"],
    line_comments: &["#", ";"],
    quotes: &['"', '\''],
};

static JSON: Lang = Lang { keywords: &["true", "false", "null"], line_comments: &[], quotes: &['"'] };

/// The language of a file, by its extension (or its whole name for a few
/// files that have none).
pub(crate) fn language(path: &str) -> Option<&'static Lang> {
    let name = path.rsplit('/').next().unwrap_or(path);
    if matches!(name, "Makefile" | "Dockerfile" | ".bashrc" | ".profile" | ".zshrc") {
        return Some(&SHELL);
    }
    let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "rs" => &RUST,
        "py" | "pyi" => &PYTHON,
        "js" | "mjs" | "cjs" | "jsx" | "ts" | "tsx" => &JS,
        "c" | "h" | "cc" | "cpp" | "cxx" | "hpp" | "hh" => &C,
        "go" => &GO,
        "sh" | "bash" | "zsh" => &SHELL,
        "java" | "kt" | "scala" => &JAVA,
        "rb" => &RUBY,
        "toml" | "yaml" | "yml" | "ini" | "cfg" | "conf" => &CONFIG,
        "json" => &JSON,
        _ => return None,
    })
}

/// Cuts one line of code into coloured pieces.
pub(crate) fn tokens<'a>(lang: &Lang, line: &'a str) -> Vec<(Token, &'a str)> {
    let mut spans: Vec<(Token, usize, usize)> = Vec::new();
    let mut push = |token: Token, start: usize, end: usize| match spans.last_mut() {
        // Runs of plain text stay one piece.
        Some(last) if last.0 == Token::Plain && token == Token::Plain => last.2 = end,
        _ if start < end => spans.push((token, start, end)),
        _ => {}
    };
    let mut i = 0;
    while i < line.len() {
        let rest = &line[i..];
        if lang.line_comments.iter().any(|c| rest.starts_with(c)) {
            push(Token::Comment, i, line.len());
            break;
        }
        let Some(c) = rest.chars().next() else { break };
        let (token, len) = if lang.quotes.contains(&c) {
            (Token::String, string_end(rest, c))
        } else if c.is_ascii_digit() {
            let len = rest
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '.' || ch == '_'))
                .unwrap_or(rest.len());
            (Token::Number, len)
        } else if c.is_alphabetic() || c == '_' {
            let len = rest.find(|ch: char| !(ch.is_alphanumeric() || ch == '_')).unwrap_or(rest.len());
            (if lang.keywords.contains(&&rest[..len]) { Token::Keyword } else { Token::Plain }, len)
        } else {
            (Token::Plain, c.len_utf8())
        };
        push(token, i, i + len);
        i += len;
    }
    spans.into_iter().map(|(token, start, end)| (token, &line[start..end])).collect()
}

/// Where a string opened by `quote` at the start of `s` ends (past its
/// closing quote, or the end of the line).
fn string_end(s: &str, quote: char) -> usize {
    let mut escaped = false;
    for (at, c) in s.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            _ if c == quote => return at + c.len_utf8(),
            _ => {}
        }
    }
    s.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes(lang: &Lang, line: &str) -> Vec<String> {
        tokens(lang, line).iter().map(|(t, text)| format!("{}:{text}", t.class().unwrap_or("-"))).collect()
    }

    #[test]
    fn languages_by_extension() {
        assert!(language("src/main.rs").is_some_and(|l| std::ptr::eq(l, &RUST)));
        assert!(language("a/B.PY").is_some_and(|l| std::ptr::eq(l, &PYTHON)));
        assert!(language("Makefile").is_some_and(|l| std::ptr::eq(l, &SHELL)));
        assert!(language("notes.txt").is_none());
        assert!(language("noext").is_none());
    }

    #[test]
    fn code_is_cut_into_keywords_strings_comments_and_numbers() {
        assert_eq!(
            classes(&RUST, r#"let s = "a\"b"; // note"#),
            ["k:let", "-: s = ", r#"s:"a\"b""#, "-:; ", "c:// note"]
        );
        assert_eq!(
            classes(&PYTHON, "if x == 0x1F: return 'y'"),
            ["k:if", "-: x == ", "n:0x1F", "-:: ", "k:return", "-: ", "s:'y'"]
        );
        // An unterminated string runs to the end of the line; a keyword
        // inside a word is not one.
        assert_eq!(classes(&SHELL, "echo \"unclosed if"), ["-:echo ", "s:\"unclosed if"]);
        assert_eq!(classes(&RUST, "format_fn()"), ["-:format_fn()"]);
        assert_eq!(classes(&RUST, "</script>"), ["-:</script>"]);
    }

    #[test]
    fn diff_lines_are_classed() {
        let text = "diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n a\n-b\n+c\n\\ No newline at end of file\n";
        let kinds: Vec<LineKind> = classify(text).iter().map(|(k, _, _)| *k).collect();
        use LineKind::*;
        assert_eq!(kinds, [Header, Header, Header, Hunk, Context, Removed, Added, Header]);
        assert_eq!(classify("@@ -0,0 +1 @@\n+fn x\n")[1], (Added, "+", "fn x"));
    }
}
