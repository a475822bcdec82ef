//! Config errors: each names the file, line, column, key and reason; a failed load
//! carries every error found, not just the first.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line (0 when the problem has no position, e.g. the file is unreadable).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted key path, e.g. `component[2].restart.max_backoff` (empty for the whole file).
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = if self.key.is_empty() {
            "(file)"
        } else {
            &self.key
        };
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.column,
            key,
            self.reason
        )
    }
}

/// Every problem found while loading one config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// Collects errors against one source text, turning byte spans into lines. Shared by
/// the agent's and the collector's config, so both report alike.
#[derive(Debug)]
pub struct Collector<'a> {
    file: &'a Path,
    text: &'a str,
    pub(crate) errors: Vec<ConfigError>,
}

impl<'a> Collector<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        Collector {
            file,
            text,
            errors: Vec::new(),
        }
    }

    /// Records an error at `span` (None: start of the file).
    pub fn push(
        &mut self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        reason: impl Into<String>,
    ) {
        let (line, column) = match span {
            Some(span) => line_column(self.text, span.start),
            None => (1, 1),
        };
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            key: key.into(),
            reason: reason.into(),
        });
    }

    /// Whether no error was recorded.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// `value` when no error was recorded (and there is a value), else every error in
    /// file order.
    pub fn finish<T>(self, value: Option<T>) -> Result<T, ConfigErrors> {
        match value {
            Some(value) if self.errors.is_empty() => Ok(value),
            _ => {
                let mut errors = self.errors;
                errors.sort_by_key(|e| (e.line, e.column));
                Err(ConfigErrors(errors))
            }
        }
    }
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::line_column;

    #[test]
    fn lines_and_columns() {
        let text = "a = 1\nbb = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, 8), (2, 3));
        assert_eq!(line_column(text, 999), (3, 1));
    }
}
