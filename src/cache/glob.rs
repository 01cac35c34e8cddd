//! Redis-style glob patterns (`*`, `?`, `[abc]`, `[^a-z]`, `\` escapes) parsed once and
//! translated to SQL: a byte-order range on the key for the literal prefix, plus an anchored
//! PostgreSQL regular expression for the rest. The pattern only ever travels as a parameter.

use crate::error::{RepoError, Result};

/// The longest pattern accepted, in characters: room for a 512-character key with every
/// character escaped or spelled as a class, and a bound on the regex the server compiles.
pub(crate) const MAX_PATTERN_CHARS: usize = 4096;

/// One element of a parsed pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Token {
    /// A character that matches itself.
    Literal(char),
    /// `?`: exactly one character.
    AnyChar,
    /// `*`: any run of characters, the empty one included.
    AnyRun,
    /// `[...]` or `[^...]`: one character in (or, negated, not in) the listed ranges.
    Class {
        /// `[^...]`
        negated: bool,
        /// Inclusive ranges, `lo <= hi` (a single character is `c..=c`).
        ranges: Vec<(char, char)>,
    },
}

/// A parsed glob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Glob {
    tokens: Vec<Token>,
}

/// How a glob becomes a WHERE clause over `cache_key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SqlFilter {
    /// The pattern has no wildcard: `cache_key = $1`.
    Exact(String),
    /// `cache_key >= lower [AND cache_key < upper] [AND cache_key ~ regex]`: the range serves
    /// the literal prefix from the primary-key index (byte order, `COLLATE "C"`), the regex
    /// (anchored, over the whole key) checks the rest. No regex when the rest is a lone `*`.
    Range {
        /// The literal prefix (non-empty).
        lower: String,
        /// The smallest string above every string that starts with the prefix, if any.
        upper: Option<String>,
        /// The anchored regex, unless the prefix alone decides.
        regex: Option<String>,
    },
    /// No literal prefix: `cache_key ~ regex` over the whole table.
    Regex(String),
}

impl Glob {
    /// Parses a Redis glob. Malformed patterns (empty, an unclosed `[`, `[]`, `[^]`, a
    /// trailing `\`, longer than [`MAX_PATTERN_CHARS`], a NUL) are `InvalidInput`.
    pub(crate) fn parse(pattern: &str) -> Result<Glob> {
        if pattern.is_empty() {
            return Err(malformed(pattern, "it is empty"));
        }
        if pattern.contains('\0') {
            return Err(malformed(pattern, "it contains a NUL byte"));
        }
        if pattern.chars().count() > MAX_PATTERN_CHARS {
            return Err(RepoError::invalid(format!(
                "glob pattern is longer than {MAX_PATTERN_CHARS} characters"
            )));
        }
        let chars: Vec<char> = pattern.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            match chars[i] {
                '*' => {
                    // `**` is `*`: keep the regex small.
                    if tokens.last() != Some(&Token::AnyRun) {
                        tokens.push(Token::AnyRun);
                    }
                    i += 1;
                }
                '?' => {
                    tokens.push(Token::AnyChar);
                    i += 1;
                }
                '\\' => {
                    let c = *chars
                        .get(i + 1)
                        .ok_or_else(|| malformed(pattern, "it ends with a lone '\\'"))?;
                    tokens.push(Token::Literal(c));
                    i += 2;
                }
                '[' => {
                    let (token, next) = parse_class(pattern, &chars, i + 1)?;
                    tokens.push(token);
                    i = next;
                }
                c => {
                    tokens.push(Token::Literal(c));
                    i += 1;
                }
            }
        }
        Ok(Glob { tokens })
    }

    /// The leading run of literal characters.
    pub(crate) fn literal_prefix(&self) -> String {
        self.tokens
            .iter()
            .map_while(|t| match t {
                Token::Literal(c) => Some(*c),
                _ => None,
            })
            .collect()
    }

    /// The WHERE clause shape for this glob (see [`SqlFilter`]).
    pub(crate) fn to_sql_filter(&self) -> SqlFilter {
        let prefix = self.literal_prefix();
        let prefix_len = prefix.chars().count();
        if prefix_len == self.tokens.len() {
            return SqlFilter::Exact(prefix);
        }
        if prefix.is_empty() {
            return SqlFilter::Regex(self.to_regex());
        }
        let rest_is_any_run = self.tokens[prefix_len..] == [Token::AnyRun];
        SqlFilter::Range {
            upper: prefix_upper_bound(&prefix),
            lower: prefix,
            regex: (!rest_is_any_run).then(|| self.to_regex()),
        }
    }

    /// An anchored PostgreSQL ARE equivalent to the whole glob. Every character that is not
    /// an ASCII letter or digit is written as a `\Uxxxxxxxx` escape, so nothing in the key
    /// space is ever special to the regex engine, inside brackets or out.
    pub(crate) fn to_regex(&self) -> String {
        let mut re = String::from("^");
        for token in &self.tokens {
            match token {
                Token::Literal(c) => push_regex_char(&mut re, *c),
                Token::AnyChar => re.push('.'),
                Token::AnyRun => re.push_str(".*"),
                Token::Class { negated, ranges } => {
                    re.push('[');
                    if *negated {
                        re.push('^');
                    }
                    for &(lo, hi) in ranges {
                        push_regex_char(&mut re, lo);
                        if hi != lo {
                            re.push('-');
                            push_regex_char(&mut re, hi);
                        }
                    }
                    re.push(']');
                }
            }
        }
        re.push('$');
        re
    }
}

/// Parses the inside of a class starting just after `[`; returns the token and the index
/// after the closing `]`. A `-` between two items is a range (reversed ranges are swapped, as
/// in Redis); a `-` first or last is literal; `\` escapes the next character; `]` closes, so
/// a literal `]` must be escaped.
fn parse_class(pattern: &str, chars: &[char], start: usize) -> Result<(Token, usize)> {
    let mut i = start;
    let negated = chars.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    loop {
        let c = match chars.get(i) {
            None => return Err(malformed(pattern, "a '[' is never closed")),
            Some(']') => {
                if ranges.is_empty() {
                    return Err(malformed(pattern, "it has an empty class ([] or [^])"));
                }
                return Ok((Token::Class { negated, ranges }, i + 1));
            }
            Some(_) => class_char(pattern, chars, &mut i)?,
        };
        let is_range = chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&n| n != ']');
        if is_range {
            i += 1;
            let end = class_char(pattern, chars, &mut i)?;
            ranges.push((c.min(end), c.max(end)));
        } else {
            ranges.push((c, c));
        }
    }
}

/// One (possibly escaped) character inside a class; advances `i` past it.
fn class_char(pattern: &str, chars: &[char], i: &mut usize) -> Result<char> {
    match chars.get(*i) {
        Some('\\') => {
            let c = *chars
                .get(*i + 1)
                .ok_or_else(|| malformed(pattern, "it ends with a lone '\\'"))?;
            *i += 2;
            Ok(c)
        }
        Some(&c) => {
            *i += 1;
            Ok(c)
        }
        None => Err(malformed(pattern, "a '[' is never closed")),
    }
}

fn push_regex_char(re: &mut String, c: char) {
    if c.is_ascii_alphanumeric() {
        re.push(c);
    } else {
        re.push_str(&format!("\\U{:08X}", c as u32));
    }
}

/// The smallest string greater (in byte order, i.e. code point order for UTF-8) than every
/// string that starts with `prefix`: the prefix with its last incrementable character
/// incremented and the rest cut. `None` when every character is U+10FFFF.
pub(crate) fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        if let Some(next) = next_char(last) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// The next Unicode scalar value, skipping the surrogate gap. U+0000 is never produced, as
/// keys cannot hold NUL.
fn next_char(c: char) -> Option<char> {
    match c as u32 {
        0xD7FF => Some('\u{E000}'),
        n => char::from_u32(n + 1),
    }
}

fn malformed(pattern: &str, why: &str) -> RepoError {
    RepoError::invalid(format!("malformed glob pattern {pattern:?}: {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regex(p: &str) -> String {
        Glob::parse(p).unwrap().to_regex()
    }

    #[test]
    fn malformed_patterns_are_rejected() {
        for bad in ["", "[", "a[bc", "[]", "[^]", "a\\", "[a\\", "[\\", "x\0"] {
            assert!(Glob::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sql_wildcards_are_literals() {
        assert_eq!(
            Glob::parse("a%_b").unwrap().to_sql_filter(),
            SqlFilter::Exact("a%_b".into())
        );
        assert_eq!(regex("%?"), "^\\U00000025.$");
    }

    #[test]
    fn literal_prefix_becomes_a_range() {
        assert_eq!(
            Glob::parse("user1_*").unwrap().to_sql_filter(),
            SqlFilter::Range {
                lower: "user1_".into(),
                upper: Some("user1`".into()),
                regex: None
            }
        );
        match Glob::parse("u\\*x?").unwrap().to_sql_filter() {
            SqlFilter::Range { lower, regex, .. } => {
                assert_eq!(lower, "u*x");
                assert!(regex.is_some());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Glob::parse("*x").unwrap().to_sql_filter(),
            SqlFilter::Regex(_)
        ));
    }

    #[test]
    fn classes_parse_ranges_negation_and_escapes() {
        let g = Glob::parse("[^z-a\\]-]").unwrap();
        assert_eq!(
            g.tokens,
            vec![Token::Class {
                negated: true,
                ranges: vec![('a', 'z'), (']', ']'), ('-', '-')]
            }]
        );
        assert_eq!(
            Glob::parse("[-a]").unwrap().tokens,
            vec![Token::Class {
                negated: false,
                ranges: vec![('-', '-'), ('a', 'a')]
            }]
        );
    }

    #[test]
    fn upper_bounds_follow_code_point_order() {
        assert_eq!(prefix_upper_bound("ab").as_deref(), Some("ac"));
        assert_eq!(
            prefix_upper_bound("a\u{D7FF}").as_deref(),
            Some("a\u{E000}")
        );
        assert_eq!(prefix_upper_bound("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_upper_bound("\u{10FFFF}"), None);
    }
}
