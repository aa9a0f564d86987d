//! Text between the editor and the model. The model was trained on normalized text (LF
//! line ends, no trailing spaces, and by default no indentation), so prompts are
//! normalized the same way; its completion is then put back into the user's layout:
//! re-indented by the depth of brackets relative to the cursor's line, in the file's
//! own indentation unit. Also: FIM and chat prompts from our special tokens, UTF-8
//! assembled across tokens, and stop strings held back until they can be ruled out.

use cxxlm_eval::functions::BodyStop;
use cxxlm_tokenizer::layout::trim_trailing;
pub use cxxlm_tokenizer::layout::{normalize, Layout};
use cxxlm_tokenizer::{Bpe, Healing};

/// The repository name that repository context is rendered under (clients send files,
/// not a repository name).
const REPO_NAME: &str = "project";

/// The text before the cursor, normalized (the cursor's line loses its trailing
/// whitespace too: [`Reindent`] drops it from the completion's start).
#[derive(Debug, Clone)]
pub struct Prefix {
    pub text: String,
}

pub fn prefix(text: &str, layout: Layout) -> Prefix {
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let (before, cursor_line) = match text.rfind('\n') {
        Some(i) => (&text[..=i], &text[i + 1..]),
        None => ("", text.as_str()),
    };
    let kept = trim_trailing(cursor_line);
    let kept = if layout.strip_indentation {
        kept.trim_start_matches([' ', '\t'])
    } else {
        kept
    };
    let before = if before.is_empty() {
        String::new()
    } else {
        normalize(&before[..before.len() - 1], layout) + "\n"
    };
    Prefix {
        text: before + kept,
    }
}

/// A plain prompt (no suffix) as the model reads it: `<|bos|>`, then the text laid out
/// as the training text was ([`prefix`]); its completion goes back through [`Reindent`].
pub fn plain_prompt(bpe: &Bpe, text: &str, layout: Layout) -> Vec<u32> {
    let mut ids = vec![bpe.special_id("<|bos|>").unwrap_or(0)];
    ids.extend(bpe.encode(&prefix(text, layout).text));
    ids
}

/// [`plain_prompt`] healed at its last token ([`Bpe::heal`]): the ids, and what the
/// completion's first token must begin with.
pub fn healed_prompt(bpe: &Bpe, text: &str, layout: Layout) -> (Vec<u32>, Option<Healing>) {
    let mut ids = plain_prompt(bpe, text, layout);
    let healing = bpe.heal(&mut ids);
    (ids, healing)
}

/// The text after the cursor, normalized: the rest of the cursor's line keeps its
/// leading spaces (they are inside the line) unless the cursor is in the indentation.
pub fn suffix(text: &str, prefix_cursor_line: &str, layout: Layout) -> String {
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let (first, rest) = match text.find('\n') {
        Some(i) => (&text[..i], Some(&text[i + 1..])),
        None => (text.as_str(), None),
    };
    let in_indentation = prefix_cursor_line
        .trim_start_matches([' ', '\t'])
        .is_empty();
    let first = trim_trailing(first);
    let first = if layout.strip_indentation && in_indentation {
        first.trim_start_matches([' ', '\t'])
    } else {
        first
    };
    match rest {
        Some(rest) => format!("{first}\n{}", normalize(rest, layout)),
        None => first.to_string(),
    }
}

/// A cursor cut for a model that learned whole-line middles (`pack --fim-line-aligned`):
/// its training never cut inside a line, nor gave a suffix that starts with the middle's
/// own line break. The prefix ends where the cursor's line starts, the line's text before
/// the cursor begins the middle, and the suffix starts at the next line; the completion
/// then leaves out its last line break ([`Reindent::without_final_line_break`]). Text after
/// the cursor on its line (`rest`) is left for the model to write again at the end of the
/// line ([`RestOfLine`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LineCut {
    pub prefix: String,
    pub typed: String,
    pub suffix: String,
    /// The text after the cursor on its line, without trailing whitespace; empty when the
    /// cursor ends its line.
    pub rest: String,
}

pub fn line_cut(prefix: &str, suffix: &str, layout: Layout) -> LineCut {
    let after_cursor = self::suffix(suffix, cursor_line(prefix), layout);
    let (rest, next_lines) = after_cursor.split_once('\n').unwrap_or((&after_cursor, ""));
    let before = self::prefix(prefix, layout).text;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    LineCut {
        prefix: before[..start].to_string(),
        typed: before[start..].to_string(),
        suffix: next_lines.to_string(),
        rest: rest.to_string(),
    }
}

/// The last line of `text` (the cursor's line, up to the cursor).
pub fn cursor_line(text: &str) -> &str {
    let text = text.strip_suffix('\r').unwrap_or(text);
    text.rsplit(['\n', '\r']).next().unwrap_or("")
}

/// Tracks the nesting of brackets through C++ text, outside comments and literals.
#[derive(Debug, Clone, Default)]
struct Nesting {
    depth: i64,
    state: LexState,
    prev: char,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
enum LexState {
    #[default]
    Code,
    LineComment,
    BlockComment,
    Str,
    Char,
}

impl Nesting {
    fn feed(&mut self, c: char) {
        use LexState::*;
        let prev = self.prev;
        // A backslash escapes one character in literals; `\\` escapes itself.
        self.prev = if prev == '\\' && c == '\\' { ' ' } else { c };
        match self.state {
            Code => match c {
                '{' | '(' | '[' => self.depth += 1,
                '}' | ')' | ']' => self.depth -= 1,
                '/' if prev == '/' => self.state = LineComment,
                '*' if prev == '/' => {
                    self.state = BlockComment;
                    self.prev = ' ';
                }
                '"' => self.state = Str,
                // A digit separator (1'000) is not a character literal.
                '\'' if !prev.is_ascii_alphanumeric() => self.state = Char,
                _ => {}
            },
            LineComment if c == '\n' => self.state = Code,
            BlockComment if c == '/' && prev == '*' => self.state = Code,
            Str if (c == '"' && prev != '\\') || c == '\n' => self.state = Code,
            Char if (c == '\'' && prev != '\\') || c == '\n' => self.state = Code,
            _ => {}
        }
    }
}

fn is_closer(c: char) -> bool {
    matches!(c, '}' | ')' | ']')
}

/// Leading whitespace of a line, in columns of `unit` (a tab is one column when the
/// unit is a tab, and a unit's width otherwise).
fn columns(line: &str, unit: &str) -> usize {
    let tab = if unit == "\t" { 1 } else { unit.len() };
    line.chars()
        .take_while(|c| *c == ' ' || *c == '\t')
        .map(|c| if c == '\t' { tab } else { 1 })
        .sum()
}

/// The file's indentation unit: a tab if most indented lines start with one, else the
/// most common step between consecutive lines' indentation (4 when there is none).
fn indent_unit(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tabs = lines.iter().filter(|l| l.starts_with('\t')).count();
    let spaces = lines.iter().filter(|l| l.starts_with(' ')).count();
    if tabs > spaces {
        return "\t".into();
    }
    let widths: Vec<usize> = lines
        .iter()
        .map(|l| l.chars().take_while(|&c| c == ' ').count())
        .collect();
    let mut counts = [0usize; 9];
    for w in widths.windows(2) {
        if w[1] > w[0] && w[1] - w[0] <= 8 {
            counts[w[1] - w[0]] += 1;
        }
    }
    let best = (1..=8).max_by_key(|&d| (counts[d], d == 4)).unwrap_or(4);
    " ".repeat(if counts[best] == 0 { 4 } else { best })
}

/// Puts a completion (in the model's layout) into the user's: drops the whitespace the
/// cursor's line already ends with, indents each new line by the bracket depth
/// relative to the reference line (the cursor's, or the last non-blank one above it
/// when the cursor's line is blank) when the model was trained without indentation,
/// and stops before the first line indented less than `min_indent` columns (llama.cpp's
/// `n_indent`). Fed the completion in pieces; returns what can be shown so far.
#[derive(Debug, Clone)]
pub struct Reindent {
    strip: bool,
    unit: String,
    /// Columns of the reference line's indentation.
    base: i64,
    /// The reference line's depth minus its leading closer.
    reference: i64,
    nesting: Nesting,
    /// Whitespace already on the cursor's line before the first completion line (when
    /// the completion starts a line), in columns.
    present: usize,
    /// The completion's next characters that repeat the cursor line's trailing spaces.
    skip: usize,
    at_line_start: bool,
    first_line: bool,
    /// Whitespace at the start of the current line, held until its first character.
    pending: String,
    min_indent: usize,
    stopped: bool,
    /// Line breaks are held until text follows them: the completion's last one is left
    /// out ([`Reindent::without_final_line_break`]).
    hold_line_breaks: bool,
    held: bool,
}

impl Reindent {
    /// For a completion after `prefix` (the user's text, as sent) in a file whose other
    /// text is `suffix`.
    pub fn new(prefix: &str, suffix: &str, layout: Layout, min_indent: usize) -> Self {
        let prefix = prefix.replace("\r\n", "\n");
        let unit = indent_unit(&format!("{prefix}\n{suffix}"));
        let cursor = cursor_line(&prefix);
        let blank_cursor = cursor.trim().is_empty();
        // The reference line, and the text from its start to the cursor.
        let (reference, upto) = if blank_cursor {
            let before = &prefix[..prefix.len() - cursor.len()];
            let lines: Vec<&str> = before.split('\n').collect();
            match lines.iter().rposition(|l| !l.trim().is_empty()) {
                Some(i) => (lines[i], lines[i..].join("\n") + cursor),
                None => ("", String::new()),
            }
        } else {
            (cursor, cursor.to_string())
        };
        let mut nesting = Nesting::default();
        let content = upto.trim_start_matches([' ', '\t']);
        for c in content.chars() {
            nesting.feed(c);
        }
        let leading_closer = content.chars().next().is_some_and(is_closer);
        Reindent {
            strip: layout.strip_indentation,
            base: columns(reference, &unit) as i64,
            reference: -(leading_closer as i64),
            present: if blank_cursor {
                columns(cursor, &unit)
            } else {
                0
            },
            skip: if blank_cursor {
                0
            } else {
                cursor.len() - trim_trailing(cursor).len()
            },
            unit,
            nesting,
            at_line_start: blank_cursor,
            first_line: true,
            pending: String::new(),
            min_indent,
            stopped: false,
            hold_line_breaks: false,
            held: false,
        }
    }

    /// Leaves out the completion's last line break: the middle of a cut at a line start
    /// ([`LineCut`]) ends with one, and the cursor's line has its own.
    pub fn without_final_line_break(mut self) -> Self {
        self.hold_line_breaks = true;
        self
    }

    fn line_break(&mut self, out: &mut String) {
        self.release(out);
        if self.hold_line_breaks {
            self.held = true;
        } else {
            out.push('\n');
        }
    }

    fn release(&mut self, out: &mut String) {
        if std::mem::take(&mut self.held) {
            out.push('\n');
        }
    }

    /// Whether a line indented less than `min_indent` ended the completion.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    pub fn push(&mut self, text: &str) -> String {
        let mut out = String::new();
        for c in text.chars() {
            if self.stopped {
                break;
            }
            if self.skip > 0 {
                if c == ' ' || c == '\t' {
                    self.skip -= 1;
                    continue;
                }
                self.skip = 0;
            }
            if !self.at_line_start {
                self.nesting.feed(c);
                if c == '\n' {
                    self.line_break(&mut out);
                    self.at_line_start = true;
                    self.first_line = false;
                } else {
                    self.release(&mut out);
                    out.push(c);
                }
                continue;
            }
            match c {
                ' ' | '\t' => self.pending.push(c),
                '\n' => {
                    // A blank line keeps no indentation.
                    self.pending.clear();
                    self.line_break(&mut out);
                    self.nesting.feed(c);
                    self.first_line = false;
                }
                _ => {
                    let indent = self.indentation(c);
                    if self.min_indent > 0
                        && columns(&indent, " ") < self.min_indent
                        && !self.first_line
                    {
                        self.stopped = true;
                        break;
                    }
                    self.release(&mut out);
                    if self.first_line {
                        out.push_str(indent.get(self.present.min(indent.len())..).unwrap_or(""));
                    } else {
                        out.push_str(&indent);
                    }
                    out.push(c);
                    self.nesting.feed(c);
                    self.at_line_start = false;
                }
            }
        }
        out
    }

    /// The indentation of a line whose first character is `first`.
    fn indentation(&mut self, first: char) -> String {
        let pending = std::mem::take(&mut self.pending);
        if !self.strip {
            return pending;
        }
        let level = self.nesting.depth - is_closer(first) as i64;
        let width = if self.unit == "\t" {
            1
        } else {
            self.unit.len() as i64
        };
        let cols = (self.base + (level - self.reference) * width).max(0) as usize;
        if self.unit == "\t" {
            "\t".repeat(cols)
        } else {
            " ".repeat(cols)
        }
    }

    /// What is still held at the end (the whitespace of an unfinished line, a held last
    /// line break: none).
    pub fn finish(&mut self) -> String {
        self.pending.clear();
        self.held = false;
        String::new()
    }
}

/// A completion at a cursor with text after it on its line, from a model of whole-line
/// middles ([`LineCut`]): the model writes the cursor's line to its end, that text
/// included; what goes in at the cursor is the line up to the text's last occurrence
/// (without the spaces before it when the text after the cursor starts with its own), and
/// nothing when the line does not hold it. The line is held until it ends.
#[derive(Debug, Clone)]
pub struct RestOfLine {
    reindent: Reindent,
    rest: String,
    spaced: bool,
    line: String,
    ended: bool,
}

impl RestOfLine {
    pub fn new(reindent: Reindent, rest: &str) -> Self {
        RestOfLine {
            reindent,
            rest: rest.trim_start().to_string(),
            spaced: rest.starts_with([' ', '\t']),
            line: String::new(),
            ended: false,
        }
    }

    pub fn push(&mut self, text: &str) -> String {
        if self.ended {
            return String::new();
        }
        match text.split_once('\n') {
            Some((end, _)) => {
                self.line += &self.reindent.push(end);
                self.finish()
            }
            None => {
                self.line += &self.reindent.push(text);
                String::new()
            }
        }
    }

    pub fn finish(&mut self) -> String {
        if std::mem::replace(&mut self.ended, true) {
            return String::new();
        }
        let line = std::mem::take(&mut self.line);
        match line.rfind(self.rest.as_str()) {
            Some(at) if self.spaced => line[..at].trim_end().to_string(),
            Some(at) => line[..at].to_string(),
            None => String::new(),
        }
    }

    /// Whether the cursor's line has ended.
    pub fn ended(&self) -> bool {
        self.ended
    }
}

/// Puts the code blocks (between ``` fences) of a chat answer into an indented layout,
/// by bracket depth as [`Reindent`] does, when the model was trained without
/// indentation; the prose around them is left as written. Fed the answer in pieces.
#[derive(Debug, Clone)]
pub struct CodeBlocks {
    layout: Layout,
    /// The open code block's re-indentation.
    block: Option<Reindent>,
    /// The start of a line, held until it is known whether it is a fence.
    held: String,
    at_line_start: bool,
    /// Within a fence's line, which passes as written.
    in_fence: bool,
}

impl CodeBlocks {
    pub fn new(layout: Layout) -> Self {
        CodeBlocks {
            layout,
            block: None,
            held: String::new(),
            at_line_start: true,
            in_fence: false,
        }
    }

    pub fn push(&mut self, text: &str) -> String {
        if !self.layout.strip_indentation {
            return text.to_string();
        }
        let mut out = String::new();
        for c in text.chars() {
            if self.in_fence {
                out.push(c);
                self.in_fence = c != '\n';
                self.at_line_start = c == '\n';
            } else if self.at_line_start {
                self.held.push(c);
                let content = self.held.trim_start_matches([' ', '\t']);
                if content.starts_with("```") {
                    if let Some(mut block) = self.block.take() {
                        out.push_str(&block.finish());
                    } else {
                        self.block = Some(Reindent::new("", "", self.layout, 0));
                    }
                    out.push_str(&std::mem::take(&mut self.held));
                    (self.in_fence, self.at_line_start) = (true, false);
                } else if c == '\n' || !"```".starts_with(content) {
                    let held = std::mem::take(&mut self.held);
                    self.at_line_start = c == '\n';
                    self.emit(&held, &mut out);
                }
            } else {
                self.emit(c.encode_utf8(&mut [0; 4]), &mut out);
                self.at_line_start = c == '\n';
            }
        }
        out
    }

    fn emit(&mut self, text: &str, out: &mut String) {
        match &mut self.block {
            Some(block) => out.push_str(&block.push(text)),
            None => out.push_str(text),
        }
    }

    /// What is still held at the end.
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        let held = std::mem::take(&mut self.held);
        self.emit(&held, &mut out);
        if let Some(block) = &mut self.block {
            out.push_str(&block.finish());
        }
        out
    }
}

/// How a completion is put into the user's layout: code written at an editor's cursor,
/// or the code blocks of a chat answer.
#[derive(Debug, Clone)]
pub enum Fit {
    Cursor(Reindent),
    RestOfLine(RestOfLine),
    Chat(CodeBlocks),
}

impl Fit {
    pub fn push(&mut self, text: &str) -> String {
        match self {
            Fit::Cursor(r) => r.push(text),
            Fit::RestOfLine(r) => r.push(text),
            Fit::Chat(b) => b.push(text),
        }
    }

    pub fn finish(&mut self) -> String {
        match self {
            Fit::Cursor(r) => r.finish(),
            Fit::RestOfLine(r) => r.finish(),
            Fit::Chat(b) => b.finish(),
        }
    }

    /// Whether a line indented less than `n_indent` ended a cursor's completion, or the
    /// cursor's line ended one that had text after the cursor.
    pub fn stopped(&self) -> bool {
        match self {
            Fit::Cursor(r) => r.stopped(),
            Fit::RestOfLine(r) => r.ended(),
            Fit::Chat(_) => false,
        }
    }
}

/// Bytes of tokens assembled into text: a character split across tokens waits for its
/// last byte; invalid bytes become U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or(""));
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{fffd}');
                            self.pending.drain(..valid + bad);
                        }
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                    }
                }
            }
        }
    }

    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }
}

/// Stop strings over a stream of text: text that could begin a stop string is held
/// until it can be ruled out; a stop string ends the text before it.
#[derive(Debug, Default)]
pub struct Stops {
    stops: Vec<String>,
    held: String,
    /// The stop string that ended the text.
    pub matched: Option<String>,
}

impl Stops {
    pub fn new(stops: Vec<String>) -> Self {
        Stops {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    pub fn push(&mut self, text: &str) -> String {
        if self.matched.is_some() {
            return String::new();
        }
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, s)) = first {
            self.matched = Some(s.clone());
            let out = self.held[..at].to_string();
            self.held.clear();
            return out;
        }
        // Keep the longest end of the held text that begins some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n) && self.held.ends_with(&s[..n]))
                    .max()
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        out
    }

    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Generated text cut where the function body its prompt opened ends (the stop code
/// completion wants for a plain prompt that opens one).
pub struct BodyEnd {
    stop: BodyStop,
    text: String,
    pub ended: bool,
}

impl BodyEnd {
    pub fn new(stop: BodyStop) -> Self {
        BodyEnd {
            stop,
            text: String::new(),
            ended: false,
        }
    }

    /// What of `piece` comes before the end of the body (all of it until then).
    pub fn push(&mut self, piece: &str) -> String {
        if self.ended {
            return String::new();
        }
        let start = self.text.len();
        self.text.push_str(piece);
        match self.stop.end(&self.text) {
            Some(end) => {
                self.ended = true;
                self.text[start..end.max(start)].to_string()
            }
            None => piece.to_string(),
        }
    }
}

/// A file of repository context (llama.cpp's `input_extra`).
#[derive(Debug, Clone)]
pub struct ContextFile {
    pub name: String,
    pub text: String,
}

fn special(bpe: &Bpe, name: &str) -> u32 {
    bpe.special_id(name)
        .unwrap_or_else(|| panic!("{name} is one of the tokenizer's specials"))
}

/// A fill-in-the-middle prompt in the layout the model was trained on
/// (`<|bos|><|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>`), after repository context
/// (`<|repo_name|>name`, then `<|file_sep|>path\ncode` per file, and one for the
/// current file), fitted into `budget` tokens: context files go first (the earliest
/// first), then the start of the prefix and the end of the suffix (3:1). Returns the
/// tokens and whether anything was left out.
pub fn fim_prompt(
    bpe: &Bpe,
    files: &[ContextFile],
    prefix: &str,
    suffix: &str,
    layout: Layout,
    budget: usize,
) -> (Vec<u32>, bool) {
    let mut p = bpe.encode(prefix);
    let mut s = bpe.encode(suffix);
    let fixed = 4;
    let mut truncated = false;
    let room = budget.saturating_sub(fixed);
    if p.len() + s.len() > room {
        truncated = true;
        let s_room = (room / 4).max(room.saturating_sub(p.len()));
        s.truncate(s_room.min(s.len()));
        let p_room = room - s.len();
        p.drain(..p.len() - p_room.min(p.len()));
    }
    let mut context: Vec<Vec<u32>> = Vec::new();
    if !files.is_empty() {
        let sep = special(bpe, "<|file_sep|>");
        for f in files {
            let mut t = vec![sep];
            t.extend(bpe.encode(&format!("{}\n{}", f.name, normalize(&f.text, layout))));
            context.push(t);
        }
        let mut current = vec![sep];
        current.extend(bpe.encode("current\n"));
        context.push(current);
        let mut head = vec![special(bpe, "<|repo_name|>")];
        head.extend(bpe.encode(&format!("{REPO_NAME}\n")));
        let left = room.saturating_sub(p.len() + s.len());
        let total = |c: &[Vec<u32>]| head.len() + c.iter().map(Vec::len).sum::<usize>();
        while context.len() > 1 && total(&context) > left {
            context.remove(0);
            truncated = true;
        }
        if total(&context) > left {
            context.clear();
            truncated = true;
        } else {
            context.insert(0, head);
        }
    }
    let mut ids = vec![special(bpe, "<|bos|>")];
    ids.extend(context.into_iter().flatten());
    ids.push(special(bpe, "<|fim_prefix|>"));
    ids.extend(p);
    ids.push(special(bpe, "<|fim_suffix|>"));
    ids.extend(s);
    ids.push(special(bpe, "<|fim_middle|>"));
    (ids, truncated)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_body_ends_the_text_at_its_closing_brace_across_pieces() {
        let stop = BodyStop::after("int f(int x) {\n").unwrap();
        let mut body = BodyEnd::new(stop);
        let pieces = [
            "    if (x) {",
            " return \"}\"; ",
            "}\n    return 0;\n",
            "}",
            "\nint g() {}\n",
        ];
        let out: String = pieces.iter().map(|p| body.push(p)).collect();
        assert_eq!(out, "    if (x) { return \"}\"; }\n    return 0;\n}");
        assert!(body.ended);
        assert_eq!(body.push("more"), "");
    }

    use super::*;

    const STRIP: Layout = Layout {
        strip_indentation: true,
    };
    const KEEP: Layout = Layout {
        strip_indentation: false,
    };

    fn fill(prefix: &str, suffix: &str, completion: &str, layout: Layout) -> String {
        let mut r = Reindent::new(prefix, suffix, layout, 0);
        let mut out = String::new();
        // In pieces, as tokens arrive.
        for piece in completion.split_inclusive(['\n', ' ']) {
            out += &r.push(piece);
        }
        out + &r.finish()
    }

    #[test]
    fn a_cursor_at_the_end_of_its_line_is_cut_at_the_line_start() {
        let cut = line_cut("int f() {\n    int x = ", "  \n    return x;\n}\n", STRIP);
        assert_eq!(
            cut,
            LineCut {
                prefix: "int f() {\n".into(),
                typed: "int x =".into(),
                suffix: "return x;\n}\n".into(),
                rest: String::new(),
            }
        );
        // On a blank line: nothing typed; at the end of the file: no suffix.
        let blank = line_cut("a;\n    ", "\nb;\n", STRIP);
        assert_eq!((blank.prefix.as_str(), blank.typed.as_str()), ("a;\n", ""));
        assert_eq!(line_cut("a;\nb", "", KEEP).suffix, "");
        // Text after the cursor on its line: left for the model to write again.
        let inside = line_cut("x;\n  f(a, ", " );  \n  g();\n", STRIP);
        assert_eq!(
            (
                inside.typed.as_str(),
                inside.rest.as_str(),
                inside.suffix.as_str()
            ),
            ("f(a,", " );", "g();\n")
        );
    }

    #[test]
    fn a_line_written_to_its_end_goes_in_up_to_the_text_after_the_cursor() {
        let line = |pieces: &[&str], rest: &str| {
            let mut r = RestOfLine::new(Reindent::new("  f(a, ", " );\n", KEEP, 0), rest);
            let mut out = String::new();
            for p in pieces {
                out += &r.push(p);
            }
            (out + &r.finish(), r.ended())
        };
        // The cursor line already ends with a space: the model's is not repeated.
        assert_eq!(
            line(&[" b", ", c", ");\n", "g();"], ");"),
            ("b, c".into(), true)
        );
        // Its last occurrence, so that the brackets written before it stay.
        assert_eq!(line(&["g(b));"], ");"), ("g(b)".into(), true));
        // A space before the text after the cursor: the user's, or the completion's.
        assert_eq!(line(&["b  );"], " );"), ("b".into(), true));
        assert_eq!(line(&["int x) {"], "x) {"), ("int ".into(), true));
        // A line that does not hold the text after the cursor puts nothing in.
        assert_eq!(line(&["b;\n"], ");"), (String::new(), true));
        assert_eq!(line(&["b)"], ")"), ("b".into(), true));
    }

    #[test]
    fn a_whole_line_middle_leaves_out_its_last_line_break() {
        let mut r =
            Reindent::new("int f() {\n    int x =", "\n}\n", KEEP, 0).without_final_line_break();
        let mut out = String::new();
        for piece in [" 1;\n", "    int y", " = 2;\n"] {
            out += &r.push(piece);
        }
        // The line break between the lines comes out once the next line does.
        assert_eq!(out + &r.finish(), " 1;\n    int y = 2;");
        assert_eq!(
            fill("a;\n", "", "b;\n", KEEP),
            "b;\n",
            "kept when not asked"
        );
    }

    #[test]
    fn prompts_are_normalized_as_the_training_text_was() {
        let p = prefix("int f() {\r\n    int x = 1;  \n    return x +  ", STRIP);
        assert_eq!(p.text, "int f() {\nint x = 1;\nreturn x +");
        let kept = prefix("  a;\n  b", KEEP);
        assert_eq!(kept.text, "  a;\n  b");
        assert_eq!(
            suffix(" + 1;  \n    }\n", "    return x", STRIP),
            " + 1;\n}\n"
        );
        assert_eq!(suffix("    foo();\n}", "    ", STRIP), "foo();\n}");
    }

    #[test]
    fn completions_take_the_files_indentation() {
        // The cursor at the end of a line that opens a block.
        let prefix = "void f() {\n    if (x) {";
        let got = fill(prefix, "\n}\n", "\nreturn 1;\n}\nint y = 2;", STRIP);
        assert_eq!(got, "\n        return 1;\n    }\n    int y = 2;");
        // On a blank, already indented line: the first line adds only what is missing.
        let got = fill(
            "int g() {\n  int a = 0;\n  ",
            "\n}\n",
            "a += 1;\nreturn a;\n}",
            STRIP,
        );
        assert_eq!(got, "a += 1;\n  return a;\n}");
        // Tabs, and brackets inside comments and strings do not count.
        let got = fill(
            "void h() {\n\tcall(\"{\"); // {\n\t",
            "}\n",
            "for (;;) {\nbreak;\n}",
            STRIP,
        );
        assert_eq!(got, "for (;;) {\n\t\tbreak;\n\t}");
        // The model already writes indentation: it is kept.
        let got = fill("void f() {\n", "}\n", "    return;\n", KEEP);
        assert_eq!(got, "    return;\n");
        // The space the cursor's line ends with is not repeated.
        assert_eq!(fill("int x = ", ";", " 42", STRIP), "42");
    }

    #[test]
    fn a_line_indented_less_than_n_indent_ends_the_completion() {
        let mut r = Reindent::new("int f() {\n    int a =", "\n}", STRIP, 4);
        let out = r.push(" 1;\nreturn a;\n}\nint g();");
        assert_eq!(out, " 1;\n    return a;\n");
        assert!(r.stopped());
    }

    #[test]
    fn utf8_waits_for_a_characters_last_byte_and_stops_are_held_back() {
        let mut u = Utf8Stream::default();
        let e = "é".as_bytes();
        assert_eq!(u.push(&e[..1]), "");
        assert_eq!(u.push(&e[1..]), "é");
        assert_eq!(u.push(&[0xff, b'a']), "\u{fffd}a");
        let mut s = Stops::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(s.push("int a;\n"), "int a;");
        assert_eq!(s.push("int b;"), "\nint b;");
        assert_eq!(s.push("E"), "");
        assert_eq!(s.push("N"), "");
        assert_eq!(s.push("D tail"), "");
        assert_eq!(s.matched.as_deref(), Some("END"));
    }

    #[test]
    fn code_blocks_of_a_chat_answer_are_indented_and_prose_is_left_alone() {
        let answer = "Fixed:\n```cpp\nint f(int x) {\nif (x) {\nreturn 1;\n}\nreturn 0;\n}\n```\n  Then call `f`:\n```\nf(1);\n```";
        let want = "Fixed:\n```cpp\nint f(int x) {\n    if (x) {\n        return 1;\n    }\n    return 0;\n}\n```\n  Then call `f`:\n```\nf(1);\n```";
        // Whole, and a character at a time (fences split across pieces).
        let mut whole = CodeBlocks::new(STRIP);
        assert_eq!(whole.push(answer) + &whole.finish(), want);
        let mut pieces = CodeBlocks::new(STRIP);
        let mut got: String = answer
            .chars()
            .map(|c| pieces.push(&c.to_string()))
            .collect();
        got += &pieces.finish();
        assert_eq!(got, want);
        // A model trained on indented text answers as it should be shown.
        let mut kept = CodeBlocks::new(KEEP);
        assert_eq!(kept.push(answer) + &kept.finish(), answer);
        // An unclosed block and a held line start come out at the end.
        let mut open = CodeBlocks::new(STRIP);
        assert_eq!(
            open.push("```\n{\nx;\n``") + &open.finish(),
            "```\n{\n    x;\n    ``"
        );
    }
}
