//! Bug injection: named mutation operators applied to the function bodies of real code.
//!
//! Sites are found on the code with comments, literals and directives blanked
//! ([`cxxlm_eval::functions::code_only`]), inside function bodies, never in the checks
//! of a test (`assert`, `static_assert`, `EXPECT_*`) nor in its printing. Every edit
//! stays on its line, so a mutant's line numbers are the original's.
//!
//! Each site has two spellings: the mutant (the buggy file a task shows) and, for most
//! operators, a schema edit that keeps the original and the mutant side by side behind
//! `cxxlm_mutant_on_(K)`, so that one build of a program runs every mutant in turn
//! (mutant schemata, Untch et al. 1993) instead of one g++ run per mutant.

use cxxlm_eval::functions::{code_only, function_bodies};
use serde::{Deserialize, Serialize};

/// What the schema header defines: true in the run whose `CXXLM_MUTANT` is `k`.
pub const SCHEMA_SWITCH: &str = "cxxlm_mutant_on_";

/// The header forced into schema builds (`-include`).
pub const SCHEMA_HEADER: &str = "#include <cstdlib>\n\
static inline bool cxxlm_mutant_on_(int k) noexcept {\n\
  static const int active = [] { const char* s = std::getenv(\"CXXLM_MUTANT\"); return s ? std::atoi(s) : 0; }();\n\
  return active == k;\n\
}\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operator {
    /// `<` and `<=`, `>` and `>=` swapped in a condition or returned comparison.
    OffByOne,
    /// `a[i]` read as `a[i + 1]`.
    OffByOneIndex,
    /// `==` and `!=`, `<` and `>`, `<=` and `>=` swapped.
    FlipComparison,
    /// `&&` and `||` swapped.
    FlipLogical,
    /// A guard against a null pointer removed.
    RemoveNullCheck,
    /// A guard on a size, index or range removed.
    RemoveBoundsCheck,
    /// `delete p;` moved before an earlier statement that uses `p`.
    UseAfterFree,
    /// `delete p;` done twice.
    DoubleFree,
    /// The initializer of a local of arithmetic type removed.
    UninitializedVariable,
    /// A 64-bit signed local declared `int`, or a widening cast removed.
    SignedOverflow,
    /// The two arguments of a call swapped.
    SwapArguments,
    /// A `return value;` deleted.
    MissingReturn,
    /// A `break;` of a `switch` case deleted.
    MissingBreak,
    /// An assignment, increment or call statement deleted.
    DeleteStatement,
}

impl Operator {
    pub const ALL: [Operator; 14] = [
        Operator::OffByOne,
        Operator::OffByOneIndex,
        Operator::FlipComparison,
        Operator::FlipLogical,
        Operator::RemoveNullCheck,
        Operator::RemoveBoundsCheck,
        Operator::UseAfterFree,
        Operator::DoubleFree,
        Operator::UninitializedVariable,
        Operator::SignedOverflow,
        Operator::SwapArguments,
        Operator::MissingReturn,
        Operator::MissingBreak,
        Operator::DeleteStatement,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operator::OffByOne => "off_by_one",
            Operator::OffByOneIndex => "off_by_one_index",
            Operator::FlipComparison => "flip_comparison",
            Operator::FlipLogical => "flip_logical",
            Operator::RemoveNullCheck => "remove_null_check",
            Operator::RemoveBoundsCheck => "remove_bounds_check",
            Operator::UseAfterFree => "use_after_free",
            Operator::DoubleFree => "double_free",
            Operator::UninitializedVariable => "uninitialized_variable",
            Operator::SignedOverflow => "signed_overflow",
            Operator::SwapArguments => "swap_arguments",
            Operator::MissingReturn => "missing_return",
            Operator::MissingBreak => "missing_break",
            Operator::DeleteStatement => "delete_statement",
        }
    }

    pub fn from_name(name: &str) -> Option<Operator> {
        Operator::ALL.into_iter().find(|o| o.name() == name)
    }
}

/// One replacement of `start..end` of the original text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub start: usize,
    pub end: usize,
    /// The text of the mutant.
    pub mutant: String,
    /// The text of the schema build (`None`: this site needs a build of its own).
    pub schema: Option<String>,
}

/// A place where an operator applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub operator: Operator,
    /// 1-based line of the (first) edit.
    pub line: usize,
    pub edits: Vec<Edit>,
    /// What the mutation did, in words (`` `i < n` became `i <= n` ``).
    pub change: String,
}

impl Site {
    pub fn schema_ready(&self) -> bool {
        self.edits.iter().all(|e| e.schema.is_some())
    }

    /// Whether an edit of one touches an edit of the other (they cannot be applied
    /// together).
    pub fn overlaps(&self, other: &Site) -> bool {
        self.edits.iter().any(|a| {
            other
                .edits
                .iter()
                .any(|b| (a.start < b.end && b.start < a.end) || a.start == b.start)
        })
    }

    fn span(&self) -> (usize, usize) {
        let start = self.edits.iter().map(|e| e.start).min().unwrap_or(0);
        let end = self.edits.iter().map(|e| e.end).max().unwrap_or(0);
        (start, end)
    }
}

/// `text` with `edits` (non-overlapping, any order) applied.
pub fn apply(text: &str, edits: &[(usize, usize, &str)]) -> String {
    let mut sorted: Vec<&(usize, usize, &str)> = edits.iter().collect();
    sorted.sort_by_key(|e| (e.0, e.1));
    let mut out = String::with_capacity(text.len() + 64);
    let mut at = 0;
    for &&(start, end, with) in &sorted {
        out.push_str(&text[at..start]);
        out.push_str(with);
        at = end;
    }
    out.push_str(&text[at..]);
    out
}

/// The mutant of `text` at `site`.
pub fn mutant(text: &str, site: &Site) -> String {
    let edits: Vec<(usize, usize, &str)> = site
        .edits
        .iter()
        .map(|e| (e.start, e.end, e.mutant.as_str()))
        .collect();
    apply(text, &edits)
}

/// The schema of `text` with `sites` numbered from 1 in order (they must not overlap
/// and must all be schema-ready), and where each site's edits landed in it.
pub fn schema(text: &str, sites: &[&Site]) -> (String, Vec<Vec<(usize, usize)>>) {
    let mut edits: Vec<(usize, usize, String, usize)> = Vec::new();
    for (k, site) in sites.iter().enumerate() {
        for e in &site.edits {
            let with = e
                .schema
                .as_deref()
                .unwrap_or(&e.mutant)
                .replace("{K}", &(k + 1).to_string());
            edits.push((e.start, e.end, with, k));
        }
    }
    edits.sort_by_key(|e| (e.0, e.1));
    let mut out = String::with_capacity(text.len() + 64 * edits.len());
    let mut ranges = vec![Vec::new(); sites.len()];
    let mut at = 0;
    for (start, end, with, k) in &edits {
        out.push_str(&text[at..*start]);
        ranges[*k].push((out.len(), out.len() + with.len()));
        out.push_str(with);
        at = *end;
    }
    out.push_str(&text[at..]);
    (out, ranges)
}

/// Sites whose spans do not overlap, picked round-robin over operators so that every
/// operator is represented, at most `per_operator` each and `total` in all; the order
/// within an operator is spread over the file by a fixed stride.
pub fn choose(sites: &[Site], per_operator: usize, total: usize) -> Vec<&Site> {
    let mut by_op: Vec<Vec<&Site>> = Operator::ALL
        .iter()
        .map(|op| sites.iter().filter(|s| s.operator == *op).collect())
        .collect();
    for list in &mut by_op {
        // Spread: every other site first, so picks are not all from the file's top.
        let n = list.len();
        if n > 2 {
            let mut spread: Vec<&Site> = Vec::with_capacity(n);
            let stride = (n / per_operator.max(1)).max(1);
            for offset in 0..stride {
                spread.extend(list.iter().skip(offset).step_by(stride).copied());
            }
            *list = spread;
        }
    }
    let mut chosen: Vec<&Site> = Vec::new();
    let mut taken = vec![0usize; by_op.len()];
    let mut cursor = vec![0usize; by_op.len()];
    loop {
        let mut progressed = false;
        for (i, list) in by_op.iter().enumerate() {
            if chosen.len() >= total {
                break;
            }
            while taken[i] < per_operator && cursor[i] < list.len() {
                let candidate = list[cursor[i]];
                cursor[i] += 1;
                if chosen.iter().all(|c| !c.overlaps(candidate)) {
                    chosen.push(candidate);
                    taken[i] += 1;
                    progressed = true;
                    break;
                }
            }
        }
        if !progressed || chosen.len() >= total {
            break;
        }
    }
    chosen.sort_by_key(|s| s.span());
    chosen
}

/// Words a check or a print starts with: their lines are the test's oracle, not code
/// under test.
const ORACLE_WORDS: [&str; 14] = [
    "assert",
    "static_assert",
    "ASSERT",
    "EXPECT",
    "CHECK",
    "REQUIRE",
    "printf",
    "fprintf",
    "puts",
    "cout",
    "cerr",
    "print",
    "BOOST_TEST",
    "LIBCPP_ASSERT",
];

const KEYWORDS: [&str; 24] = [
    "if",
    "else",
    "for",
    "while",
    "do",
    "switch",
    "case",
    "default",
    "return",
    "break",
    "continue",
    "goto",
    "throw",
    "try",
    "catch",
    "sizeof",
    "alignof",
    "decltype",
    "new",
    "delete",
    "typeid",
    "noexcept",
    "static_assert",
    "co_return",
];

const ARITHMETIC_TYPES: [&str; 16] = [
    "int",
    "long",
    "short",
    "unsigned",
    "signed",
    "char",
    "bool",
    "float",
    "double",
    "size_t",
    "std::size_t",
    "int64_t",
    "int32_t",
    "uint32_t",
    "uint64_t",
    "ptrdiff_t",
];

const WIDE_SIGNED: [&str; 7] = [
    "long long",
    "long",
    "int64_t",
    "std::int64_t",
    "ptrdiff_t",
    "std::ptrdiff_t",
    "intmax_t",
];

struct Source<'a> {
    text: &'a str,
    code: Vec<u8>,
    line_starts: Vec<usize>,
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

impl<'a> Source<'a> {
    fn new(text: &'a str) -> Self {
        let code = code_only(text);
        let mut line_starts = vec![0];
        line_starts.extend(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i + 1),
        );
        Source {
            text,
            code,
            line_starts,
        }
    }

    fn line_of(&self, pos: usize) -> usize {
        self.line_starts.partition_point(|&s| s <= pos)
    }

    fn line_span(&self, line: usize) -> (usize, usize) {
        let start = self.line_starts[line - 1];
        let end = self
            .line_starts
            .get(line)
            .map_or(self.text.len(), |s| s - 1);
        (start, end)
    }

    fn code_str(&self, start: usize, end: usize) -> &str {
        std::str::from_utf8(&self.code[start..end]).unwrap_or("")
    }

    fn word_at(&self, i: usize, word: &str) -> bool {
        let w = word.as_bytes();
        self.code.get(i..i + w.len()) == Some(w)
            && (i == 0 || !is_ident_byte(self.code[i - 1]))
            && !self
                .code
                .get(i + w.len())
                .copied()
                .is_some_and(is_ident_byte)
    }

    /// The matching closer of the bracket at `open`, on the same line.
    fn close_of(&self, open: usize) -> Option<usize> {
        let (o, c) = match self.code[open] {
            b'(' => (b'(', b')'),
            b'[' => (b'[', b']'),
            b'{' => (b'{', b'}'),
            _ => return None,
        };
        let mut depth = 0;
        for (i, &b) in self.code.iter().enumerate().skip(open) {
            if b == b'\n' {
                return None;
            }
            if b == o {
                depth += 1;
            } else if b == c {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
        }
        None
    }

    fn next_non_space(&self, mut i: usize) -> Option<usize> {
        while i < self.code.len() && self.code[i].is_ascii_whitespace() {
            i += 1;
        }
        (i < self.code.len()).then_some(i)
    }

    fn prev_non_space(&self, i: usize) -> Option<usize> {
        (0..i).rev().find(|&j| !self.code[j].is_ascii_whitespace())
    }

    /// Whether the line holding `pos` is a check or a print.
    fn on_oracle_line(&self, pos: usize) -> bool {
        let (s, e) = self.line_span(self.line_of(pos));
        let line = self.code_str(s, e);
        ORACLE_WORDS.iter().any(|w| {
            line.match_indices(w).any(|(i, _)| {
                let b = line.as_bytes();
                (i == 0 || !is_ident_byte(b[i - 1]))
                    && (w.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                        || !b.get(i + w.len()).copied().is_some_and(is_ident_byte))
            })
        })
    }

    /// Position of `;` ending the statement that starts at `start`, at depth 0, on the
    /// same line.
    fn statement_end(&self, start: usize) -> Option<usize> {
        let mut depth = 0i32;
        for i in start..self.code.len() {
            match self.code[i] {
                b'\n' => return None,
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => {
                    depth -= 1;
                    if depth < 0 {
                        return None;
                    }
                }
                b';' if depth == 0 => return Some(i),
                _ => {}
            }
        }
        None
    }
}

/// Every site of every operator in the function bodies of `text`.
pub fn sites(text: &str) -> Vec<Site> {
    let src = Source::new(text);
    let bodies = function_bodies(text);
    let mut out = Vec::new();
    for body in &bodies {
        conditions(&src, body.open, body.close, &mut out);
        statements(&src, body.open, body.close, &mut out);
        calls_and_subscripts(&src, body.open, body.close, &mut out);
    }
    out.sort_by_key(|s| (s.span(), s.operator));
    out.dedup_by(|a, b| a.operator == b.operator && a.span() == b.span());
    out
}

fn quote(s: &str) -> String {
    format!("`{}`", s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// A site that replaces the expression `start..end` (on one line) by `mutated`; the
/// schema keeps both behind the switch.
fn expression_site(
    src: &Source,
    operator: Operator,
    start: usize,
    end: usize,
    mutated: String,
) -> Site {
    let original = &src.text[start..end];
    Site {
        operator,
        line: src.line_of(start),
        change: format!("{} became {}", quote(original), quote(&mutated)),
        edits: vec![Edit {
            start,
            end,
            schema: Some(format!(
                "({SCHEMA_SWITCH}({{K}}) ? ({mutated}) : ({original}))"
            )),
            mutant: mutated,
        }],
    }
}

/// Binary operators in `start..end` (comparisons spaced as comparisons are, logical
/// operators), as (position, token).
fn operators_in(src: &Source, start: usize, end: usize) -> Vec<(usize, &'static str)> {
    let c = &src.code;
    let mut found = Vec::new();
    let mut i = start;
    while i + 1 < end {
        let two = &c[i..i + 2];
        let spaced = |len: usize| i > 0 && c[i - 1] == b' ' && c.get(i + len) == Some(&b' ');
        let tok: Option<&'static str> = match two {
            b"==" if c.get(i + 2) != Some(&b'=') => Some("=="),
            b"!=" => Some("!="),
            b"&&" if spaced(2) => Some("&&"),
            b"||" => Some("||"),
            b"<=" if spaced(2) => Some("<="),
            b">=" if spaced(2) => Some(">="),
            _ if c[i] == b'<' && spaced(1) => Some("<"),
            _ if c[i] == b'>' && spaced(1) => Some(">"),
            _ => None,
        };
        match tok {
            Some(t) => {
                found.push((i, t));
                i += t.len();
            }
            None => i += 1,
        }
    }
    found
}

fn swapped(op: Operator, tok: &str) -> Option<&'static str> {
    match (op, tok) {
        (Operator::OffByOne, "<") => Some("<="),
        (Operator::OffByOne, "<=") => Some("<"),
        (Operator::OffByOne, ">") => Some(">="),
        (Operator::OffByOne, ">=") => Some(">"),
        (Operator::FlipComparison, "==") => Some("!="),
        (Operator::FlipComparison, "!=") => Some("=="),
        (Operator::FlipComparison, "<") => Some(">"),
        (Operator::FlipComparison, ">") => Some("<"),
        (Operator::FlipComparison, "<=") => Some(">="),
        (Operator::FlipComparison, ">=") => Some("<="),
        (Operator::FlipLogical, "&&") => Some("||"),
        (Operator::FlipLogical, "||") => Some("&&"),
        _ => None,
    }
}

/// A lone `=` at depth 0 (an assignment or a declaration in a condition).
fn has_assignment(s: &str) -> bool {
    let b = s.as_bytes();
    let mut depth = 0;
    for i in 0..b.len() {
        match b[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b'=' if depth == 0 => {
                let prev = if i > 0 { b[i - 1] } else { b' ' };
                let next = b.get(i + 1).copied().unwrap_or(b' ');
                if !b"=!<>".contains(&prev) && next != b'=' {
                    return true;
                }
            }
            b';' if depth == 0 => return true,
            _ => {}
        }
    }
    false
}

/// Conditions of `if`, `while`, `for` and returned expressions: comparison and logical
/// operators, and guards that can be removed.
fn conditions(src: &Source, open: usize, close: usize, out: &mut Vec<Site>) {
    let mut i = open;
    while i < close {
        let keyword = ["if", "while", "for", "return"]
            .into_iter()
            .find(|k| src.word_at(i, k));
        let Some(keyword) = keyword else {
            i += 1;
            continue;
        };
        let after = i + keyword.len();
        i = after;
        if src.on_oracle_line(after) {
            continue;
        }
        let Some(next) = src.next_non_space(after) else {
            continue;
        };
        // The condition's span, and for `if` the closing parenthesis.
        let (cs, ce, paren_close) = if keyword == "return" {
            let Some(end) = src.statement_end(next) else {
                continue;
            };
            if end == next {
                continue;
            }
            (next, end, None)
        } else {
            if src.code[next] != b'(' {
                continue; // `if constexpr`, `if consteval`
            }
            let Some(pc) = src.close_of(next) else {
                continue;
            };
            if keyword == "for" {
                let inner = src.code_str(next + 1, pc);
                let parts: Vec<usize> = inner
                    .bytes()
                    .enumerate()
                    .filter(|(_, b)| *b == b';')
                    .map(|(j, _)| next + 1 + j)
                    .collect();
                if parts.len() != 2 {
                    continue; // range-for
                }
                let (a, b) = (parts[0] + 1, parts[1]);
                let trimmed_start = src.next_non_space(a).unwrap_or(b).min(b);
                let mut trimmed_end = b;
                while trimmed_end > trimmed_start && src.code[trimmed_end - 1].is_ascii_whitespace()
                {
                    trimmed_end -= 1;
                }
                if trimmed_end <= trimmed_start {
                    continue;
                }
                (trimmed_start, trimmed_end, None)
            } else {
                (next + 1, pc, Some(pc))
            }
        };
        let cond_code = src.code_str(cs, ce);
        if cond_code.trim().is_empty() || has_assignment(cond_code) || cond_code.contains('\n') {
            continue;
        }
        let original = &src.text[cs..ce];
        for (pos, tok) in operators_in(src, cs, ce) {
            for op in [
                Operator::OffByOne,
                Operator::FlipComparison,
                Operator::FlipLogical,
            ] {
                if let Some(with) = swapped(op, tok) {
                    let rel = pos - cs;
                    let mutated = format!(
                        "{}{}{}",
                        &original[..rel],
                        with,
                        &original[rel + tok.len()..]
                    );
                    out.push(expression_site(src, op, cs, ce, mutated));
                }
            }
        }
        if keyword == "if" {
            if let Some(pc) = paren_close {
                guard(src, i - 2, cs, ce, pc, out);
            }
        }
    }
}

/// `if (C) S` with `C` a null or bounds test: the check removed.
fn guard(src: &Source, if_pos: usize, cs: usize, ce: usize, pc: usize, out: &mut Vec<Site>) {
    let cond = src.code_str(cs, ce);
    let operator = if cond.contains("nullptr") || cond.contains("NULL") {
        Operator::RemoveNullCheck
    } else if [
        "size()",
        "length()",
        "empty()",
        "end()",
        "capacity()",
        " < ",
        " >= ",
        " > ",
        " <= ",
    ]
    .iter()
    .any(|p| cond.contains(p))
    {
        Operator::RemoveBoundsCheck
    } else {
        return;
    };
    // `else if`: removing the `if` would leave a dangling `else`.
    if src
        .prev_non_space(if_pos)
        .is_some_and(|p| p >= 3 && src.word_at(p - 3, "else"))
    {
        return;
    }
    let Some(body) = src.next_non_space(pc + 1) else {
        return;
    };
    let body_end = if src.code[body] == b'{' {
        src.close_of(body)
    } else {
        src.statement_end(body)
    };
    let exits = {
        let b = src.code_str(body, body_end.map_or(body, |e| e + 1));
        let b = b.trim_start_matches('{').trim_start();
        ["return", "break", "continue", "throw", "goto"]
            .iter()
            .any(|k| b.starts_with(k))
    };
    let original_cond = &src.text[cs..ce];
    let line = src.line_of(if_pos);
    // A guard followed by `else` keeps its shape in both spellings only through the
    // condition; skip those.
    let follows_else = |end: usize| {
        src.next_non_space(end + 1)
            .is_some_and(|n| src.word_at(n, "else"))
    };
    if exits {
        // The whole `if (C) S` disappears; it must sit on one line.
        let Some(end) = body_end else { return };
        if follows_else(end) || src.line_of(end) != line {
            return;
        }
        let whole = &src.text[if_pos..=end];
        out.push(Site {
            operator,
            line,
            change: format!("the check {} was removed", quote(whole)),
            edits: vec![Edit {
                start: if_pos,
                end: end + 1,
                mutant: String::new(),
                schema: Some(format!(
                    "if (!{SCHEMA_SWITCH}({{K}}) && ({original_cond})){}",
                    &src.text[pc + 1..=end]
                )),
            }],
        });
    } else {
        // A body over several lines: its end is found on any line.
        let end = match body_end {
            Some(e) => e,
            None if src.code[body] == b'{' => match block_end(src, body) {
                Some(e) => e,
                None => return,
            },
            None => return,
        };
        if follows_else(end) {
            return;
        }
        out.push(Site {
            operator,
            line,
            change: format!(
                "the check `if ({})` was removed: its body now runs unconditionally",
                original_cond.trim()
            ),
            edits: vec![Edit {
                start: if_pos,
                end: pc + 1,
                mutant: String::new(),
                schema: Some(format!("if ({SCHEMA_SWITCH}({{K}}) || ({original_cond}))")),
            }],
        });
    }
}

/// The `}` closing the block opened at `open`, on any line.
fn block_end(src: &Source, open: usize) -> Option<usize> {
    let mut depth = 0;
    for (i, &b) in src.code.iter().enumerate().skip(open) {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The keyword that opened the brace block starting at `brace` (`switch`, `for`, ...).
fn block_keyword<'s>(src: &'s Source, brace: usize) -> &'s str {
    let Some(p) = src.prev_non_space(brace) else {
        return "";
    };
    let word_end = if src.code[p] == b')' {
        // Find the `(` on any line.
        let mut depth = 0;
        let mut open = None;
        for j in (0..=p).rev() {
            match src.code[j] {
                b')' => depth += 1,
                b'(' => {
                    depth -= 1;
                    if depth == 0 {
                        open = Some(j);
                        break;
                    }
                }
                _ => {}
            }
        }
        match open.and_then(|o| src.prev_non_space(o)) {
            Some(e) => e + 1,
            None => return "",
        }
    } else {
        p + 1
    };
    let mut start = word_end;
    while start > 0 && is_ident_byte(src.code[start - 1]) {
        start -= 1;
    }
    src.code_str(start, word_end)
}

/// The innermost `switch` or loop around `pos` within the body: the keyword.
fn innermost_breakable<'s>(src: &'s Source, open: usize, pos: usize) -> &'s str {
    let mut stack: Vec<usize> = Vec::new();
    for i in open..pos {
        match src.code[i] {
            b'{' => stack.push(i),
            b'}' => {
                stack.pop();
            }
            _ => {}
        }
    }
    for &b in stack.iter().rev() {
        let k = block_keyword(src, b);
        if ["switch", "for", "while", "do"].contains(&k) {
            return k;
        }
    }
    ""
}

/// Whether the body opened at `open` is `main`'s.
fn in_main(src: &Source, open: usize) -> bool {
    let head_end = src.prev_non_space(open.saturating_sub(1)).unwrap_or(0);
    let line = src.line_of(head_end);
    let (ls, _) = src.line_span(line);
    let head = src.code_str(ls, head_end + 1);
    head.contains("main(") || head.contains("main (")
}

/// Whole statements on one line: returns, breaks, deletes, declarations, expression
/// statements.
fn statements(src: &Source, open: usize, close: usize, out: &mut Vec<Site>) {
    let first = src.line_of(open) + 1;
    let last = src.line_of(close).saturating_sub(1);
    let mut delete_lines: Vec<(usize, usize, usize, String)> = Vec::new();
    for line in first..=last {
        let (ls, le) = src.line_span(line);
        let Some(s) = src.next_non_space(ls).filter(|&s| s < le) else {
            continue;
        };
        // A statement starts after `;`, `{` or `}`.
        if !src
            .prev_non_space(s)
            .is_some_and(|p| b";{}".contains(&src.code[p]))
        {
            continue;
        }
        let Some(end) = src.statement_end(s) else {
            continue;
        };
        // Only one statement on the line.
        if src.code_str(end + 1, le).trim() != "" {
            continue;
        }
        if src.on_oracle_line(s) {
            continue;
        }
        let stmt = &src.text[s..=end];
        let code = src.code_str(s, end + 1);
        let first_word: String = code
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let removed = |operator: Operator, change: String| Site {
            operator,
            line,
            change,
            edits: vec![Edit {
                start: s,
                end: end + 1,
                mutant: String::new(),
                schema: Some(format!("if (!{SCHEMA_SWITCH}({{K}})) {{ {stmt} }}")),
            }],
        };
        match first_word.as_str() {
            "break" if code.trim() == "break;" => {
                if innermost_breakable(src, open, s) == "switch" {
                    out.push(removed(
                        Operator::MissingBreak,
                        "the `break;` ending a switch case was deleted".into(),
                    ));
                }
            }
            // `main` returns 0 without its `return` statement.
            "return" if code.trim() != "return;" && !in_main(src, open) => {
                out.push(removed(
                    Operator::MissingReturn,
                    format!("the statement {} was deleted", quote(stmt)),
                ));
            }
            "delete" | "free" => {
                let target = code
                    .trim_start_matches("delete")
                    .trim_start_matches("free")
                    .trim()
                    .trim_start_matches("[]")
                    .trim_start_matches('(')
                    .trim_end_matches(';')
                    .trim_end_matches(')')
                    .trim()
                    .to_string();
                if !target.is_empty() && target.bytes().all(|b| is_ident_byte(b) || b == b'.') {
                    out.push(Site {
                        operator: Operator::DoubleFree,
                        line,
                        change: format!("{} was done twice", quote(stmt)),
                        edits: vec![Edit {
                            start: s,
                            end: end + 1,
                            mutant: format!("{stmt} {stmt}"),
                            schema: Some(format!(
                                "{stmt} if ({SCHEMA_SWITCH}({{K}})) {{ {stmt} }}"
                            )),
                        }],
                    });
                    delete_lines.push((line, s, end, target));
                }
            }
            _ => {
                declaration_or_expression(src, line, s, end, &first_word, out);
            }
        }
    }
    for (line, s, end, target) in delete_lines {
        use_after_free(src, open, line, s, end, &target, out);
    }
}

/// `delete p;` moved up before the closest earlier statement (same block, within a few
/// lines) that uses `p`.
fn use_after_free(
    src: &Source,
    open: usize,
    line: usize,
    s: usize,
    end: usize,
    target: &str,
    out: &mut Vec<Site>,
) {
    let stmt = &src.text[s..=end];
    let depth_at = |pos: usize| -> i32 {
        src.code[open..pos].iter().fold(0, |d, &b| match b {
            b'{' => d + 1,
            b'}' => d - 1,
            _ => d,
        })
    };
    let depth = depth_at(s);
    for earlier in (line.saturating_sub(6).max(src.line_of(open) + 1)..line).rev() {
        let (ls, le) = src.line_span(earlier);
        let Some(es) = src.next_non_space(ls).filter(|&p| p < le) else {
            continue;
        };
        if depth_at(es) != depth {
            return; // left the block
        }
        let Some(ee) = src.statement_end(es) else {
            continue;
        };
        if !src
            .prev_non_space(es)
            .is_some_and(|p| b";{}".contains(&src.code[p]))
        {
            continue;
        }
        let code = src.code_str(es, ee);
        let mentions = code.match_indices(target).any(|(i, _)| {
            let b = code.as_bytes();
            (i == 0 || !is_ident_byte(b[i - 1]))
                && !b.get(i + target.len()).copied().is_some_and(is_ident_byte)
        });
        if !mentions {
            continue;
        }
        let used = &src.text[es..=ee];
        out.push(Site {
            operator: Operator::UseAfterFree,
            line: earlier,
            change: format!(
                "{} was moved before {}, which still uses `{target}`",
                quote(stmt),
                quote(used)
            ),
            edits: vec![
                Edit {
                    start: es,
                    end: es,
                    mutant: format!("{stmt} "),
                    schema: Some(format!("if ({SCHEMA_SWITCH}({{K}})) {{ {stmt} }} ")),
                },
                Edit {
                    start: s,
                    end: end + 1,
                    mutant: String::new(),
                    schema: Some(format!("if (!{SCHEMA_SWITCH}({{K}})) {{ {stmt} }}")),
                },
            ],
        });
        return;
    }
}

fn declaration_or_expression(
    src: &Source,
    line: usize,
    s: usize,
    end: usize,
    first_word: &str,
    out: &mut Vec<Site>,
) {
    let code = src.code_str(s, end + 1);
    let stmt = &src.text[s..=end];
    if KEYWORDS.contains(&first_word)
        || first_word.is_empty()
            && !code.starts_with("++")
            && !code.starts_with("--")
            && !code.starts_with('*')
    {
        return;
    }
    // `T name = init;` with T an arithmetic type.
    let decl = ARITHMETIC_TYPES
        .iter()
        .chain(["const"].iter())
        .any(|t| first_word == *t || first_word == format!("std::{t}"));
    if decl {
        if first_word == "const" || code.contains(',') {
            return;
        }
        let Some(eq) = code.find(" = ") else { return };
        let head = code[..eq].trim();
        let name_start = head
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
            .map_or(0, |p| p + 1);
        let ty = head[..name_start].trim();
        let name = &head[name_start..];
        if name.is_empty() || ty.is_empty() || ty.contains(['*', '&', '[', '<']) {
            return;
        }
        let init = &stmt[eq + 3..stmt.len() - 1];
        out.push(Site {
            operator: Operator::UninitializedVariable,
            line,
            change: format!(
                "the initializer of `{name}` (` = {}`) was removed",
                init.trim()
            ),
            edits: vec![Edit {
                start: s,
                end: end + 1,
                mutant: format!("{ty} {name};"),
                schema: Some(format!(
                    "{ty} {name}; if (!{SCHEMA_SWITCH}({{K}})) {{ {name} = {init}; }}"
                )),
            }],
        });
        if WIDE_SIGNED.contains(&ty) {
            out.push(Site {
                operator: Operator::SignedOverflow,
                line,
                change: format!("`{name}` was declared `int` instead of `{ty}`"),
                edits: vec![Edit {
                    start: s,
                    end: end + 1,
                    mutant: format!("int {name} = {init};"),
                    schema: None,
                }],
            });
        }
        return;
    }
    // A widening cast whose removal lets the arithmetic overflow in `int`.
    for cast in [
        "(long long)",
        "(int64_t)",
        "(long)",
        "static_cast<long long>",
        "static_cast<int64_t>",
        "1LL * ",
        "1ll * ",
        "1L * ",
    ] {
        if let Some(p) = stmt.find(cast) {
            if code.get(p..p + cast.len()) == Some(cast) {
                let mutated = format!("{}{}", &stmt[..p], &stmt[p + cast.len()..]);
                out.push(Site {
                    operator: Operator::SignedOverflow,
                    line,
                    change: format!(
                        "the widening `{}` was removed from {}",
                        cast.trim(),
                        quote(stmt)
                    ),
                    edits: vec![Edit {
                        start: s,
                        end: end + 1,
                        mutant: mutated,
                        schema: None,
                    }],
                });
                break;
            }
        }
    }
    // An expression statement: assignment, increment or call (not a declaration).
    let rest = code[first_word.len()..].trim_start();
    let expression = code.starts_with("++")
        || code.starts_with("--")
        || [
            "=", "+=", "-=", "*=", "/=", "%=", "|=", "&=", "^=", "<<=", ">>=", "++", "--", "->",
            ".", "[", "(",
        ]
        .iter()
        .any(|t| rest.starts_with(t) && !rest.starts_with("=="));
    if expression && !first_word.is_empty() || code.starts_with("++") || code.starts_with("--") {
        out.push(Site {
            operator: Operator::DeleteStatement,
            line,
            change: format!("the statement {} was deleted", quote(stmt)),
            edits: vec![Edit {
                start: s,
                end: end + 1,
                mutant: String::new(),
                schema: Some(format!("if (!{SCHEMA_SWITCH}({{K}})) {{ {stmt} }}")),
            }],
        });
    }
}

/// Calls with two simple arguments (swapped) and subscripts by a name (one past).
fn calls_and_subscripts(src: &Source, open: usize, close: usize, out: &mut Vec<Site>) {
    let simple = |s: &str| {
        let s = s.trim();
        !s.is_empty()
            && s.len() <= 40
            && s.bytes().all(|b| is_ident_byte(b) || b == b'.')
            && !s.starts_with('.')
    };
    for i in open..close {
        match src.code[i] {
            b'(' => {
                // The callee: a name, possibly qualified or a member.
                let mut j = i;
                while j > open
                    && (is_ident_byte(src.code[j - 1])
                        || src.code[j - 1] == b'.'
                        || (src.code[j - 1] == b':' && j >= 2 && src.code[j - 2] == b':')
                        || (src.code[j - 1] == b':' && src.code.get(j) == Some(&b':')))
                {
                    j -= 1;
                }
                let callee = src.code_str(j, i);
                let last = callee.rsplit([':', '.']).next().unwrap_or("");
                if callee.is_empty()
                    || !last
                        .bytes()
                        .next()
                        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                    || KEYWORDS.contains(&last)
                    || [
                        "min",
                        "max",
                        "swap",
                        "make_pair",
                        "pair",
                        "assert",
                        "move",
                        "forward",
                    ]
                    .contains(&last)
                    || src.on_oracle_line(i)
                {
                    continue;
                }
                // Not a declaration `T name(a, b);`.
                if src
                    .prev_non_space(j)
                    .is_some_and(|p| is_ident_byte(src.code[p]) || src.code[p] == b'>')
                {
                    continue;
                }
                let Some(pc) = src.close_of(i) else { continue };
                let args = &src.text[i + 1..pc];
                let args_code = src.code_str(i + 1, pc);
                if args_code != args || args.matches(',').count() != 1 {
                    continue;
                }
                let (a, b) = args.split_once(',').expect("one comma");
                if !simple(a) || !simple(b) || a.trim() == b.trim() {
                    continue;
                }
                let call = &src.text[j..=pc];
                let mutated = format!("{callee}({}, {})", b.trim(), a.trim());
                let mut site = expression_site(src, Operator::SwapArguments, j, pc + 1, mutated);
                site.change = format!("the arguments of {} were swapped", quote(call));
                out.push(site);
            }
            b'[' => {
                if i == open || !is_ident_byte(src.code[i - 1]) || src.on_oracle_line(i) {
                    continue;
                }
                let Some(pc) = src.close_of(i) else { continue };
                let index = src.code_str(i + 1, pc);
                let index_text = &src.text[i + 1..pc];
                if index != index_text
                    || !index.bytes().all(is_ident_byte)
                    || index.is_empty()
                    || index.bytes().all(|b| b.is_ascii_digit())
                {
                    continue;
                }
                // Not a declaration `T a[n];` nor a lambda capture.
                let mut k = i;
                while k > open && is_ident_byte(src.code[k - 1]) {
                    k -= 1;
                }
                if src
                    .prev_non_space(k)
                    .is_some_and(|p| is_ident_byte(src.code[p]) || src.code[p] == b'>')
                {
                    continue;
                }
                out.push(Site {
                    operator: Operator::OffByOneIndex,
                    line: src.line_of(i),
                    change: format!(
                        "`{}[{index}]` became `{}[{index} + 1]`",
                        &src.text[k..i],
                        &src.text[k..i]
                    ),
                    edits: vec![Edit {
                        start: i + 1,
                        end: pc,
                        mutant: format!("{index} + 1"),
                        schema: Some(format!("({index}) + {SCHEMA_SWITCH}({{K}})")),
                    }],
                });
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROGRAM: &str = r#"#include <cstdio>
#include <cassert>
int sum(const int* a, int n) {
    if (a == nullptr) return 0;
    int s = 0;
    for (int i = 0; i < n; ++i) {
        s += a[i];
    }
    return s;
}
int kind(int x) {
    int r = 0;
    switch (x) {
    case 1:
        r = 10;
        break;
    default:
        r = 20;
    }
    return r;
}
long long square(int x) {
    long long r = (long long)x * x;
    return r;
}
int main() {
    int* p = new int[3]{1, 2, 3};
    int t = sum(p, 3);
    delete[] p;
    assert(t == 6);
    printf("%d %d %lld\n", t, kind(1), square(3));
    return 0;
}
"#;

    fn by_op(sites: &[Site], op: Operator) -> Vec<&Site> {
        sites.iter().filter(|s| s.operator == op).collect()
    }

    #[test]
    fn every_operator_finds_its_sites() {
        let sites = sites(PROGRAM);
        for op in [
            Operator::OffByOne,
            Operator::OffByOneIndex,
            Operator::FlipComparison,
            Operator::RemoveNullCheck,
            Operator::UseAfterFree,
            Operator::DoubleFree,
            Operator::UninitializedVariable,
            Operator::SignedOverflow,
            Operator::SwapArguments,
            Operator::MissingReturn,
            Operator::MissingBreak,
            Operator::DeleteStatement,
        ] {
            assert!(
                !by_op(&sites, op).is_empty(),
                "no {op:?} site in {sites:#?}"
            );
        }
        // Checks and prints are the test's oracle, never mutated.
        assert!(
            sites.iter().all(|s| s.line != 30 && s.line != 31),
            "{sites:#?}"
        );
    }

    #[test]
    fn mutants_keep_lines_and_change_what_they_say() {
        let sites = sites(PROGRAM);
        let lines = PROGRAM.lines().count();
        for s in &sites {
            let m = mutant(PROGRAM, s);
            assert_eq!(m.lines().count(), lines, "{s:?}");
            assert_ne!(m, PROGRAM, "{s:?}");
        }
        let off = by_op(&sites, Operator::OffByOne);
        let loop_bound = off.iter().find(|s| s.line == 6).expect("the loop bound");
        assert!(mutant(PROGRAM, loop_bound).contains("for (int i = 0; i <= n; ++i)"));
        let null = by_op(&sites, Operator::RemoveNullCheck)[0];
        assert!(!mutant(PROGRAM, null).contains("nullptr"));
        let uaf = by_op(&sites, Operator::UseAfterFree)[0];
        let m = mutant(PROGRAM, uaf);
        assert!(m.contains("delete[] p; int t = sum(p, 3);"), "{m}");
        let brk = by_op(&sites, Operator::MissingBreak)[0];
        assert_eq!(brk.line, 16);
    }

    #[test]
    fn schema_holds_every_chosen_site_and_keeps_lines() {
        let sites = sites(PROGRAM);
        let ready: Vec<Site> = sites.iter().filter(|s| s.schema_ready()).cloned().collect();
        let chosen = choose(&ready, 2, 64);
        let ops: std::collections::BTreeSet<Operator> = chosen.iter().map(|s| s.operator).collect();
        assert!(ops.len() >= 8, "{ops:?}");
        let (text, ranges) = schema(PROGRAM, &chosen);
        assert_eq!(ranges.len(), chosen.len());
        assert!(ranges
            .iter()
            .all(|r| r.iter().all(|&(a, b)| text[a..b].contains(SCHEMA_SWITCH))));
        assert_eq!(text.lines().count(), PROGRAM.lines().count());
        for k in 1..=chosen.len() {
            assert!(
                text.contains(&format!("{SCHEMA_SWITCH}({k})")),
                "{k}: {text}"
            );
        }
    }
}
