//! Config errors that name the file, line and column, and show the offending line.

use std::fmt;
use std::ops::Range;

/// One thing wrong with a config, located by a byte span in its source.
#[derive(Debug, Clone)]
pub struct Problem {
    pub message: String,
    pub span: Option<Range<usize>>,
}

/// Every problem found in one config file, ready to print.
#[derive(Debug)]
pub struct ConfigError {
    file: String,
    source: String,
    problems: Vec<Problem>,
}

impl ConfigError {
    pub fn new(file: &str, source: &str, problems: Vec<Problem>) -> Self {
        ConfigError {
            file: file.to_string(),
            source: source.to_string(),
            problems,
        }
    }

    /// A problem with no source text behind it (the file could not be read, say).
    pub fn plain(file: &str, message: String) -> Self {
        ConfigError::new(
            file,
            "",
            vec![Problem {
                message,
                span: None,
            }],
        )
    }

    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// 1-based line and column of a byte offset into the source.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.source.len());
        let before = &self.source[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = self.source[line_start..offset].chars().count() + 1;
        (line, col)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            self.write_problem(f, problem, "error")?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// Each of `warnings`, located and shown like an error.
    pub fn warnings(file: &str, source: &str, warnings: Vec<Problem>) -> Vec<String> {
        let located = ConfigError::new(file, source, Vec::new());
        warnings
            .iter()
            .map(|w| {
                let mut text = String::new();
                let _ = located.write_problem(&mut text, w, "warning");
                text
            })
            .collect()
    }

    fn write_problem(
        &self,
        f: &mut impl fmt::Write,
        problem: &Problem,
        label: &str,
    ) -> fmt::Result {
        let Some(span) = &problem.span else {
            return write!(f, "{}: {label}: {}", self.file, problem.message);
        };
        let (line, col) = self.line_col(span.start);
        writeln!(
            f,
            "{}:{}:{}: {label}: {}",
            self.file, line, col, problem.message
        )?;
        let text = self.source.lines().nth(line - 1).unwrap_or("");
        let width = self.source[span.clone()]
            .lines()
            .next()
            .map_or(1, |s| s.chars().count().max(1));
        let width = width.min(text.chars().count().saturating_sub(col - 1).max(1));
        writeln!(f, "{line:>5} | {text}")?;
        write!(f, "      | {}{}", " ".repeat(col - 1), "^".repeat(width))
    }
}

impl std::error::Error for ConfigError {}
