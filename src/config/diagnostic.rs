//! Errors that point into the experiment file: `file:line:col: message`, then a `help:` line with
//! the fix. Locations come from a spanned parse of the same source text.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// One problem in an experiment file.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub col: Option<usize>,
    pub message: String,
    pub help: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(line), Some(col)) = (self.line, self.col) {
            write!(f, ":{line}:{col}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// All problems found in one file, shown together so a user fixes them in one pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// The source text with a spanned parse, to turn key paths into line:column.
pub struct SourceMap<'s> {
    file: PathBuf,
    text: &'s str,
    root: Option<Spanned<DeTable<'s>>>,
}

impl<'s> SourceMap<'s> {
    pub fn new(file: &Path, text: &'s str) -> Self {
        SourceMap {
            file: file.to_path_buf(),
            text,
            root: DeTable::parse(text).ok(),
        }
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }

    /// Span of the key at `path` (or of the deepest existing ancestor).
    pub fn key_span(&self, path: &[&str]) -> Option<Range<usize>> {
        let root = self.root.as_ref()?;
        let mut table = root.get_ref();
        let mut found = None;
        for (depth, part) in path.iter().enumerate() {
            let (key, value) = table.iter().find(|(k, _)| k.get_ref().as_ref() == *part)?;
            found = Some(key.span());
            if depth + 1 < path.len() {
                match value.get_ref() {
                    DeValue::Table(t) => table = t,
                    _ => break,
                }
            }
        }
        found
    }

    /// Span of the value at `path`, for errors about a value rather than a key.
    pub fn value_span(&self, path: &[&str]) -> Option<Range<usize>> {
        let root = self.root.as_ref()?;
        let mut table = root.get_ref();
        for (depth, part) in path.iter().enumerate() {
            let (_, value) = table.iter().find(|(k, _)| k.get_ref().as_ref() == *part)?;
            if depth + 1 == path.len() {
                return Some(value.span());
            }
            match value.get_ref() {
                DeValue::Table(t) => table = t,
                _ => return Some(value.span()),
            }
        }
        None
    }

    pub fn at_key(&self, path: &[&str], message: impl Into<String>) -> Diagnostic {
        self.diagnostic(self.key_span(path), message)
    }

    pub fn at_value(&self, path: &[&str], message: impl Into<String>) -> Diagnostic {
        let span = self.value_span(path).or_else(|| self.key_span(path));
        self.diagnostic(span, message)
    }

    pub fn at_span(&self, span: Option<Range<usize>>, message: impl Into<String>) -> Diagnostic {
        self.diagnostic(span, message)
    }

    fn diagnostic(&self, span: Option<Range<usize>>, message: impl Into<String>) -> Diagnostic {
        let (line, col) = match span {
            Some(s) => {
                let (l, c) = self.line_col(s.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        Diagnostic {
            file: self.file.clone(),
            line,
            col,
            message: message.into(),
            help: None,
        }
    }
}

impl Diagnostic {
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// The closest candidate by edit distance, if it is close enough to be a plausible typo.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// A help line: "did you mean `x`?" when a close key exists, else the list of valid keys.
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> String {
    match closest(word, candidates.iter().copied()) {
        Some(c) => format!("did you mean `{c}`?"),
        None => {
            let list: Vec<String> = candidates.iter().map(|c| format!("`{c}`")).collect();
            format!("valid keys here: {}", list.join(", "))
        }
    }
}
