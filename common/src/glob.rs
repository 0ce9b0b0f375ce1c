//! Anchored glob patterns for policies.
//!
//! `*` matches any run of characters (including none), `?` exactly one character, `\`
//! makes the next character literal; everything else matches itself, case-sensitively.
//! A pattern always matches the whole name, never a part of it. Matching runs in
//! O(pattern × name) time with no backtracking blow-up.

/// Longest pattern accepted.
pub const MAX_PATTERN_LEN: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Star,
    Any,
    Char(char),
}

fn tokenize(pattern: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::with_capacity(pattern.len());
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        tokens.push(match c {
            '*' => {
                if tokens.last() == Some(&Token::Star) {
                    continue;
                }
                Token::Star
            }
            '?' => Token::Any,
            '\\' => Token::Char(chars.next().ok_or_else(|| "pattern ends with a lone '\\'".to_string())?),
            c if c.is_control() => return Err("pattern contains a control character".into()),
            c => Token::Char(c),
        });
    }
    Ok(tokens)
}

/// Checks that `pattern` is a valid policy pattern.
pub fn validate(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() || pattern.len() > MAX_PATTERN_LEN {
        return Err(format!("pattern must be 1 to {MAX_PATTERN_LEN} bytes"));
    }
    tokenize(pattern).map(|_| ())
}

/// A compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    tokens: Vec<Token>,
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Self, String> {
        validate(pattern)?;
        Ok(Glob { tokens: tokenize(pattern)? })
    }

    /// True when the whole of `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        // Classic two-pointer wildcard match: remember the last star and retry from there.
        let (mut p, mut n) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while n < name.len() {
            match self.tokens.get(p) {
                Some(Token::Any) => {
                    p += 1;
                    n += 1;
                }
                Some(Token::Char(c)) if *c == name[n] => {
                    p += 1;
                    n += 1;
                }
                Some(Token::Star) => {
                    star = Some((p, n));
                    p += 1;
                }
                _ => match star {
                    Some((sp, sn)) => {
                        p = sp + 1;
                        n = sn + 1;
                        star = Some((sp, sn + 1));
                    }
                    None => return false,
                },
            }
        }
        self.tokens[p..].iter().all(|t| *t == Token::Star)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, n: &str) -> bool {
        Glob::new(p).unwrap().matches(n)
    }

    #[test]
    fn anchored() {
        assert!(m("read_*", "read_file"));
        assert!(!m("read_*", "xread_file"));
        assert!(!m("read", "read_file"));
        assert!(m("*file", "read_file"));
        assert!(!m("*file", "read_files"));
        assert!(m("*", ""));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
        assert!(m("a*b*c", "aXbYbZc"));
        assert!(!m("a*b*c", "aXbYbZ"));
        assert!(m(r"a\*", "a*"));
        assert!(!m(r"a\*", "ab"));
        assert!(!m("Read_*", "read_file"));
        assert!(m("é?", "éa"));
    }

    #[test]
    fn invalid() {
        assert!(validate("").is_err());
        assert!(validate("a\\").is_err());
        assert!(validate("a\nb").is_err());
        assert!(validate(&"a".repeat(257)).is_err());
    }

    #[test]
    fn no_catastrophic_backtracking() {
        let pattern = "*a".repeat(100) + "b";
        let name = "a".repeat(5000);
        assert!(!m(&pattern[..MAX_PATTERN_LEN.min(pattern.len())], &name));
    }
}
