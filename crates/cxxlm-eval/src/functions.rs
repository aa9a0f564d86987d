//! Function bodies in C++ source, found with a lexer that knows comments, literals and
//! preprocessor lines, and a brace matcher: enough to hide a body and ask a model to
//! write it, without a C++ parser. Heads it cannot tell apart (constructors with brace
//! initializers, lambdas, `operator=`) are left out rather than guessed.

/// A function body: `open` is just after its `{`, `close` at its `}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Body {
    pub open: usize,
    pub close: usize,
}

/// `src` with the insides of comments, string and character literals, and whole
/// preprocessor lines replaced by spaces (newlines kept), so braces and parentheses
/// left in it are code. Byte offsets are unchanged.
pub fn code_only(src: &str) -> Vec<u8> {
    let s = src.as_bytes();
    let mut out = s.to_vec();
    let mut i = 0;
    let mut line_start = true;
    let blank = |out: &mut [u8], from: usize, to: usize| {
        for b in &mut out[from..to.min(s.len())] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
    };
    while i < s.len() {
        let c = s[i];
        if line_start && c == b'#' {
            // A directive runs to the end of the line, continued by backslashes.
            let mut j = i;
            while j < s.len() && !(s[j] == b'\n' && (j == 0 || s[j - 1] != b'\\')) {
                j += 1;
            }
            blank(&mut out, i, j);
            i = j;
            continue;
        }
        if c == b'\n' {
            line_start = true;
            i += 1;
            continue;
        }
        if !c.is_ascii_whitespace() {
            line_start = false;
        }
        let end = match (c, s.get(i + 1).copied()) {
            (b'/', Some(b'/')) => s[i..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(s.len(), |p| i + p),
            (b'/', Some(b'*')) => find(s, i + 2, b"*/").map_or(s.len(), |p| p + 2),
            (b'R', Some(b'"')) if !is_ident(s.get(i.wrapping_sub(1)).copied()) => {
                // R"delim( ... )delim"
                let open = s[i + 2..]
                    .iter()
                    .position(|&b| b == b'(')
                    .map(|p| i + 2 + p);
                match open {
                    Some(o) if o - i - 2 <= 16 => {
                        let mut close = b")".to_vec();
                        close.extend_from_slice(&s[i + 2..o]);
                        close.push(b'"');
                        find(s, o, &close).map_or(s.len(), |p| p + close.len())
                    }
                    _ => i + 1,
                }
            }
            (b'"', _) | (b'\'', _) if !(c == b'\'' && is_digit_separator(s, i)) => {
                let mut j = i + 1;
                while j < s.len() && s[j] != c && s[j] != b'\n' {
                    j += if s[j] == b'\\' { 2 } else { 1 };
                }
                (j + 1).min(s.len())
            }
            _ => {
                i += 1;
                continue;
            }
        };
        blank(&mut out, i, end);
        i = end.max(i + 1);
    }
    out
}

fn find(s: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    s.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| from + p)
}

fn is_ident(b: Option<u8>) -> bool {
    b.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `1'000'000`: a quote between digits separates them.
fn is_digit_separator(s: &[u8], i: usize) -> bool {
    i > 0 && s[i - 1].is_ascii_hexdigit() && s.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
}

const NOT_FUNCTIONS: [&str; 16] = [
    "if",
    "else",
    "for",
    "while",
    "do",
    "switch",
    "catch",
    "try",
    "return",
    "namespace",
    "struct",
    "class",
    "union",
    "enum",
    "extern",
    "case",
];

/// Whether the code between the previous `;`, `{` or `}` and a `{` is a function head.
fn is_function_head(head: &str) -> bool {
    let head = head.trim();
    let Some(last_paren) = head.rfind(')') else {
        return false;
    };
    let first = head
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .find(|w| !w.is_empty())
        .unwrap_or("");
    if NOT_FUNCTIONS.contains(&first) || head.contains('=') || !head.contains('(') {
        return false;
    }
    // After the parameters only qualifiers and a trailing return type may follow.
    let tail = head[last_paren + 1..].replace("::", "").replace("->", "");
    tail.chars()
        .all(|c| c.is_alphanumeric() || c.is_whitespace() || "_<>&*".contains(c))
}

/// The bodies of functions defined outside other functions, in source order.
pub fn function_bodies(src: &str) -> Vec<Body> {
    braces(src).0
}

/// The insides of braces nested in function bodies (statement blocks of `if`, `for`,
/// lambdas, initializer lists), in the order they close.
pub fn inner_blocks(src: &str) -> Vec<Body> {
    braces(src).1
}

/// Function bodies, the brace pairs inside them, and the braces left open at the end
/// (each with whether a function body starts there).
fn braces(src: &str) -> (Vec<Body>, Vec<Body>, Vec<(usize, bool)>) {
    let code = code_only(src);
    let (mut bodies, mut blocks) = (Vec::new(), Vec::new());
    // Open braces: (position, whether a function body starts there).
    let mut stack: Vec<(usize, bool)> = Vec::new();
    let mut segment = 0;
    for (i, &c) in code.iter().enumerate() {
        match c {
            b'{' => {
                let inside_function = stack.iter().any(|&(_, f)| f);
                let head = String::from_utf8_lossy(&code[segment..i]);
                stack.push((i, !inside_function && is_function_head(&head)));
                segment = i + 1;
            }
            b'}' => {
                if let Some((open, function)) = stack.pop() {
                    let span = Body {
                        open: open + 1,
                        close: i,
                    };
                    if function {
                        bodies.push(span);
                    } else if stack.iter().any(|&(_, f)| f) {
                        blocks.push(span);
                    }
                }
                segment = i + 1;
            }
            b';' => segment = i + 1,
            _ => {}
        }
    }
    (bodies, blocks, stack)
}

/// The offset just past the `}` of `generated` that closes the `depth`-th brace opened
/// before it (1: the innermost), if there is one.
fn closing_brace(generated: &str, depth: usize) -> Option<usize> {
    let mut open = depth as i64;
    for (i, &c) in code_only(generated).iter().enumerate() {
        match c {
            b'{' => open += 1,
            b'}' => {
                open -= 1;
                if open == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// How far the braces of generated code close: the offset just past the `}` that closes
/// a body opened before the text started, if there is one.
pub fn body_end(generated: &str) -> Option<usize> {
    closing_brace(generated, 1)
}

/// The stop that code completion wants for a prompt that ends inside a function body
/// (a signature and its `{`, or part of the body): the end of that body, found by brace
/// depth outside comments, literals and preprocessor lines. Shared by evaluation,
/// `cxxlm sample` and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyStop {
    /// Braces open at the end of the prompt, the function body's own included.
    depth: usize,
}

impl BodyStop {
    /// `None` when the prompt does not end inside a function body.
    pub fn after(prompt: &str) -> Option<BodyStop> {
        let (_, _, open) = braces(prompt);
        let function = open.iter().position(|&(_, f)| f)?;
        Some(BodyStop {
            depth: open.len() - function,
        })
    }

    /// The length of `generated` up to and including the `}` that ends the body, once
    /// it is there. Generated text is scanned on its own: a prompt that ends inside a
    /// comment or a literal is taken to have closed it.
    pub fn end(&self, generated: &str) -> Option<usize> {
        closing_brace(generated, self.depth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bodies(src: &str) -> Vec<&str> {
        function_bodies(src)
            .iter()
            .map(|b| src[b.open..b.close].trim())
            .collect()
    }

    #[test]
    fn finds_free_member_and_template_functions_only() {
        let src = r#"
#include <vector>
#define BODY { return 1; }
namespace n {
// Returns twice x.
int twice(int x) { return 2 * x; }
struct S {
    int get() const noexcept { return v; }
    S(int a) : v(a) {}
    S(int a, int b) : v{a} {}
    auto size() const -> std::size_t { return 1; }
    int v;
};
template <typename T>
T id(T t) {
    if (t) { return t; }
    auto f = [](int y) { return y; };
    return "}{" == nullptr ? t : t; // }
}
enum class E : int { A, B };
int table[] = { 1, 2 };
}
"#;
        assert_eq!(
            bodies(src),
            [
                "return 2 * x;",
                "return v;",
                "",
                "return 1;",
                "if (t) { return t; }\n    auto f = [](int y) { return y; };\n    return \"}{\" == nullptr ? t : t; // }"
            ]
        );
    }

    #[test]
    fn comments_literals_and_directives_are_not_code() {
        let src =
            "int a = '{'; /* { */ // {\nconst char* s = R\"x({)x\";\n#if X {\nchar c = 1'000;\n";
        let code = String::from_utf8(code_only(src)).unwrap();
        assert!(!code.contains('{'), "{code}");
        assert_eq!(code.len(), src.len());
        assert!(
            code.contains("char c = 1'000;"),
            "digit separators stay: {code}"
        );
    }

    #[test]
    fn body_end_finds_the_closing_brace_of_the_hidden_body() {
        assert_eq!(body_end(" return f({1}); }\nint g();"), Some(17));
        assert_eq!(body_end(" if (x) { y(\"}\"); }\n return 0;\n}"), Some(32));
        assert_eq!(body_end(" while (true) {"), None);
    }

    #[test]
    fn a_prompt_that_opens_a_function_body_stops_where_it_ends() {
        let mbpp = "#include<bits/stdc++.h>\n// Sum of {x}.\nlong sum(std::vector<long> v) {\n";
        let stop = BodyStop::after(mbpp).expect("the prompt opens a body");
        let written = "    long s = 0; // }\n    for (long x : v) { s += x; }\n    return s;\n}\nint main() {}\n";
        assert_eq!(
            &written[..stop.end(written).unwrap()],
            &written[..written.find("}\nint").unwrap() + 1]
        );
        assert_eq!(stop.end("    if (x) {\n        return \"}\";\n"), None);
        // Inside a block of the body: the body's end, not the block's.
        let deeper = BodyStop::after("int f(int n) {\n  if (n) {\n    n++;").unwrap();
        let rest = "\n  }\n  return n;\n}\nint g;";
        assert_eq!(deeper.end(rest), Some(rest.find("}\nint").unwrap() + 1));
        // Not inside a function: a struct, a namespace, a closed function, plain text.
        for prompt in [
            "struct S {\n  int x;",
            "namespace a {\n",
            "int f() { return 1; }\n",
            "// {\n",
        ] {
            assert_eq!(BodyStop::after(prompt), None, "{prompt:?}");
        }
        // A method inside a class counts.
        assert!(BodyStop::after("class C {\n  int get() const {\n").is_some());
    }

    #[test]
    fn inner_blocks_are_the_braces_inside_function_bodies() {
        let src = "struct S { int x; };\nint f(int n) {\n  if (n) { return 1; }\n  for (;;) {\n    auto g = [] { return 2; };\n  }\n  return 0;\n}\nnamespace a { int y; }\n";
        let blocks: Vec<&str> = inner_blocks(src)
            .iter()
            .map(|b| src[b.open..b.close].trim())
            .collect();
        assert_eq!(
            blocks,
            ["return 1;", "return 2;", "auto g = [] { return 2; };"]
        );
        assert_eq!(bodies(src).len(), 1);
    }
}
